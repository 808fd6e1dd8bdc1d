"""Insert sparsity layers into any per-frame ``nn.Module`` and take them out again.

``convert()`` traces the model with torch.fx, places a :class:`DeltaActivation` (or the
:class:`ActivationL1` baseline) after every activation it selects (``nn.ReLU``, ``nn.ReLU6``,
``nn.Hardtanh`` and functional ``F.relu`` by default, optionally on the input pixels as in the
paper's ResNet-50 variant) and computes each layer's ``fan_out`` from its consumers in the graph.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._graph import FanOutError, fan_out_of, feeds_tokens, find_consumers, token_fan_out, trace
from ._opset import KINDS, classify
from .layers import ActivationL1, DeltaActivation, SparsityLayer, TokenDelta, VideoModel

__all__ = ["DeltaConfig", "convert", "revert"]

log = logging.getLogger(__name__)

# 2: gate and mode; 3: token gates (kind="token", policy, k, fraction). absorb_activation
# (a field with a default; an older reader names it as unknown) did not change the version.
CONFIG_VERSION = 3
_KINDS = ("delta", "l1", "token")
_DELTA_OPTIONS = {
    "granularity",
    "threshold_init",
    "sparsity_weight",
    "activation",
    "sigma",
    "delta_output",
    "threshold_trainable",
    "fan_out",
    "gate",
    "mode",
}
_TOKEN_OPTIONS = {"threshold_init", "sparsity_weight", "threshold_trainable", "fan_out",
                  "policy", "k", "fraction"}  # fmt: skip
_LAYER_OPTIONS = _DELTA_OPTIONS | _TOKEN_OPTIONS
_FUNCTIONAL = {
    "ReLU": ({F.relu, torch.relu}, {"relu", "relu_"}),
    "ReLU6": ({F.relu6}, set()),
    "Hardtanh": ({F.hardtanh}, set()),
}


@dataclass(frozen=True)
class DeltaConfig:
    """What ``convert()`` inserts, where, and with which options.

    Args:
        kind: ``"delta"`` (:class:`DeltaActivation`), ``"l1"`` (:class:`ActivationL1`) or
            ``"token"`` (:class:`TokenDelta` gates in transformer blocks: after every
            ``LayerNorm`` that feeds an attention module or a linear, i.e. before the qkv
            projection and before the MLP, where Eventful Transformers gate; the sites are
            named after the LayerNorm modules, ``after``/``functional``/``on_input`` do not
            apply).
        after: class names of the activation modules to insert after.
        functional: also insert after functional calls (``F.relu`` …) of those activations.
        on_input: also insert a layer on the input pixels.
        fan_out: explicit fan-out used where the graph cannot tell (otherwise an error).
        overrides: per-layer options keyed by the activation's module name (or node name
            for functional calls, ``"input"`` for the input layer); ``{"skip": True}`` leaves a
            site out.
        absorb_activation: for pixel gates (``kind="delta"``, ``gate="pixel"``) that sit after a
            ``ReLU``/``ReLU6`` (module or functional) which is the sole user of its input, the
            gate takes the activation's input and applies it itself (``activation="relu"`` /
            ``"relu6"``), so that training runs the activation, quantiser and loss in one fused
            pass. Outputs and gradients are those of the activation followed by the gate
            (torch's ReLU/ReLU6 masks); :func:`revert` puts the activation back. Sites with
            their own ``activation``, ``sigma`` or ``delta_output`` are left as they are.
        Other fields are the layer options of :class:`DeltaActivation` (``gate``: ``"scalar"`` or
        ``"pixel"``; ``mode``: ``"grid"`` or ``"hysteresis"``) or, for ``kind="token"``, of
        :class:`TokenDelta` (``policy``, ``k``, ``fraction``, ``threshold_init``, ...). For an input gate, as the
        video recipe uses, set ``on_input=True`` and give the input its own options with
        ``overrides={"input": {...}}``.
    """

    kind: str = "delta"
    granularity: str = "channel"
    threshold_init: float = 0.1
    sparsity_weight: float = 1e-3
    activation: str | None = None
    sigma: bool = False
    delta_output: bool = False
    threshold_trainable: bool = True
    gate: str = "scalar"
    mode: str = "grid"
    policy: str = "threshold"
    k: int | None = None
    fraction: float | None = None
    after: tuple[str, ...] = ("ReLU", "ReLU6", "Hardtanh")
    functional: bool = True
    on_input: bool = False
    fan_out: float | None = None
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    absorb_activation: bool = True
    version: int = CONFIG_VERSION

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"DeltaConfig.kind must be one of {_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "after", tuple(self.after))
        if self.kind == "token" and self.on_input:
            raise ValueError(
                "DeltaConfig(kind='token'): on_input is for CNNs (a gate on the input pixels); "
                "token gates sit in the transformer blocks; drop on_input=True"
            )
        for name, opts in self.overrides.items():
            bad = set(opts) - _LAYER_OPTIONS - {"skip"}
            if bad:
                raise ValueError(
                    f"DeltaConfig.overrides[{name!r}] has unknown options {sorted(bad)}; "
                    f"allowed: {sorted(_LAYER_OPTIONS | {'skip'})}"
                )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["after"] = list(self.after)
        d["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeltaConfig:
        d = dict(d)
        version = d.get("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ValueError(
                f"DeltaConfig version {version} is newer than this deltasparse understands "
                f"({CONFIG_VERSION}); upgrade deltasparse"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DeltaConfig fields {sorted(unknown)}")
        if "after" in d:
            d["after"] = tuple(d["after"])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> DeltaConfig:
        return cls.from_dict(json.loads(s))

    def layer_options(self, site: str) -> dict[str, Any] | None:
        """Options for the layer at ``site`` (``None`` when the site is skipped)."""
        opts = {k: getattr(self, k) for k in _LAYER_OPTIONS}
        over = dict(self.overrides.get(site, {}))
        if over.pop("skip", False):
            return None
        opts.update(over)
        return opts

    def make_layer(self, opts: Mapping[str, Any], fan_out: float) -> SparsityLayer:
        if self.kind == "l1":
            return ActivationL1(opts["sparsity_weight"], fan_out, input_layout="frame")
        if self.kind == "token":
            kw = {k: opts[k] for k in _TOKEN_OPTIONS - {"fan_out"}}
            return TokenDelta(**kw, fan_out=fan_out, input_layout="frame")
        kw = {k: opts[k] for k in _DELTA_OPTIONS - {"fan_out"}}
        return DeltaActivation(**kw, fan_out=fan_out, input_layout="frame")


def _activation_site(node: fx.Node, modules: dict, cfg: DeltaConfig,
                     gm: fx.GraphModule | None = None) -> str | None:  # fmt: skip
    """The site name when ``node`` is a selected activation (for token gates: a LayerNorm that
    feeds tokens to an attention module or a linear), else ``None``."""
    if cfg.kind == "token":
        if node.op == "call_module" and isinstance(modules[node.target], nn.LayerNorm):
            return str(node.target) if feeds_tokens(gm, node) else None
        return None
    if node.op == "call_module":
        if type(modules[node.target]).__name__ in cfg.after:
            return str(node.target)
        return None
    if not cfg.functional:
        return None
    for cls_name in cfg.after:
        funcs, methods = _FUNCTIONAL.get(cls_name, (set(), set()))
        if (node.op == "call_function" and node.target in funcs) or (
            node.op == "call_method" and node.target in methods
        ):
            return node.name
    return None


_ABSORB_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_ABSORB_FUNCS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
_ABSORB_METHODS = {"relu": "relu", "relu_": "relu"}
# producers whose output is a new tensor (never a view of another node's value)
_FRESH_OUTPUT = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
                 nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def _absorbable(node: fx.Node, modules: dict) -> str | None:
    """``"relu"``/``"relu6"`` when the activation ``node`` can move into the gate after it: a
    ReLU/ReLU6 (module, function or method, no other arguments than ``inplace``) whose input
    feeds nothing else (an in-place activation would otherwise change what the others see),
    and, if in place, is the fresh output of a conv, linear or norm module (not a view)."""
    if node.op == "call_module":
        act = _ABSORB_MODULES.get(type(modules[node.target]))
    elif node.op == "call_function":
        act = _ABSORB_FUNCS.get(node.target)
    elif node.op == "call_method":
        act = _ABSORB_METHODS.get(node.target)
    else:
        act = None
    if act is None or len(node.args) != 1 or set(node.kwargs) - {"inplace"}:
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node) or len(src.users) != 1:
        return None
    inplace = (node.target == "relu_" or node.kwargs.get("inplace", False)
               or getattr(modules.get(node.target) if node.op == "call_module" else None,
                          "inplace", False))  # fmt: skip
    if inplace and not (src.op == "call_module"
                        and isinstance(modules[src.target], _FRESH_OUTPUT)):  # fmt: skip
        # an in-place activation on a view (or on what Identity/Dropout pass through) also
        # changes the tensor the view is of, which other nodes read: keep it
        return None
    return act


def _activations_found(gm: fx.GraphModule, modules: dict) -> dict[str, list[str]]:
    """Activation module types the graph calls (``torch.nn`` activations) -> their names."""
    found: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if type(m).__module__ == nn.modules.activation.__name__:
            found.setdefault(type(m).__name__, []).append(str(node.target))
    return found


def _no_sites_error(gm: fx.GraphModule, modules: dict, config: DeltaConfig,
                    candidates: int) -> ValueError:  # fmt: skip
    """A model where convert() would insert nothing trains nothing for sparsity: refuse it."""
    if config.kind == "token" and not candidates:
        return ValueError(
            f"convert(): DeltaConfig(kind='token') found no nn.LayerNorm in {type(gm).__name__} "
            "that feeds an attention module (nn.MultiheadAttention or a timm-style Attention "
            "with qkv/proj linears) or a linear, so no token gate would be inserted; token "
            "gates are for transformer blocks (for CNNs use kind='delta')"
        )
    if candidates:
        return ValueError(
            f"convert(): filter_fn / overrides skipped every activation site ({candidates} of "
            f"{candidates}), so no sparsity layer would be inserted; keep at least one site"
        )
    found = _activations_found(gm, modules)
    if found:
        have = ", ".join(f"{k} (e.g. '{v[0]}', {len(v)} in all)" for k, v in sorted(found.items()))
        include = tuple(config.after) + tuple(k for k in sorted(found) if k not in config.after)
        return ValueError(
            f"convert(): no activation of {type(gm).__name__} is in DeltaConfig.after "
            f"{config.after}, so no sparsity layer would be inserted; the model has {have}. "
            f"Include them with DeltaConfig(after={include!r}) (or on_input=True for a layer "
            "on the input pixels)"
        )
    return ValueError(
        f"convert(): {type(gm).__name__} has no activation modules of the types in "
        f"DeltaConfig.after {config.after} (nor any other torch.nn activation module), so no "
        "sparsity layer would be inserted; make the activations modules (nn.ReLU(), ...) and "
        "list them in DeltaConfig(after=...), or use on_input=True for a layer on the input "
        "pixels"
    )


def _unique_target(gm: fx.GraphModule, base: str) -> str:
    target, i = base, 1
    existing = dict(gm.named_modules())
    while target in existing:
        target, i = f"{base}_{i}", i + 1
    return target


def convert(
    model: nn.Module,
    config: DeltaConfig | None = None,
    *,
    filter_fn: Callable[[str, nn.Module | None], bool] | None = None,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """Insert sparsity layers into a per-frame model and return the converted root.

    Returns a ``torch.fx.GraphModule`` that shares parameters with ``model``
    (a :class:`VideoModel` gets its ``frame_model`` converted and is returned itself).
    ``filter_fn(site_name, activation_module_or_None)`` can veto sites. ``example_input``
    (one batch of frames) runs one forward so that the thresholds exist at once (build the
    optimizer after that).
    """
    config = config or DeltaConfig()
    if isinstance(model, VideoModel):
        model.frame_model = convert(
            model.frame_model, config, filter_fn=filter_fn, example_input=example_input
        )
        return model
    if any(isinstance(m, SparsityLayer) for m in model.modules()):
        raise ValueError(
            "convert(): the model already holds sparsity layers; call revert(model) first"
        )
    gm = trace(model)
    modules = dict(gm.named_modules())
    sites: list[tuple[str, fx.Node]] = []
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and config.on_input and not sites:
            sites.append(("input", node))
            continue
        site = _activation_site(node, modules, config, gm)
        if site is None:
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        if filter_fn is not None and not filter_fn(site, module):
            continue
        sites.append((site, node))

    known = {"input"} | {
        s for n in gm.graph.nodes if (s := _activation_site(n, modules, config, gm)) is not None
    }
    for name in set(config.overrides) - known:
        # A misspelt site would silently keep the defaults; say so.
        log.warning("convert(): overrides[%r] matches no activation site of this model", name)
    if not any(config.layer_options(site) is not None for site, _ in sites):
        raise _no_sites_error(gm, modules, config, candidates=len(known - {"input"}))

    inserted: list[tuple[str, str, fx.Node, dict, tuple | None]] = []
    for site, node in sites:
        opts = config.layer_options(site)
        if opts is None:
            continue
        base = f"{site}_{config.kind}"  # _delta, _l1, _token
        target = _unique_target(gm, base)
        gm.add_submodule(target, nn.Identity())  # placeholder until fan-out is known
        act = None
        if (config.kind == "delta" and config.absorb_activation and opts.get("gate") == "pixel"
                and opts["activation"] is None and not opts["sigma"]
                and not opts["delta_output"] and site != "input"):  # fmt: skip
            act = _absorbable(node, modules)
        absorbed = None
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, (node.args[0],) if act else (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
        if act:
            # what revert() needs to put the activation back (its module stays in the tree)
            absorbed = (node.op, node.target, dict(node.kwargs), node.name)
            gm.graph.erase_node(node)
            opts = {**opts, "activation": act}
        inserted.append((site, target, new, opts, absorbed))

    for site, target, new, opts, absorbed in inserted:
        spread = None
        if config.kind == "delta" and opts.get("gate") == "pixel":
            spread = _spread(gm, new)
        # A per-layer override wins; the config-wide fan_out only fills in where the graph
        # cannot tell (as documented), it must not replace the fan-outs the graph gives.
        fan_out = config.overrides.get(site, {}).get("fan_out")
        if fan_out is None:
            try:
                fan_out = token_fan_out(gm, new) if config.kind == "token" else fan_out_of(gm, new)
            except FanOutError as exc:
                if config.fan_out is None:
                    raise FanOutError(
                        f"layer '{target}' (site '{site}'): {exc}; pass an explicit fan_out "
                        f"(DeltaConfig(fan_out=...) or overrides={{{site!r}: {{'fan_out': ...}}}})"
                    ) from None
                fan_out = config.fan_out
        layer = config.make_layer(opts, fan_out)
        if spread is not None:
            layer.spread = spread
        layer.absorbed = absorbed
        gm.add_submodule(target, layer)
    gm.graph.lint()
    gm.recompile()
    gm.meta["deltasparse_config"] = config.to_dict()
    log.info("convert(): inserted %d %s layers", len(inserted), config.kind)
    if example_input is not None:
        # eval mode: the probe must not move the batch-norm statistics of the user's model
        modes = {m: m.training for m in gm.modules()}
        gm.eval()
        try:
            with torch.no_grad():
                gm(example_input)
        finally:
            for m, mode in modes.items():
                m.training = mode
    return gm


def _pair(v) -> tuple[int, int]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _window(node: fx.Node, modules: dict, gm: fx.GraphModule | None = None):
    """A consumer path op as a max-pooling window ``(k, stride, pad, dilation, ceil)``,
    ``"global"`` (the op mixes the whole map), ``None`` (keeps pixels) or ``False`` (unknown)."""
    kind, params = classify(node, modules, gm)
    if KINDS[kind].walk and KINDS[kind].pixels:
        return None  # pointwise, norms, add, mul, cat, permute: a change stays on its pixel
    if kind in ("adaptive", "adaptive_max"):
        return "global" if _pair(params["output_size"]) == (1, 1) else False
    if kind in ("gpool", "flatten", "reshape", "reduce"):
        return "global"
    if kind not in ("maxpool", "avgpool"):
        return False  # upsampling, 1-d pooling: no window of this form
    if node.op == "call_module":
        m = modules[node.target]
        st = m.stride if m.stride not in (None, [], ()) else m.kernel_size
        dil = getattr(m, "dilation", 1)
        return (_pair(m.kernel_size), _pair(st), _pair(m.padding), _pair(dil), bool(m.ceil_mode))
    # max_pool2d(x, k, stride, padding, dilation, ceil_mode, ...);
    # avg_pool2d(x, k, stride, padding, ceil_mode, ...): no dilation
    t = node.target
    names = ["kernel_size", "stride", "padding"] + (
        ["dilation", "ceil_mode"] if t is F.max_pool2d else ["ceil_mode"])
    a = dict(zip(names, node.args[1:], strict=False))
    a.update({n: node.kwargs[n] for n in names if n in node.kwargs})
    k = a["kernel_size"]
    st = a.get("stride") or k
    return (_pair(k), _pair(st), _pair(a.get("padding", 0)), _pair(a.get("dilation", 1)),
            bool(a.get("ceil_mode", False)))  # fmt: skip


def _spread(gm: fx.GraphModule, node: fx.Node) -> list[dict] | None:
    """Per consumer of ``node``: the windows from a pixel to the consumer's rows and the MACs
    of a row (see DeltaActivation.spread); None where a path op is not understood."""
    modules = dict(gm.named_modules())
    try:
        consumers = find_consumers(gm, node)
    except FanOutError:
        return None
    out = []
    for c in consumers:
        wins = []
        for n in c.path:
            w = _window(n, modules, gm)
            if w is False:
                log.info("convert(): no receptive-field loss for '%s' (path op %s)", node.name,
                         n.name)
                return None
            if w is not None:
                wins.append(w)
            if w == "global":
                break
        m = c.module
        if "global" not in wins:
            if isinstance(m, nn.Conv2d):
                if isinstance(m.padding, str):
                    return None
                wins.append((_pair(m.kernel_size), _pair(m.stride), _pair(m.padding),
                             _pair(m.dilation), False))  # fmt: skip
            elif isinstance(m, nn.Linear):
                wins.append("global")
            else:
                return None
        if isinstance(m, nn.Linear):
            macs = m.in_features * m.out_features
        elif isinstance(m, nn.Conv2d):
            kh, kw = _pair(m.kernel_size)
            macs = kh * kw * (m.in_channels // m.groups) * m.out_channels
        else:
            return None
        out.append({"windows": wins, "macs_per_row": int(macs)})
    return out or None


def revert(model: nn.Module) -> nn.Module:
    """Remove the layers that :func:`convert` inserted; returns the root."""
    if isinstance(model, VideoModel):
        model.frame_model = revert(model.frame_model)
        return model
    if not isinstance(model, fx.GraphModule):
        if any(isinstance(m, SparsityLayer) for m in model.modules()):
            raise TypeError("revert() works on the GraphModule that convert() returned")
        return model
    modules = dict(model.named_modules())
    for node in list(model.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), SparsityLayer):
            src = node.args[0]
            absorbed = getattr(modules[node.target], "absorbed", None)
            if absorbed is not None:  # the activation convert() moved into the gate
                op, target, kwargs, name = absorbed
                with model.graph.inserting_before(node):
                    src = model.graph.create_node(op, target, (src,), kwargs, name=name)
            node.replace_all_uses_with(src)
            model.graph.erase_node(node)
            model.delete_submodule(node.target)
    model.graph.lint()
    model.recompile()
    model.meta.pop("deltasparse_config", None)
    return model

