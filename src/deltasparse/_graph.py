"""torch.fx helpers shared by conversion and measurement: tracing, activation sites, consumers.

A *consumer* of an activation is the first MAC-performing module (``Conv1d/2d``, ``Linear``)
reached from it through ops that keep activations sparse (the op kinds of :mod:`._opset` that
``walk``: pointwise activations, batch and layer norm, pooling, flatten, upsampling, dropout,
identity, residual add, products, concat). The *path* of ops on the way is kept so that a
binarised activation map can be replayed through it to count MACs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from ._opset import KINDS, activation_modules, classify, is_drop_path
from .layers import SparsityLayer

__all__ = [
    "Consumer",
    "FanOutError",
    "Tracer",
    "fan_out_of",
    "find_consumers",
    "is_attention",
    "trace",
]

MAC_MODULES = (nn.Conv1d, nn.Conv2d, nn.Linear)


class FanOutError(ValueError):
    """The consumers of an activation cannot be traced through the graph."""


def is_attention(m: nn.Module) -> bool:
    """A self-attention module the token engine runs as one op: ``nn.MultiheadAttention`` or a
    timm-style ``Attention`` (a ``qkv`` and a ``proj`` linear and ``num_heads``)."""
    if isinstance(m, nn.MultiheadAttention):
        return True
    return (isinstance(getattr(m, "qkv", None), nn.Linear)
            and isinstance(getattr(m, "proj", None), nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int))  # fmt: skip


class Tracer(fx.Tracer):
    """fx tracer that keeps the inserted sparsity layers, attention modules and LayerNorms
    (timm's subclass included, whose own forward fx would otherwise trace into
    ``F.layer_norm``) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (SparsityLayer, nn.LayerNorm)) or is_attention(m)
                or is_drop_path(m) or super().is_leaf_module(m, qualname))  # fmt: skip


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; a clear error explains what to do when fx cannot."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        graph = Tracer().trace(model)
    except Exception as exc:  # fx raises many types; all mean "not traceable"
        raise TypeError(
            f"torch.fx could not trace {type(model).__name__}: {exc}. Make the data-dependent "
            f"part a leaf module, or convert a traceable sub-module (convert(model.backbone, ...))"
        ) from exc
    return fx.GraphModule(model, graph, type(model).__name__)


@dataclass
class Consumer:
    """A MAC-performing module reached from an activation, with the path of nodes between."""

    name: str
    module: nn.Module
    path: list[fx.Node] = field(default_factory=list)
    source: fx.Node | None = None  # the node whose output feeds the path
    graph_module: fx.GraphModule | None = None  # resolves parameters the path reads


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} '{target}' (node '{node.name}')"


def find_consumers(gm: fx.GraphModule, start: fx.Node) -> list[Consumer]:
    """All MAC consumers reached from ``start`` (stopping at other sparsity layers)."""
    modules = dict(gm.named_modules())
    found: list[Consumer] = []

    def walk(node: fx.Node, path: list[fx.Node]) -> None:
        for user in node.users:
            if user.op == "output":
                continue
            if user.op == "call_module":
                mod = modules[user.target]
                if isinstance(mod, SparsityLayer):
                    continue  # its own changes are counted by that layer
                if isinstance(mod, MAC_MODULES):
                    found.append(Consumer(str(user.target), mod, list(path), start, gm))
                    continue
            if user.op in ("call_module", "call_function", "call_method"):
                kind, _ = classify(user, modules, gm)
                if KINDS[kind].walk:  # pointwise, pooling, reshapes, merges (_opset.KINDS)
                    walk(user, path + [user])
                    continue
            raise FanOutError(
                f"cannot trace the consumers of '{start.name}' through {_describe(user, modules)}"
            )

    walk(start, [])
    return found


def module_fan_out(mod: nn.Module) -> float:
    """MACs that one nonzero input element triggers in ``mod`` (DESIGN §1)."""
    if isinstance(mod, nn.Linear):
        return float(mod.out_features)
    k = 1
    s = 1
    for kk in mod.kernel_size:
        k *= kk
    for ss in mod.stride:
        s *= ss
    return k * (mod.out_channels / mod.groups) / s


def fan_out_of(gm: fx.GraphModule, node: fx.Node) -> float:
    return float(sum(module_fan_out(c.module) for c in find_consumers(gm, node)))


# activations a token engine applies row by row; with dropout, identity and LayerNorm, the ops
# through which a gate's sent tokens stay the rows to recompute
# (PReLU's weights run along dim 1: the tokens of a (N, L, D) tensor, so not token-wise)
TOKEN_ACTIVATIONS = tuple(m for m in activation_modules() if m is not nn.PReLU)
_TOKENWISE_MODULES = TOKEN_ACTIVATIONS + (nn.Dropout, nn.Identity, nn.LayerNorm)


def attention_qkv_macs(m: nn.Module) -> int:
    """MACs of the q, k, v projections of one token in an attention module."""
    if isinstance(m, nn.MultiheadAttention):
        return 3 * m.embed_dim * m.embed_dim
    return m.qkv.in_features * m.qkv.out_features


def token_consumers(gm: fx.GraphModule, start: fx.Node) -> list[fx.Node]:
    """The linears a token gate at ``start`` reaches through token-wise ops (an MLP: ``fc1``, its
    activation, ``fc2``) and the attention modules it feeds. What follows a residual add or an
    attention's token mixing is not the gate's: the next gate decides there."""
    modules = dict(gm.named_modules())
    found: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def walk(node: fx.Node) -> None:
        for user in node.users:
            if user in seen or user.op != "call_module":
                continue
            seen.add(user)
            mod = modules[user.target]
            if isinstance(mod, SparsityLayer):
                continue
            if is_attention(mod):
                found.append(user)
            elif isinstance(mod, nn.Linear):
                found.append(user)
                walk(user)
            elif isinstance(mod, _TOKENWISE_MODULES):
                walk(user)

    walk(start)
    return found


def token_fan_out(gm: fx.GraphModule, start: fx.Node) -> float:
    """MACs one sent token of a token gate at ``start`` triggers in its
    :func:`token_consumers`: the linears' MACs per row, the attention modules' q, k, v."""
    modules = dict(gm.named_modules())
    total = 0
    for node in token_consumers(gm, start):
        mod = modules[node.target]
        total += (attention_qkv_macs(mod) if is_attention(mod)
                  else mod.in_features * mod.out_features)  # fmt: skip
    if not total:
        raise FanOutError(
            f"the token gate at '{start.name}' feeds no linear or attention module through "
            "token-wise ops"
        )
    return float(total)


def feeds_tokens(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` (a LayerNorm) feeds an attention module or a linear directly (through
    dropout / identity): where Eventful Transformers place their token gates."""
    modules = dict(gm.named_modules())
    for user in node.users:
        if user.op != "call_module":
            continue
        mod = modules[user.target]
        if is_attention(mod) or isinstance(mod, nn.Linear):
            return True
        if isinstance(mod, (nn.Dropout, nn.Identity)) and feeds_tokens(gm, user):
            return True
    return False
