"""Lower a per-frame model's fx graph into an engine plan (shape-free, checked once).

Every fx node becomes one of: an *anchor* op that computes new values at chosen rows
(conv, linear, pooling, add, concat, flatten, global pooling, a dense fallback), a
*pointwise* op fused into the chain of the anchor before it (batch norm, ReLU/ReLU6/Hardtanh/
clamp, the DeltaActivation quantiser), or an *alias* (identity, dropout, ActivationL1,
``contiguous``, flatten of a ``(B, C, 1, 1)`` map) that shares its input's state. Batch norm
right after a conv or linear is folded into a copy of the weights at build time.

Anything else raises :class:`UnsupportedOpError` naming the op and the module, unless the
engine was built with ``fallback="dense"``: then that op is recomputed densely whenever one of
its inputs changed, and the stats list it as a dense fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from .._opset import ACTIVATIONS, KINDS, classify, is_drop_path, node_arg, tensor_args

__all__ = ["ChainOp", "PlanOp", "UnsupportedOpError", "build_plan", "trace_model"]

SUPPORTED = (
    "Conv2d (any kernel/stride/padding/dilation/groups, zero padding), Linear, BatchNorm1d/2d, "
    "ReLU/ReLU6/Hardtanh/clamp, " + "/".join(a.name for a in ACTIVATIONS) + ", "
    "LayerNorm over channels (LayerNorm2d, or nn.LayerNorm after a permute to channels-last), "
    "Identity, Dropout, stochastic depth (eval), DeltaActivation, ActivationL1, MaxPool2d, "
    "AvgPool2d, AdaptiveAvgPool2d, Flatten, add, mul (maps, squeeze-excitation scales, "
    "numbers, per-channel parameters), cat(dim=1), permute (NCHW <-> NHWC), upsampling "
    "(nearest, bilinear), mean over (H, W)"
)


class UnsupportedOpError(TypeError):
    """An op of the model that the delta engine cannot run (names the op and the module)."""


@dataclass
class ChainOp:
    """A pointwise op applied in place to freshly computed rows."""

    kind: str  # "clamp" | "affine" | "bn" | "quant"
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlanOp:
    kind: str  # input | conv | linear | maxpool | avgpool | gpool | add | cat | flatten |
    #            pointwise | fallback
    node: fx.Node
    inputs: list[fx.Node]
    out: fx.Node  # the last node of the fused chain: the value this op stores
    module: nn.Module | None = None
    qualname: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    chain: list[ChainOp] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.qualname or self.node.name


def _sparsity_tracer() -> type[fx.Tracer]:
    """An fx tracer keeping the sparsity layers as leaves (made late: no import cycle)."""
    from ..layers import SparsityLayer as sparsity_layer

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return (isinstance(m, sparsity_layer) or is_drop_path(m)
                    or super().is_leaf_module(m, qualname))  # fmt: skip

    return _Tracer


def trace_model(model: nn.Module, tracer: type[fx.Tracer] | None = None) -> fx.GraphModule:
    """The model's fx graph; ``VideoModel`` is unwrapped to its ``frame_model``.

    ``tracer``: the fx tracer class (default: one keeping the sparsity layers as leaves; the
    token engine passes ``deltasparse._graph.Tracer``, which keeps attention modules too)."""
    from ..layers import VideoModel

    if isinstance(model, VideoModel):
        model = model.frame_model
    if isinstance(model, fx.GraphModule):
        return model
    try:
        graph = (tracer or _sparsity_tracer())().trace(model)
    except Exception as exc:  # fx raises many types; all mean "not traceable"
        raise UnsupportedOpError(
            f"DeltaEngine: torch.fx could not trace {type(model).__name__}: {exc}. Pass the "
            "GraphModule that ds.convert() returns, or make the model fx-traceable"
        ) from exc
    gm = fx.GraphModule(model, graph, type(model).__name__)
    # fx makes fresh (training-mode) containers for the paths to the leaves it calls
    # ('features' of 'features.0.conv'); give them the modes of the user's modules.
    originals = dict(model.named_modules())
    for name, m in gm.named_modules():
        if name in originals:
            m.training = originals[name].training
    return gm


_arg = node_arg  # (runtime.py reads pooling arguments with it)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} '{target}' at node '{node.name}'"


_CONST_READERS = ("affine", "layernorm")  # kinds that take get_attr parameters


def _classify(node: fx.Node, modules: dict[str, nn.Module],
              gm: fx.GraphModule | None = None) -> tuple[str, dict]:  # fmt: skip
    """``(role, params)``; role is 'alias', 'chain:<kind>', an anchor kind, or 'unsupported'
    (the op kinds of :mod:`deltasparse._opset`)."""
    kind, params = classify(node, modules, gm)
    if any(a.op == "get_attr" for a in node.all_input_nodes) and kind not in _CONST_READERS:
        return "unsupported", {"why": "tensor constants (get_attr) are only supported as a "
                                      "layer scale (mul) or LayerNorm weights"}
    role = KINDS[kind].engine
    if role == "chain":
        return f"chain:{kind}", params
    if role in ("alias", "anchor"):
        return (role if role == "alias" else kind), params
    return "unsupported", params


_tensor_inputs = tensor_args


def build_plan(gm: fx.GraphModule, *, fallback: str = "error") -> tuple[list[PlanOp], dict]:
    """The ordered ops of the engine and the alias map ``node -> node that holds its value``."""
    if fallback not in ("error", "dense"):
        raise ValueError(f"fallback must be 'error' or 'dense', got {fallback!r}")
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    roles = {}
    for n in nodes:
        if n.op in ("placeholder", "output"):
            roles[n] = (n.op, {})
        elif n.op == "get_attr":
            roles[n] = ("const", {})  # read by the op that takes it (checked there)
        else:
            roles[n] = _classify(n, modules, gm)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedOpError(
            f"DeltaEngine: the model must take exactly one input (frames), found "
            f"{len(placeholders)} placeholders: {[p.name for p in placeholders]}"
        )

    alias: dict[fx.Node, fx.Node] = {}

    def resolve(n: fx.Node) -> fx.Node:
        while n in alias:
            n = alias[n]
        return n

    absorbed: set[fx.Node] = set()
    ops: list[PlanOp] = []
    for n in nodes:
        if n in absorbed:
            continue
        role, params = roles[n]
        if role == "const":
            continue
        if role == "output":
            out = n.args[0]
            if not isinstance(out, fx.Node):
                raise UnsupportedOpError(
                    "DeltaEngine: the model must return a single tensor, got "
                    f"{type(out).__name__}"
                )
            ops.append(PlanOp("output", n, [resolve(out)], n))
            continue
        if role == "alias":
            ins = _tensor_inputs(n)
            alias[n] = ins[0]
            continue
        if role == "unsupported":
            if fallback == "dense" and n.op in ("call_module", "call_function", "call_method"):
                role = "fallback"
                params = {**params, "describe": _describe(n, modules)}
            else:
                why = params.get("why")
                raise UnsupportedOpError(
                    f"DeltaEngine: unsupported op {_describe(n, modules)}"
                    + (f" ({why})" if why else "")
                    + f". Supported: {SUPPORTED}. Build the engine with fallback='dense' to run "
                    "such ops densely (reported in engine.stats)"
                )
        kind = "input" if role == "placeholder" else role
        if kind.startswith("chain:"):
            kind = "pointwise"
            chain_start = n
        else:
            chain_start = None
        mod = modules[n.target] if n.op == "call_module" else None
        qual = str(n.target) if n.op == "call_module" else None
        op = PlanOp(kind, n, [resolve(a) for a in _tensor_inputs(n, kind)], n, mod, qual, params)
        if kind == "input":
            op.inputs = []
        cur = n
        if chain_start is not None:
            op.chain.append(_chain_op(chain_start, roles[chain_start]))
        # Fuse the pointwise successors that nobody else reads.
        while kind not in ("output", "fallback"):
            users = list(cur.users)
            if len(users) != 1:
                break
            u = users[0]
            urole, uparams = roles[u]
            if urole == "alias" and len(_tensor_inputs(u)) == 1:
                absorbed.add(u)
                cur = u
                continue
            if not urole.startswith("chain:") or _tensor_inputs(u) != [cur]:
                break
            op.chain.append(_chain_op(u, (urole, uparams)))
            absorbed.add(u)
            cur = u
        op.out = cur
        # Intermediate chain nodes are only read by the chain itself; map them all to `cur`.
        for m in _chain_nodes(n, cur):
            if m is not cur:
                alias[m] = cur
        ops.append(op)
    return ops, alias


def _chain_nodes(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    out = [start]
    cur = start
    while cur is not end:
        cur = next(iter(cur.users))
        out.append(cur)
    return out


def _chain_op(node: fx.Node, role: tuple[str, dict]) -> ChainOp:
    kind = role[0].split(":", 1)[1]
    return ChainOp(kind, node.name, dict(role[1]))
