"""The token engine: streaming delta inference of transformers with token gates (DESIGN.md §4).

:class:`~deltasparse.DeltaEngine` runs a model with :class:`~deltasparse.TokenDelta` gates (or
attention modules) through this runtime. It interprets the model's fx graph node by node and
keeps, per node, the current value and which of its entries changed on this step:

* a **token gate** decides, per token, from its input and its reference (the last value sent),
  exactly as the layer does when streaming; its output changes in the sent tokens only;
* a **linear** (``nn.Linear``, the MLP's ``fc1``/``fc2``, the head) recomputes only the rows
  (tokens) whose input changed, gathered into one GEMM and scattered back;
* an **attention module** (a timm-style ``Attention`` or ``nn.MultiheadAttention``)
  recomputes q, k, v for the changed tokens; when any token of a sample changed, every query of
  that sample attends again (a changed key reaches every query) and the output projection runs
  for the sample's tokens;
* the **patch embedding** (a conv with kernel = stride) recomputes the patches whose pixels
  changed;
* everything else (LayerNorm, GELU, residual adds, reshapes, pooling over tokens) has no MACs:
  it is recomputed when an input changed, and its changed entries are found by comparing the new
  value with the old one.

So the output on every frame is the gated network's output for the current frame and the gates'
current references (:meth:`TokenRuntime.replay` computes that with the model's own modules; a
test holds the two equal over 1,000 frames), and the MACs counted are those executed.
``measure()`` runs this same runtime on its clips, so what it reports is what the engine does.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._graph import TOKEN_ACTIVATIONS, Tracer, is_attention, token_consumers
from .ops import OpStats
from .plan import UnsupportedOpError, trace_model
from .stats import EngineStats

__all__ = ["TokenRuntime", "has_tokens"]

# functional ops with MACs: the engine counts and skips MAC work in modules only
_MAC_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.scaled_dot_product_attention, torch.matmul,
                  torch.bmm, torch.einsum, operator.matmul, torch.mm, torch.addmm, torch.baddbmm,
                  F.bilinear, torch.addbmm}  # fmt: skip
_MAC_METHODS = {"matmul", "__matmul__", "bmm", "mm", "addmm", "baddbmm", "addbmm", "mv"}
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)
CROSSOVER = 0.6  # above this fraction of changed rows a linear runs dense (one full GEMM)
# Bytes of stored QK^T scores per attention module for the incremental update (0: off). Off by
# default: measured slower than recomputing attention with SDPA on CPU at 16-196 tokens, even
# where it halves the attention MACs (bench/token_engine.py --incremental-attention,
# bench/results/token_attention.json); ``engine.tokens.scores_cap = n`` switches it on.
SCORES_CAP = 0
_ALIASES = (nn.Identity, nn.Dropout)  # in eval mode: the input itself
_BINARY = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul}


def _tokenwise(m: nn.Module | None) -> bool:
    """Whether the module maps each row of the last dim on its own (not for NCHW maps: the
    rows of a token tensor are its tokens)."""
    if isinstance(m, TOKEN_ACTIVATIONS):
        return True
    return isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1


def has_tokens(model: nn.Module) -> bool:
    """Whether ``model`` is for the token engine: token gates or attention modules."""
    from ..layers import TokenDelta

    return any(isinstance(m, TokenDelta) or is_attention(m) for m in model.modules())


def _in_place(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_method":
        t = str(node.target)
        return t.endswith("_") and not t.endswith("__")
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    return bool(node.kwargs.get("inplace", False))


def _patch_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == tuple(m.stride)
            and tuple(m.dilation) == (1, 1) and m.groups == 1 and m.padding in ((0, 0), 0)
            and m.padding_mode == "zeros")  # fmt: skip


def _lookup(env: dict, a):
    return fx.node.map_arg(a, lambda n: env[n])


def _copy(v):
    return v.clone() if isinstance(v, torch.Tensor) else v


def _shares_storage(out: torch.Tensor, ins) -> bool:
    ptr = out.untyped_storage().data_ptr()
    return any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == ptr
               for t in ins)  # fmt: skip


class Rows:
    """Which rows (tokens: every index but the last dim's) of a value changed on this step.

    ``mask`` is a bool map of the value's shape without its last dim, or ``None`` for every
    row; the flat indices and the count are computed once and shared by the ops that pass the
    same rows on (a gate's sent tokens through ``fc1``, the activation and ``fc2``)."""

    __slots__ = ("_count", "_idx", "mask", "numel", "shape")

    def __init__(self, mask: torch.Tensor | None, shape: tuple[int, ...]) -> None:
        self.mask, self.shape = mask, tuple(shape)
        self.numel = math.prod(self.shape)
        self._idx = self._count = None

    @property
    def all(self) -> bool:
        return self.mask is None

    @property
    def idx(self) -> torch.Tensor:
        """Flat indices of the changed rows (int64)."""
        if self._idx is None:
            self._idx = self.mask.reshape(-1).nonzero().squeeze(1)
        return self._idx

    @property
    def count(self) -> int:
        if self._count is None:
            self._count = self.numel if self.mask is None else int(self.idx.numel())
        return self._count

    def bool_mask(self, device) -> torch.Tensor:
        if self.mask is None:
            return torch.ones(self.shape, dtype=torch.bool, device=device)
        return self.mask


def _update_rows(out: torch.Tensor, rows: Rows, y: torch.Tensor) -> None:
    """``out``'s changed rows (flat over every dim but the last) := ``y``, in place."""
    out.view(-1, out.shape[-1]).index_copy_(0, rows.idx, y)


def _take_rows(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).index_select(0, rows.idx)


class TokenRuntime:
    """Streams ``B`` independent streams of frames through a token-gated model (module doc).

    ``backend``: ``"torch"`` (delta) or ``"reference"`` (every node recomputed densely on every
    frame, the gates still deciding: the spec the delta path must equal).
    """

    def __init__(self, model: nn.Module, *, backend: str = "torch",
                 crossover: float | None = None) -> None:  # fmt: skip
        from ..layers import DeltaActivation, SparsityLayer, TokenDelta

        if backend not in ("torch", "reference"):
            raise ValueError(
                f"DeltaEngine: token models run on backend 'torch' (or 'reference'); got "
                f"{backend!r} (there are no C++/Triton token kernels yet)"
            )
        self.backend = backend
        self.crossover = CROSSOVER if crossover is None else float(crossover)
        # attention keeps QK^T (float32) for incremental updates up to this size per module
        self.scores_cap = SCORES_CAP
        self.gm = trace_model(model, Tracer)
        self.modules = dict(self.gm.named_modules())
        self.nodes = list(self.gm.graph.nodes)
        self._mlp = self._mlp_linears()
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        extra = [n.name for n in inputs[1:] if not n.args]
        if not inputs or extra:
            raise UnsupportedOpError(
                f"DeltaEngine (tokens): the model takes {len(inputs)} inputs without defaults "
                f"(extra: {extra}); the engine streams one frame tensor per step"
            )
        self._input = inputs[0]
        for node in self.nodes:
            if node.op == "call_function" and node.target in _MAC_FUNCTIONS:
                raise UnsupportedOpError(
                    f"DeltaEngine (tokens): the functional op '{node.name}' "
                    f"({getattr(node.target, '__name__', node.target)}) does MAC work outside a "
                    "module, which the token engine can neither skip nor count; use nn.Linear / "
                    "an attention module (timm-style Attention or nn.MultiheadAttention)"
                )
            if node.op == "call_method" and node.target in _MAC_METHODS:
                raise UnsupportedOpError(
                    f"DeltaEngine (tokens): the method call '{node.name}' (.{node.target}) does "
                    "MAC work outside a module, which the token engine can neither skip nor "
                    "count; use nn.Linear / an attention module"
                )
            if node.op != "call_module":
                continue
            m = self.modules[node.target]
            if isinstance(m, DeltaActivation):
                raise UnsupportedOpError(
                    f"DeltaEngine (tokens): '{node.target}' is a DeltaActivation (a CNN gate) in a "
                    "model with token gates or attention; convert transformers with "
                    "DeltaConfig(kind='token')"
                )
            if isinstance(m, nn.MultiheadAttention) and not m.batch_first:
                raise UnsupportedOpError(
                    f"DeltaEngine (tokens): nn.MultiheadAttention '{node.target}' has "
                    "batch_first=False; the token engine runs (N, L, D) tokens (batch_first=True)"
                )
            known = (TokenDelta, nn.Linear) + _NORMS
            if isinstance(m, SparsityLayer) and not isinstance(m, TokenDelta):
                raise UnsupportedOpError(
                    f"DeltaEngine (tokens): '{node.target}' ({type(m).__name__}) is not a token gate"
                )
            if not (isinstance(m, known) or is_attention(m) or _patch_conv(m)) and any(
                True for _ in m.parameters(recurse=True)
            ):
                raise UnsupportedOpError(
                    f"DeltaEngine (tokens): module '{node.target}' ({type(m).__name__}) has "
                    "weights but no token kernel (supported: nn.Linear, attention modules, a "
                    "patch-embedding conv with kernel = stride, LayerNorm and other norms)"
                )
        self.reset()

    def _mlp_linears(self) -> set[fx.Node]:
        """Linears reached from a token gate through token-wise ops (the MLPs)."""
        from ..layers import TokenDelta

        return {c for n in self.nodes if n.op == "call_module"
                and isinstance(self.modules[n.target], TokenDelta)
                for c in token_consumers(self.gm, n)
                if isinstance(self.modules[c.target], nn.Linear)}  # fmt: skip

    # -- state ---------------------------------------------------------------------------
    def reset(self) -> None:
        self.values: dict[fx.Node, object] = {}
        self.changes: dict[fx.Node, torch.Tensor | None] = {}
        self.refs: dict[fx.Node, torch.Tensor] = {}
        self.qkv: dict[fx.Node, torch.Tensor] = {}
        self.scores: dict[fx.Node, torch.Tensor] = {}
        self.frames = 0
        self._stats: dict[fx.Node, list[OpStats]] = {}

    def _op_stats(self, node: fx.Node, parts: list[tuple[str, str, int, int]]) -> list[OpStats]:
        """The node's OpStats, made on first use: ``(suffix, kind, macs_per_row, rows)``."""
        if node not in self._stats:
            self._stats[node] = [
                OpStats(name=f"{node.target}{suffix}", kind=kind, kernel=self.backend,
                        dense_macs_per_frame=macs * rows, macs_per_row=macs, out_rows=rows,
                        in_rows=rows)  # fmt: skip
                for suffix, kind, macs, rows in parts
            ]
        return self._stats[node]

    @staticmethod
    def _count(st: OpStats, rows: int, active: int, dense: bool) -> None:
        st.frames += 1
        st.dense_frames += int(dense)
        st.rows_computed += rows
        st.active_in += active
        st.changed_out += rows
        st.effective_macs += rows * st.macs_per_row
        st.delta_macs += active * st.macs_per_row

    # -- one step --------------------------------------------------------------------------
    # ``changes[node]``: None (nothing changed this step), True (everything changed) or a bool
    # map of the value's shape (rows of tokens for the ops that compute rows).
    @torch.no_grad()
    def step(self, frame: torch.Tensor) -> torch.Tensor:
        from ..layers import TokenDelta

        first = not self.values
        dense = first or self.backend == "reference"
        out = None
        for node in self.nodes:
            if node.op == "output":
                # copies: the engine updates its own buffers in place on later steps
                out = fx.node.map_aggregate(_lookup(self.values, node.args[0]), _copy)
                continue
            if node.op == "placeholder":
                if node is not self._input:  # e.g. timm's attn_mask=None: its default
                    self.values[node] = node.args[0]
                    self.changes[node] = True if first else None
                    continue
                # a copy: the caller may refill its frame buffer in place
                self._set(node, frame.clone(), self.values.get(node), first)
                continue
            if node.op == "get_attr":
                if first:
                    v = self.gm
                    for part in str(node.target).split("."):
                        v = getattr(v, part)
                    self.values[node] = v
                self.changes[node] = True if first else None
                continue
            m = self.modules[node.target] if node.op == "call_module" else None
            if isinstance(m, TokenDelta):
                self._gate(node, m, first)
                continue
            if not dense and all(self.changes.get(n) is None for n in node.all_input_nodes):
                self.changes[node] = None
                for st in self._stats.get(node, ()):
                    st.frames += 1  # a frame of this op's dense cost, none of it computed
                continue
            if m is not None and is_attention(m):
                self._attention(node, m, first, dense)
            elif isinstance(m, nn.Linear):
                self._linear(node, m, dense)
            elif m is not None and _patch_conv(m):
                self._patch(node, m, dense)
            elif isinstance(m, _ALIASES):  # identity, dropout in eval: the input itself
                self.values[node] = self.values[node.args[0]]
                self.changes[node] = self.changes[node.args[0]]
            elif _tokenwise(m) and self._rowwise(node, m, dense):
                pass
            elif node.op == "call_function" and node.target in _BINARY and self._binary(node):
                pass
            else:
                self._generic(node, first)
        self.frames += 1
        return out

    def _set(self, node: fx.Node, new, old, first: bool) -> None:
        self.values[node] = new
        if first or old is None or not isinstance(new, torch.Tensor):
            self.changes[node] = True if first else None
            return
        ne = new != old
        self.changes[node] = ne if bool(ne.any()) else None

    def _call(self, node: fx.Node, args, kwargs):
        """What ``node`` computes on these arguments (a module, function or method call)."""
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)

    def _args(self, node: fx.Node):
        return _lookup(self.values, node.args), _lookup(self.values, node.kwargs)

    def _generic(self, node: fx.Node, first: bool) -> None:
        args, kwargs = self._args(node)
        if node.op == "call_function" and node.target is operator.getitem and isinstance(
            args[0], (tuple, list)
        ):
            # a component of a tuple-valued op (nn.MultiheadAttention's (out, weights), chunk)
            src = self.changes.get(node.args[0])
            self.values[node] = args[0][args[1]]
            self.changes[node] = src[args[1]] if isinstance(src, tuple) else src
            return
        if _in_place(node, self.modules):
            # an in-place op (x.mul_(g), ReLU(inplace=True)) on a copy: the engine's stored
            # rows must stay what their op computed, or they are scaled again every frame
            args = (_copy(args[0]), *args[1:])
        out = self._call(node, args, kwargs)
        ins = [*args, *kwargs.values()]
        if isinstance(out, (tuple, list)):  # chunk, split, unbind: compared part by part
            out = tuple(o.clone() if isinstance(o, torch.Tensor) and _shares_storage(o, ins)
                        else o for o in out)  # fmt: skip
            old = self.values.get(node)
            self.values[node] = out
            if first or old is None:
                self.changes[node] = True if first else None
                return
            parts = tuple(
                (ne if bool((ne := o != p).any()) else None) if isinstance(o, torch.Tensor)
                else None for o, p in zip(out, old, strict=True))  # fmt: skip
            self.changes[node] = parts if any(c is not None for c in parts) else None
            return
        if isinstance(out, torch.Tensor) and _shares_storage(out, ins):
            out = out.clone()  # a view of a state that another op updates in place
        self._set(node, out, self.values.get(node), first)

    def _rows(self, arg: fx.Node, shape) -> Rows:
        """The rows (every index but the last dim's) of ``arg`` that changed."""
        chg = self.changes.get(arg)
        prefix = tuple(shape[:-1])
        if chg is True:
            return Rows(None, prefix)
        if isinstance(chg, Rows):
            return chg
        if chg is None:
            return Rows(torch.zeros(prefix, dtype=torch.bool, device=self.values[arg].device),
                        prefix)  # fmt: skip
        return Rows(chg.any(-1), prefix)  # a full map of changed entries

    def _rowwise(self, node: fx.Node, m: nn.Module, dense: bool) -> bool:
        """A token-wise module (activation, LayerNorm over the features) on the changed rows
        only; False when the node does not take one (N, ..., D) tensor."""
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return False
        x = self.values[node.args[0]]
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return False
        if getattr(m, "inplace", False):
            return False  # the generic path runs it on a copy
        if dense:
            self.values[node] = m(x).contiguous()  # partial updates view it flat
            self.changes[node] = True
            return True
        rows = self._rows(node.args[0], x.shape)
        if rows.all or rows.count > self.crossover * rows.numel:
            self.values[node] = m(x).contiguous()
        elif rows.count:
            _update_rows(self.values[node], rows, m(_take_rows(x, rows)))
        self.changes[node] = rows
        return True

    def _binary(self, node: fx.Node) -> bool:
        """An elementwise op of token tensors (a residual add): computed whole (it is cheap),
        changed in the union of its inputs' changed rows; False where the shapes are not
        (N, ..., D) tensors with the features last."""
        args, kwargs = self._args(node)
        out = node.target(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.dim() < 2 or kwargs:
            return False
        prefix = tuple(out.shape[:-1])
        parts: list[Rows] = []
        for a, v in zip(node.args, args, strict=True):
            if not isinstance(a, fx.Node):
                continue
            if not isinstance(v, torch.Tensor) or v.dim() != out.dim() or (
                    v.shape[-1] not in (1, out.shape[-1])):  # fmt: skip
                return False
            chg = self.changes.get(a)
            if chg is None:
                continue
            if chg is True or v.shape[-1] == 1:
                return False  # (first frames are dense; a broadcast over features is not rows)
            parts.append(self._rows(a, v.shape))
        self.values[node] = out
        if any(r.all and r.shape == prefix for r in parts):
            self.changes[node] = Rows(None, prefix)
        elif len(parts) == 1 and parts[0].shape == prefix:
            self.changes[node] = parts[0]
        else:
            mask = torch.zeros(prefix, dtype=torch.bool, device=out.device)
            for r in parts:
                mask |= r.bool_mask(out.device).expand(prefix)
            self.changes[node] = Rows(mask, prefix) if bool(mask.any()) else None
        return True

    def _gate(self, node: fx.Node, m, first: bool) -> None:
        from ..layers.token import token_change

        x = self.values[node.args[0]]
        rows = x.numel() // x.shape[-1]
        (st,) = self._op_stats(node, [("", "gate", 0, rows)])
        if first:
            self.refs[node] = self.values[node] = x.contiguous().clone()
            self.changes[node] = True
            self._count(st, rows, rows, True)
            return
        if self.changes.get(node.args[0]) is None and m.policy == "threshold":
            self.changes[node] = None  # nothing changed: nothing is over the threshold
            self._count(st, 0, 0, False)
            return
        ref = self.refs[node]
        send = m.send(token_change(x, ref))
        sent = Rows(send, send.shape)
        self._count(st, sent.count, sent.count, False)
        if sent.count == 0:
            self.changes[node] = None
            return
        ref = ref.clone()  # the old reference stays valid for anyone holding it
        _update_rows(ref, sent, _take_rows(x, sent))
        self.refs[node] = self.values[node] = ref
        self.changes[node] = sent

    def _linear(self, node: fx.Node, m: nn.Linear, dense: bool) -> None:
        x = self.values[node.args[0]]
        n_rows = x.numel() // x.shape[-1]
        kind = "mlp" if node in self._mlp else "linear"
        (st,) = self._op_stats(node, [("", kind, m.in_features * m.out_features, n_rows)])
        if dense:
            self.values[node] = F.linear(x, m.weight, m.bias)
            self._count(st, n_rows, n_rows, True)
            self.changes[node] = True
            return
        rows = self._rows(node.args[0], x.shape)
        active = rows.count
        if rows.all or active > self.crossover * n_rows:
            self.values[node] = F.linear(x, m.weight, m.bias)
            self._count(st, n_rows, active, True)
        else:
            if active:
                _update_rows(self.values[node], rows, F.linear(_take_rows(x, rows), m.weight,
                                                               m.bias))  # fmt: skip
            self._count(st, active, active, False)
        self.changes[node] = rows

    def _attention(self, node: fx.Node, m: nn.Module, first: bool, dense: bool) -> None:
        if not node.args or not isinstance(node.args[0], fx.Node):
            raise UnsupportedOpError(
                f"DeltaEngine (tokens): attention '{node.target}' is called without its tokens "
                "as the first positional argument"
            )
        x = self.values[node.args[0]]
        if isinstance(m, nn.MultiheadAttention):
            if node.kwargs.get("need_weights", True) or any(
                node.kwargs.get(k) is not None for k in ("attn_mask", "key_padding_mask")
            ):
                raise UnsupportedOpError(
                    f"DeltaEngine (tokens): nn.MultiheadAttention '{node.target}' must be called "
                    "with need_weights=False and no masks (the engine computes the output only)"
                )
            if not (node.args[1:3] == (node.args[0], node.args[0]) or len(node.args) == 1):
                raise UnsupportedOpError(
                    f"DeltaEngine (tokens): '{node.target}' is not self-attention (query, key "
                    "and value must be the same tokens)"
                )
            w, b = m.in_proj_weight, m.in_proj_bias
            heads, proj = m.num_heads, m.out_proj
            scale = None
            qn = kn = None
        else:
            w, b = m.qkv.weight, m.qkv.bias
            heads, proj = m.num_heads, m.proj
            scale = getattr(m, "scale", None)
            qn, kn = getattr(m, "q_norm", None), getattr(m, "k_norm", None)
        if x.dim() != 3:
            raise ValueError(
                f"DeltaEngine (tokens): attention '{node.target}' gets shape {tuple(x.shape)}; "
                "it takes (N, L, D) tokens"
            )
        n, length, dim = x.shape
        sts = self._op_stats(node, [
            (".qkv", "qkv", w.shape[0] * w.shape[1], n * length),
            (".qk", "qk", length * dim, n * length),
            (".av", "av", length * dim, n * length),
            (".proj", "proj", proj.in_features * proj.out_features, n * length),
        ])  # fmt: skip
        rows = Rows(None, (n, length)) if dense else self._rows(node.args[0], x.shape)
        active = rows.count
        if rows.all or active > self.crossover * n * length:
            qkv = F.linear(x, w, b)
            self.qkv[node] = qkv
            self._count(sts[0], n * length, active, True)
        else:
            qkv = self.qkv[node]
            if active:
                _update_rows(qkv, rows, F.linear(_take_rows(x, rows), w, b))
            self._count(sts[0], active, active, False)
        if rows.all:
            samples, sel, k = None, None, n
        else:
            samples = rows.mask.any(1)
            sel = samples.nonzero().squeeze(1)
            k = int(sel.numel())
        all_samples = k == n
        part = qkv if all_samples else qkv[sel]
        q, kk, v = part.reshape(k, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
        if qn is not None:
            q, kk = qn(q), kn(kk)
        scale = (dim // heads) ** -0.5 if scale is None else scale
        qk_rows = k * length  # QK^T in rows of L*D MACs
        if self._keep_scores(n, heads, length):
            # exact incremental QK^T: stored scores, recomputed for the changed queries (rows)
            # and the changed keys (columns) only; softmax and AV for every query
            cols = None if dense or rows.all else rows.mask[sel].any(0).nonzero().squeeze(1)
            scores = self.scores.get(node)
            if cols is None or scores is None or 2 * int(cols.numel()) >= length:
                part_s = (q.float() @ kk.float().transpose(-2, -1)).mul_(scale)
            else:
                part_s = scores if all_samples else scores[sel]
                qc, kc = q.float()[:, :, cols], kk.float()[:, :, cols]
                part_s[:, :, cols, :] = (qc @ kk.float().transpose(-2, -1)).mul_(scale)
                part_s[:, :, :, cols] = (q.float() @ kc.transpose(-2, -1)).mul_(scale)
                qk_rows = k * 2 * int(cols.numel())
            if scores is None or all_samples:
                self.scores[node] = part_s
            else:
                scores[sel] = part_s
            att = (part_s.softmax(-1) @ v.float()).to(v.dtype)
        else:
            att = F.scaled_dot_product_attention(q, kk, v, scale=scale)
        y = F.linear(att.transpose(1, 2).reshape(k, length, dim), proj.weight, proj.bias)
        self._count(sts[1], qk_rows, qk_rows, qk_rows == n * length)
        for st in sts[2:]:
            self._count(st, k * length, k * length, all_samples)
        if first:
            self._check_attention(node, m, x, y)
        mha = isinstance(m, nn.MultiheadAttention)
        if all_samples:
            out = y
        else:
            out = self.values[node][0] if mha else self.values[node]
            out[sel] = y
        if dense:
            chg = True
        elif all_samples:
            chg = Rows(None, (n, length))
        else:
            chg = Rows(samples[:, None].expand(n, length), (n, length))
        self.values[node] = (out, None) if mha else out
        self.changes[node] = (chg, None) if mha else chg

    def _keep_scores(self, n: int, heads: int, length: int) -> bool:
        """Whether attention keeps its QK^T scores to update them incrementally: not on the
        reference backend, and within the memory cap (float32 scores of ``N*H*L*L``)."""
        return self.backend == "torch" and 4 * n * heads * length * length <= self.scores_cap

    def _check_attention(self, node: fx.Node, m: nn.Module, x: torch.Tensor,
                         y: torch.Tensor) -> None:  # fmt: skip
        """On the first frame: the module itself must compute what the engine computes (a mask,
        rotary embeddings or another variant would otherwise stream wrong results silently)."""
        args, kwargs = self._args(node)
        ref = m(*args, **kwargs)
        ref = ref[0] if isinstance(ref, tuple) else ref
        err = float((ref.float() - y.float()).abs().max())
        scale = float(ref.float().abs().max()) or 1.0
        tol = 1e-4 if y.dtype in (torch.float32, torch.float64) else 3e-2  # half: 8-bit mantissa
        if not err <= tol * scale:
            raise UnsupportedOpError(
                f"DeltaEngine (tokens): attention module '{node.target}' "
                f"({type(m).__name__}) computes something else than qkv -> softmax attention -> "
                f"proj (max difference {err:.3g}); masks, rotary embeddings or other variants "
                "have no token kernel"
            )

    def _patch(self, node: fx.Node, m: nn.Conv2d, dense: bool) -> None:
        x = self.values[node.args[0]]
        p, pw = m.kernel_size
        n, c, h, w = x.shape
        gh, gw = h // p, w // pw
        macs = c * p * pw * m.out_channels
        (st,) = self._op_stats(node, [("", "patch_embed", macs, n * gh * gw)])
        chg = self.changes.get(node.args[0])
        if dense or chg is True:
            self.values[node] = m(x)
            self._count(st, n * gh * gw, n * gh * gw, True)
            self.changes[node] = True
            return
        if isinstance(chg, Rows):  # rows of the last dim (a token-wise op ran on it)
            chg = chg.bool_mask(x.device).unsqueeze(-1).expand(x.shape)
        crop = chg[:, :, : gh * p, : gw * pw]
        rows = crop.reshape(n, c, gh, p, gw, pw).any(5).any(3).any(1)  # (N, gh, gw)
        active = int(rows.sum())
        out = self.values[node]
        if active > self.crossover * n * gh * gw:
            self.values[node] = m(x)
            self._count(st, n * gh * gw, active, True)
        else:
            idx = rows.nonzero(as_tuple=True)
            patches = x[:, :, : gh * p, : gw * pw].reshape(n, c, gh, p, gw, pw)
            patches = patches.permute(0, 2, 4, 1, 3, 5)[idx].reshape(active, -1)
            y = F.linear(patches, m.weight.reshape(m.out_channels, -1), m.bias)
            out[idx[0], :, idx[1], idx[2]] = y
            self._count(st, active, active, False)
        self.changes[node] = rows.unsqueeze(1).expand(self.values[node].shape)

    # -- checks and stats ----------------------------------------------------------------------
    @torch.no_grad()
    def replay(self) -> torch.Tensor:
        """The model's output for the current frame with every token gate held at its current
        reference, computed by the model's own modules (the dense pass of the gated network).
        The engine's last output equals it (to float rounding) on every frame."""
        from ..layers import TokenDelta

        if not self.values:
            raise RuntimeError("TokenRuntime.replay(): no frame streamed since reset()")
        env: dict[fx.Node, object] = {}
        out = None
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = self.values[node]
            elif node.op == "get_attr":
                env[node] = self.values[node]
            elif node.op == "output":
                out = _lookup(env, node.args[0])
            elif node.op == "call_module" and isinstance(self.modules[node.target], TokenDelta):
                env[node] = self.refs[node]
            else:
                args, kwargs = _lookup(env, node.args), _lookup(env, node.kwargs)
                env[node] = self._call(node, args, kwargs)
        return out

    def op_stats(self) -> list[OpStats]:
        return [s for node in self.nodes for s in self._stats.get(node, [])]

    def state_bytes(self) -> int:
        seen, total = set(), 0
        for v in [*self.values.values(), *self.refs.values(), *self.qkv.values(),
                  *self.scores.values()]:
            for t in (v if isinstance(v, tuple) else (v,)):
                if (isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)
                        and id(t) not in seen):  # fmt: skip
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total

    def activation_bytes(self) -> int:
        """One frame's activations (every node's value, as a dense pass holds them)."""
        total = 0
        for v in self.values.values():
            for t in (v if isinstance(v, tuple) else (v,)):
                if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                    total += t.numel() * t.element_size()
        return total

    def engine_stats(self, *, backend: str, fallbacks: list[str]) -> EngineStats:
        ops = self.op_stats()
        return EngineStats.from_ops(ops, frames=self.frames, state_bytes=self.state_bytes(),
                                    table_bytes=0, dense_activation_bytes=self.activation_bytes(),
                                    backend=backend, fallbacks=list(fallbacks))  # fmt: skip


def token_op_summary(ops: list[OpStats], frames: int) -> dict[str, dict]:
    """Executed and dense MACs per frame by op kind (qkv, qk, av, proj, mlp, ...)."""
    out: dict[str, dict] = {}
    for o in ops:
        if o.kind == "gate":
            continue
        d = out.setdefault(o.kind, {"executed": 0, "dense": 0})
        d["executed"] += o.effective_macs
        d["dense"] += o.dense_macs_per_frame * o.frames
    f = max(frames, 1)
    return {k: {"executed_macs_per_frame": v["executed"] / f,
                "dense_macs_per_frame": v["dense"] / f,
                "executed_fraction": v["executed"] / v["dense"] if v["dense"] else None}
            for k, v in out.items()}  # fmt: skip

