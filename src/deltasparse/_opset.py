"""The op kinds of per-frame CNNs, declared once: how each is recognised in an fx graph, how a
sparse change travels through it, and what the engine does with it.

:func:`classify` maps an fx node to ``(kind, params)``. Everything that needs to know what a node
is reads it from here:

* the engine's plan (``engine/plan.py``) turns the kind into an anchor op, a step of a fused
  pointwise chain or an alias (:data:`KINDS` ``[kind].engine``);
* the fan-out walk of ``convert()`` / ``measure()`` (``_graph.find_consumers``) passes through
  the kinds that keep a change where it is or merge it (``.walk``);
* the exact MAC count (``metrics/macs.py``) replays a binarised change map through them
  (``.replay``), and the pixel gate's receptive-field loss reads their windows
  (``convert._window``) from the same kinds.

Pointwise activations are one table, :data:`ACTIVATIONS`: each entry names the module classes,
functions and methods that compute it and the torch function the engine applies to the rows it
recomputes (``apply``), so that adding an activation is one entry.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["ACTIVATIONS", "KINDS", "Activation", "Kind", "activation_modules", "classify"]


def node_arg(node: fx.Node, i: int, name: str, default=None):
    """Argument ``i`` of a call, positional or by keyword ``name``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


# -- pointwise activations ------------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    """One pointwise activation.

    ``params(node, module)`` reads its parameters from a module (``module``) or from a call's
    arguments (``module is None``); ``apply(z, params)`` computes it on rows ``(n, C)`` (channels
    last: a per-channel parameter broadcasts over the rows) and returns a new tensor.
    """

    name: str
    modules: tuple[type, ...]
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    params: Callable[[fx.Node, nn.Module | None], dict] = lambda node, m: {}
    apply: Callable[[torch.Tensor, dict], torch.Tensor] = field(default=lambda z, p: z)


def _gelu_params(node, m):
    return {"approximate": m.approximate if m is not None else _arg(node, 1, "approximate", "none")}


def _leaky_params(node, m):
    slope = m.negative_slope if m is not None else _arg(node, 1, "negative_slope", 0.01)
    return {"slope": float(slope)}


def _elu_params(node, m):
    return {"alpha": float(m.alpha if m is not None else _arg(node, 1, "alpha", 1.0))}


def _prelu_params(node, m):
    if m is None:
        raise _Unsupported("functional prelu (use nn.PReLU: its weight is a parameter)")
    return {"weight": m.weight}


def _prelu(z: torch.Tensor, p: dict) -> torch.Tensor:
    w = p["weight"].to(device=z.device, dtype=z.dtype)
    return torch.where(z >= 0, z, z * w)  # w: (1,) or (C,), broadcast over the rows


ACTIVATIONS: tuple[Activation, ...] = (
    Activation("silu", (nn.SiLU,), (F.silu,), ("silu", "silu_"), apply=lambda z, p: F.silu(z)),
    Activation("gelu", (nn.GELU,), (F.gelu,), ("gelu",), _gelu_params,
               lambda z, p: F.gelu(z, approximate=p["approximate"])),
    Activation("hardswish", (nn.Hardswish,), (F.hardswish,), (),
               apply=lambda z, p: F.hardswish(z)),
    Activation("hardsigmoid", (nn.Hardsigmoid,), (F.hardsigmoid,), (),
               apply=lambda z, p: F.hardsigmoid(z)),
    Activation("sigmoid", (nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid", "sigmoid_"),
               apply=lambda z, p: torch.sigmoid(z)),
    Activation("tanh", (nn.Tanh,), (torch.tanh, F.tanh), ("tanh", "tanh_"),
               apply=lambda z, p: torch.tanh(z)),
    Activation("leaky_relu", (nn.LeakyReLU,), (F.leaky_relu,), (), _leaky_params,
               lambda z, p: F.leaky_relu(z, p["slope"])),
    Activation("elu", (nn.ELU,), (F.elu,), (), _elu_params, lambda z, p: F.elu(z, p["alpha"])),
    Activation("mish", (nn.Mish,), (F.mish,), (), apply=lambda z, p: F.mish(z)),
    Activation("prelu", (nn.PReLU,), (), (), _prelu_params, _prelu),
)  # fmt: skip
_ACT_BY_MODULE = {cls: a for a in ACTIVATIONS for cls in a.modules}
_ACT_BY_FUNCTION = {f: a for a in ACTIVATIONS for f in a.functions}
_ACT_BY_METHOD = {t: a for a in ACTIVATIONS for t in a.methods}
ACTIVATION_BY_NAME = {a.name: a for a in ACTIVATIONS}

# clamp-like activations: (lo, hi) of a clamp, which the fused kernels run themselves
_CLAMP_MODULES = {nn.ReLU: lambda m: (0.0, None), nn.ReLU6: lambda m: (0.0, 6.0),
                  nn.Hardtanh: lambda m: (float(m.min_val), float(m.max_val))}  # fmt: skip
_RELU_FUNCS = {F.relu, torch.relu}


def activation_modules() -> tuple[type, ...]:
    """Every pointwise activation module class (the clamp-like ones included)."""
    return tuple(_CLAMP_MODULES) + tuple(_ACT_BY_MODULE)


class _Unsupported(Exception):
    """Raised by a params reader: the node is of a known kind with arguments the engine lacks."""


# -- op kinds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """What each consumer of the registry does with an op kind.

    engine: ``"alias"`` (shares its input's value), ``"chain"`` (a pointwise step fused after the
        op before it), ``"anchor"`` (a runtime op of its own) or ``"none"`` (not run).
    walk: the fan-out walk passes through it (a change stays sparse: pointwise ops, pooling,
        reshapes, merges); ``False`` stops the walk (a MAC consumer, or not understood).
    pixels: for the pixel gate's receptive-field loss: ``True`` when a change stays on its
        pixel (pointwise, channel mixing within a pixel, merges), else the op's window is read
        by ``convert._window``.
    """

    engine: str
    walk: bool
    pixels: bool = True


KINDS: dict[str, Kind] = {
    "alias": Kind("alias", True),         # identity, dropout, eval-mode stochastic depth, L1
    "clamp": Kind("chain", True),         # ReLU, ReLU6, Hardtanh, clamp
    "act": Kind("chain", True),           # an entry of ACTIVATIONS
    "bn": Kind("chain", True),            # eval-mode batch norm
    "quant": Kind("chain", False),        # a DeltaActivation (the walk stops at sparsity layers)
    "affine": Kind("chain", True),        # multiply by a number or a per-channel constant
    "layernorm": Kind("chain", True),     # LayerNorm over the channels of each pixel / row
    "conv": Kind("anchor", False),
    "linear": Kind("anchor", False),
    "maxpool": Kind("anchor", True, False),
    "avgpool": Kind("anchor", True, False),
    "adaptive": Kind("anchor", True, False),
    "gpool": Kind("anchor", True, False),  # mean over (H, W)
    "flatten": Kind("anchor", True, False),
    "add": Kind("anchor", True),
    "mul": Kind("anchor", True),          # elementwise product of two maps (squeeze-excitation)
    "cat": Kind("anchor", True),
    "upsample": Kind("anchor", True, False),  # nearest / bilinear interpolation
    "permute": Kind("anchor", True),      # NCHW <-> NHWC (the same rows)
    "reshape": Kind("none", True, False),  # view / reshape: the walk's, not the engine's
    "adaptive_max": Kind("none", True, False),
    "pool1d": Kind("none", True, False),   # 1-d pooling: the walk's (audio models), not the engine's
    "reduce": Kind("none", True, False),   # mean over other dims: likewise
    "unsupported": Kind("none", False),
}  # fmt: skip

_ALIAS_METHODS = {"contiguous"}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul}
_POOL1D = (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
_UPSAMPLE_MODES = ("nearest", "nearest-exact", "bilinear")


DROP_PATH = ("StochasticDepth", "DropPath")  # torchvision.ops, timm: fx leaves, identity in eval


def is_drop_path(m: nn.Module) -> bool:
    """torchvision's ``StochasticDepth`` / timm's ``DropPath`` (by class name: neither library
    is a dependency); tracers keep them as leaves, so that their training flag stays a module
    attribute instead of a constant baked into the graph."""
    return type(m).__name__ in DROP_PATH


_arg = node_arg


def _sparsity_classes():
    from .layers import ActivationL1, DeltaActivation, SparsityLayer

    return DeltaActivation, ActivationL1, SparsityLayer


def _clamp_bounds(node: fx.Node) -> tuple[str, dict]:
    lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        return "unsupported", {"why": "clamp bounds must be numbers"}
    return "clamp", {"lo": lo, "hi": hi}


def _flatten_kind(node: fx.Node, start: int, end: int, what: str) -> tuple[str, dict]:
    if start != 1 or end != -1:
        return "reshape", {"why": f"only {what}"}
    return "flatten", {}


def layernorm_axis(m: nn.Module) -> str | None:
    """Which axis a LayerNorm module normalises: ``"last"`` (``nn.LayerNorm`` itself, over the
    last dim), ``"channels"`` (a subclass such as torchvision's / timm's ``LayerNorm2d`` that
    normalises the channels of an NCHW map; found by running it once), or ``None``."""
    shape = tuple(m.normalized_shape)
    if len(shape) != 1:
        return None
    if type(m).forward is nn.LayerNorm.forward:
        return "last"
    c = shape[0]
    x = torch.randn(2, c, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    try:
        probe = copy.deepcopy(m).to(device="cpu", dtype=torch.float64)  # the model is untouched
        with torch.no_grad():
            y = probe(x)
    except Exception:  # noqa: BLE001 - a module we cannot run is one we do not understand
        return None
    w = None if m.weight is None else m.weight.detach().cpu().double()
    b = None if m.bias is None else m.bias.detach().cpu().double()
    ref = F.layer_norm(x.permute(0, 2, 3, 1), shape, w, b, m.eps).permute(0, 3, 1, 2)
    return "channels" if y.shape == ref.shape and torch.allclose(y, ref, atol=1e-9) else None


def _get_attr(gm: fx.GraphModule | None, node) -> torch.Tensor | None:
    if not (isinstance(node, fx.Node) and node.op == "get_attr") or gm is None:
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None  # read (and copied) at each build


def _mul_kind(node: fx.Node, gm) -> tuple[str, dict]:
    a, b = node.args[:2] if len(node.args) >= 2 else (node.args[0], node.kwargs.get("other"))
    tensors = [x for x in (a, b) if isinstance(x, fx.Node) and x.op != "get_attr"]
    if len(tensors) == 2:
        return "mul", {}
    other = b if isinstance(a, fx.Node) and a.op != "get_attr" else a
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        return "affine", {"scale": torch.tensor(float(other), dtype=torch.float64), "shift": None}
    const = _get_attr(gm, other)
    if const is not None:
        return "affine", {"scale": const, "shift": None}
    return "unsupported", {"why": "mul by something that is neither a tensor, a number nor a "
                                  "parameter"}


def _layernorm_fn(node: fx.Node, gm) -> tuple[str, dict]:
    shape = _arg(node, 1, "normalized_shape")
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    w, b = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    wt, bt = _get_attr(gm, w), _get_attr(gm, b)
    if (w is not None and wt is None) or (b is not None and bt is None) or len(shape) != 1:
        return "unsupported", {"why": "layer_norm over one dim with parameter (or no) weights"}
    return "layernorm", {"axis": "last", "shape": shape, "weight": wt, "bias": bt,
                         "eps": float(_arg(node, 4, "eps", 1e-5))}  # fmt: skip


def _upsample_kind(mode, size, scale, align_corners, recompute,
                   antialias=False) -> tuple[str, dict]:  # fmt: skip
    if antialias:
        return "unsupported", {"why": "antialiased interpolation"}
    if mode not in _UPSAMPLE_MODES:
        return "unsupported", {"why": f"interpolation mode {mode!r} (supported: {_UPSAMPLE_MODES})"}
    if any(isinstance(v, fx.Node) for v in (size, scale)):
        return "unsupported", {"why": "interpolation size from a tensor"}
    return "upsample", {"mode": mode, "size": size, "scale": scale,
                        "align_corners": bool(align_corners), "recompute": bool(recompute)}


def _is_stochastic_depth(f) -> bool:
    return getattr(f, "__name__", "") == "stochastic_depth"


def classify(node: fx.Node, modules: dict[str, nn.Module],
             gm: fx.GraphModule | None = None) -> tuple[str, dict]:  # fmt: skip
    """``(kind, params)`` of a ``call_module`` / ``call_function`` / ``call_method`` node (a kind
    of :data:`KINDS`); ``"unsupported"`` with ``params["why"]`` where the arguments are not
    handled. ``gm`` resolves parameters read with ``get_attr`` (a layer scale, LayerNorm
    weights traced into ``F.layer_norm``)."""
    try:
        return _classify(node, modules, gm)
    except _Unsupported as exc:
        return "unsupported", {"why": str(exc)}


def _classify(node: fx.Node, modules: dict[str, nn.Module], gm) -> tuple[str, dict]:
    delta_cls, l1_cls, _ = _sparsity_classes()
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, delta_cls):
            return "quant", {"layer": m}
        if isinstance(m, (l1_cls, nn.Identity, nn.Dropout, nn.Dropout2d)) or is_drop_path(m):
            return "alias", {}  # (the engine refuses modules in training mode up front)
        if isinstance(m, nn.Conv2d):
            return "conv", {}
        if isinstance(m, nn.Linear):
            return "linear", {}
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            return "bn", {"bn": m}
        clamp = _CLAMP_MODULES.get(type(m))
        if clamp is not None:
            lo, hi = clamp(m)
            return "clamp", {"lo": lo, "hi": hi}
        act = _ACT_BY_MODULE.get(type(m))
        if act is not None:
            return "act", {"act": act.name, **act.params(node, m)}
        if isinstance(m, nn.LayerNorm):
            axis = layernorm_axis(m)
            if axis is None:
                return "unsupported", {"why": "a LayerNorm over more than one dim, or a subclass "
                                              "that normalises neither the last dim nor channels"}
            return "layernorm", {"axis": axis, "shape": tuple(m.normalized_shape),
                                 "weight": m.weight, "bias": m.bias,
                                 "eps": float(m.eps)}  # fmt: skip
        if isinstance(m, nn.MaxPool2d):
            return "maxpool", {}
        if isinstance(m, nn.AvgPool2d):
            return "avgpool", {}
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return "adaptive", {"output_size": m.output_size}
        if isinstance(m, nn.AdaptiveMaxPool2d):
            return "adaptive_max", {"output_size": m.output_size}
        if isinstance(m, _POOL1D):
            return "pool1d", {}
        if isinstance(m, nn.Flatten):
            return _flatten_kind(node, m.start_dim, m.end_dim, "Flatten(start_dim=1, end_dim=-1)")
        if isinstance(m, nn.Upsample):
            return _upsample_kind(m.mode, m.size, m.scale_factor, m.align_corners,
                                  m.recompute_scale_factor)  # fmt: skip
        return "unsupported", {}
    if node.op == "call_function":
        f = node.target
        if f in _RELU_FUNCS:
            return "clamp", {"lo": 0.0, "hi": None}
        if f is F.relu6:
            return "clamp", {"lo": 0.0, "hi": 6.0}
        if f is F.hardtanh:
            lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
            return "clamp", {"lo": float(lo), "hi": float(hi)}
        if f is torch.clamp:
            return _clamp_bounds(node)
        act = _ACT_BY_FUNCTION.get(f)
        if act is not None:
            return "act", {"act": act.name, **act.params(node, None)}
        if f is F.dropout or _is_stochastic_depth(f):
            if _arg(node, 2 if f is F.dropout else 3, "training", True):
                return "unsupported", {"why": "dropout / stochastic depth with training=True "
                                              "(traced from a model in training mode: call "
                                              ".eval() before convert())"}
            return "alias", {}
        if f in _ADD_FUNCS:
            if f is torch.add and _arg(node, 2, "alpha", 1) != 1:
                return "unsupported", {"why": "add with alpha != 1"}
            return "add", {}
        if f in _MUL_FUNCS:
            return _mul_kind(node, gm)
        if f is torch.cat:
            return "cat", {"dim": _arg(node, 1, "dim", 0)}
        if f is torch.flatten:
            return _flatten_kind(node, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1),
                                 "torch.flatten(x, 1)")  # fmt: skip
        if f is torch.permute:
            return "permute", {"dims": tuple(_arg(node, 1, "dims"))}
        if f is F.max_pool2d:
            return "maxpool", {}
        if f is F.avg_pool2d:
            return "avgpool", {}
        if f is F.adaptive_avg_pool2d:
            return "adaptive", {"output_size": _arg(node, 1, "output_size")}
        if f is F.adaptive_max_pool2d:
            return "adaptive_max", {"output_size": _arg(node, 1, "output_size")}
        if f in (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d):
            return "pool1d", {}
        if f is F.layer_norm:
            return _layernorm_fn(node, gm)
        if f is F.interpolate:
            return _upsample_kind(_arg(node, 3, "mode", "nearest"), _arg(node, 1, "size"),
                                  _arg(node, 2, "scale_factor"), _arg(node, 4, "align_corners"),
                                  _arg(node, 5, "recompute_scale_factor"),
                                  _arg(node, 6, "antialias", False))  # fmt: skip
        return "unsupported", {}
    if node.op == "call_method":
        t = node.target
        if t in ("relu", "relu_"):
            return "clamp", {"lo": 0.0, "hi": None}
        if t in ("clamp", "clamp_"):
            return _clamp_bounds(node)
        act = _ACT_BY_METHOD.get(t)
        if act is not None:
            return "act", {"act": act.name, **act.params(node, None)}
        if t in _ALIAS_METHODS:
            return "alias", {}
        if t in ("add", "add_"):
            if _arg(node, 2, "alpha", 1) != 1:
                return "unsupported", {"why": "add with alpha != 1"}
            return "add", {}
        if t in ("mul", "mul_"):
            return _mul_kind(node, gm)
        if t == "flatten":
            return _flatten_kind(node, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1),
                                 "x.flatten(1)")  # fmt: skip
        if t == "permute":
            dims = node.args[1:]
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
            return "permute", {"dims": tuple(dims or node.kwargs.get("dims", ()))}
        if t in ("view", "reshape"):
            return "reshape", {}
        if t == "mean":
            dims = _arg(node, 1, "dim")
            dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
            if sorted(d % 4 for d in dims if isinstance(d, int)) == [2, 3] and len(dims) == 2:
                return "gpool", {"keepdim": bool(_arg(node, 2, "keepdim", False))}
            return "reduce", {"why": "only mean over the spatial dims (2, 3)"}
        return "unsupported", {}
    return "unsupported", {}


def tensor_args(node: fx.Node, kind: str | None = None) -> list[fx.Node]:
    """The node's inputs that carry activations (parameters read by ``get_attr`` are not);
    for ``add`` / ``mul`` / ``cat`` (``kind``) in argument order with repeats (``y + y``,
    ``cat([y, y])``), else each once."""
    if kind in ("add", "mul", "cat"):
        args = node.args[0] if kind == "cat" and node.args else node.kwargs.get("tensors")
        if kind != "cat":
            args = node.args[:2] if len(node.args) >= 2 else [*node.args, node.kwargs.get("other")]
        if isinstance(args, (list, tuple)):
            return [a for a in args if isinstance(a, fx.Node) and a.op != "get_attr"]
    out: list[fx.Node] = []
    for a in node.all_input_nodes:
        if a.op != "get_attr" and a not in out:
            out.append(a)
    return out

