"""A whole delta-engine step on the GPU with no host synchronisation, captured in a CUDA graph.

The engine's per-op driver (ops.py) decides on the host which rows each op recomputes, so
every op costs a device->host round trip and a handful of launches: on a GPU that, not the
arithmetic, bounds a sparse step (plain torch gather/scatter costs ~0.06 ms per op on an
H200, whatever the density).
:class:`GraphStep` runs the same algorithm (DESIGN.md §4; arXiv 2107.07305's delta
inference) with all decisions on the device:

* every stored value gets a changed-row mask (int8, one byte per pixel), cleared each step;
* per op, :func:`compact_kernel` lists the output rows whose window holds a changed input
  row (on-device compaction into a fixed-capacity index buffer; the count stays on the GPU);
* one fused kernel per op recomputes those rows from the stored inputs (gather -> GEMM or
  depthwise taps -> bias -> chain: clamp / affine / quantiser), compares them with the stored
  rows, writes them and marks the rows that changed for the next op. Its grid is fixed and
  persistent: it loops over ``ceil(count / BM)`` row tiles read from device memory, so an
  idle layer costs one near-empty launch.

A step is therefore a fixed sequence of launches (one memset, the input commit, two kernels
per op, one statistics add) that is captured once in a CUDA graph and replayed. The values'
state buffers are the engine's own, so graph steps and per-op steps can be interleaved.
Statistics (rows computed, active inputs) are accumulated on the device and copied into the
ops' :class:`~deltasparse.engine.ops.OpStats` by :meth:`GraphStep.flush_stats`.

Supported ops: the input, ``Linear`` / 1x1 convs, convs of any groups (depthwise included),
global average pooling, max and average pooling, residual adds, channel concatenations of
two to four maps, products (of two maps, or a squeeze-excitation scale), pointwise chains on their
own, nearest and bilinear upsampling, the activations of ``triton_gpu.ACT_CODES`` and a
LayerNorm over each row's channels in any chain (:class:`_Hidden`), flattens of whole
samples (NCHW order), aliases (flatten of ``(B, C, 1, 1)``, dropout). Others raise
``NotImplementedError`` at construction (the engine then keeps its per-op driver);
:func:`decline_reason` says why without triton or a GPU, so the engine can warn and record it.
"""

from __future__ import annotations

import math

import torch

from .base import HALF, opmath
from .triton_gpu import (
    ChainArgs,
    _cdiv,
    _kernels,
    act_code,
    dw_config,
    gemm_config,
    launch_depthwise,
    launch_grouped,
    launch_rows_gemm,
    launch_taps_gemm,
    sm_count,
    split_k,
    taps_flat,
    window_kw,
)

__all__ = ["GraphStep", "decline_reason"]

_COMPACT_BLOCK = 1024


def _chain_reason(chain) -> str | None:
    if sum(step[0] == "ln" for step in chain.steps) > 1:
        return "two LayerNorms in one chain"
    for step in chain.steps:
        if step[0] == "quant":
            thr, per_row = step[1], step[2]
            if not (per_row or thr.numel() == 1 or thr.dim() == 1):
                return f"quantiser step of shape {tuple(thr.shape)}"
        elif step[0] == "act":
            if act_code(step) is None:
                return f"activation {step[3]!r} {step[2]}"
        elif step[0] not in ("clamp", "affine", "ln"):
            return f"chain step {step[0]!r}"
    return None


def _ln_split(chain) -> tuple[list, tuple, list] | None:
    """``(steps before, the LayerNorm step, steps after)`` of a chain with a LayerNorm (at
    most one: :func:`_chain_reason`), else None."""
    at = next((k for k, step in enumerate(chain.steps) if step[0] == "ln"), None)
    if at is None:
        return None
    return chain.steps[:at], chain.steps[at], chain.steps[at + 1 :]


class _ChainPart:
    """Some steps of a chain, as :func:`chain_args` reads a chain."""

    def __init__(self, steps: list, chain) -> None:
        self.steps, self.channels, self.hw = steps, chain.channels, chain.hw


class _Hidden:
    """A value the graph keeps between an op and the LayerNorm of its chain (the op's result
    before it), with its own state: a LayerNorm mixes a row's channels, so it runs on whole
    rows, in a kernel of its own, on the rows of this value that changed."""

    def __init__(self, like, dtype, device) -> None:
        self.shape, self.rows, self.channels = like.shape, like.rows, like.channels
        self.hw, self.batch = like.hw, like.batch
        self.buf = torch.zeros(like.rows + 1, like.channels, dtype=dtype, device=device)
        self.state = self  # masks are keyed by the state


class _Workspace:
    """A split GEMM's ``(split, rows, N)`` float32 workspace: ``t``, a view of the buffer
    :class:`GraphStep` shares between them (set once every op is built)."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape, self.t = shape, None


class _Stage:
    """``op`` seen with another output value and chain: the op's kernels up to a LayerNorm."""

    def __init__(self, op, out, chain) -> None:
        self._op, self.out, self.chain = op, out, chain

    def __getattr__(self, name: str):
        return getattr(self._op, name)


def _builder(op) -> tuple[str, int] | None:
    """The GraphStep builder of ``op`` (``_add_<name>``) and its mode, or None: one dispatch
    for :func:`decline_reason` and :class:`GraphStep`."""
    from ..ops import (
        AddOp,
        CatOp,
        ConvOp,
        LinearOp,
        MulOp,
        PointwiseOp,
        PoolOp,
        SampleOp,
        UpsampleOp,
    )

    if isinstance(op, LinearOp):
        return "linear", 0
    if isinstance(op, ConvOp):
        return "conv", 0
    if isinstance(op, SampleOp):
        return "gpool", 0  # global average pooling, or a flatten
    if isinstance(op, (AddOp, CatOp)):  # rows_pair_kernel's MODE
        return "pair", 1 if isinstance(op, CatOp) else 0
    if type(op) is PointwiseOp:
        return "pair", 2
    if isinstance(op, MulOp):
        return "pair", 3 if op.scale is None else 4
    if isinstance(op, PoolOp):
        return "pool", 0
    if isinstance(op, UpsampleOp):
        return "upsample", 0
    return None


def decline_reason(runtime) -> str | None:
    """Why :class:`GraphStep` cannot run ``runtime`` (``None``: it can). Pure Python, no triton:
    the same rules ``GraphStep`` applies, checked up front so that a decline can be reported."""
    dtype = runtime.input_op.out.buf.dtype
    if dtype not in (torch.float32, torch.float64, *HALF):
        return f"dtype {dtype}"
    for op in runtime.ops:
        kind = _builder(op)
        if kind is None:
            return f"no device kernel for {type(op).__name__} {op.kind} '{op.name}'"
        n_max = 4 if kind == ("pair", 1) else 2  # concatenations of up to 4, sums of 2
        if kind[0] == "pair" and kind[1] in (0, 1) and not 2 <= len(op.inputs) <= n_max:
            return f"{op.kind} '{op.name}' of {len(op.inputs)} tensors (2-{n_max} have a kernel)"
        why = _chain_reason(op.chain)
        if why is not None:
            return f"{why} in '{op.name}'"
    return None


def chain_args(chain, dtype, device) -> ChainArgs:
    """An ops.Chain as kernel arguments (raises NotImplementedError for unknown steps); the
    constants in the dtype the kernels compute in (float32 for half precision)."""
    tk = _kernels()
    dtype = opmath(dtype)
    steps: list[tuple[int, torch.Tensor]] = []
    for step in chain.steps:
        if step[0] == "clamp":
            lo = -math.inf if step[1] is None else float(step[1])
            hi = math.inf if step[2] is None else float(step[2])
            steps.append((tk.CH_CLAMP, torch.tensor([lo, hi], dtype=dtype, device=device)))
        elif step[0] == "affine":
            ab = torch.stack([step[1].reshape(-1), step[2].reshape(-1)]).to(dtype).contiguous()
            steps.append((tk.CH_AFFINE, ab))
        elif step[0] == "act":
            code, p = act_code(step), step[2]
            if code is None:
                raise NotImplementedError(f"activation {step[3]!r}")
            if "weight" in p:  # prelu: one weight per channel
                par = p["weight"].reshape(-1).to(device=device, dtype=dtype)
                par = par.expand(chain.channels).contiguous()
            else:
                v = p.get("slope", p.get("alpha", 0.0))
                par = torch.tensor([float(v)], dtype=dtype, device=device)
            steps.append((tk.CH_ACT + code, par))
        elif step[0] == "quant":
            thr, per_row = step[1].to(device=device, dtype=torch.float32), step[2]
            if per_row:
                steps.append((tk.CH_QROW, thr.contiguous()))
            elif thr.numel() == 1:
                steps.append((tk.CH_QSCALAR, thr.reshape(1).contiguous()))
            elif thr.dim() == 1:
                steps.append((tk.CH_QCHANNEL, thr.contiguous()))
            else:
                raise NotImplementedError(f"quantiser step of shape {tuple(thr.shape)}")
        else:
            raise NotImplementedError(f"chain step {step[0]!r}")
    dummy = torch.zeros(1, dtype=dtype, device=device)
    return ChainArgs(steps, dummy, hw=chain.hw)


class GraphStep:
    """Device-side steps of a built engine runtime (see the module docstring).

    Args:
        runtime: the engine's :class:`~deltasparse.engine.runtime.Runtime` (built by the first,
            dense frame).
        backend: the :class:`~.triton_gpu.TritonBackend` (device, float32 GEMM precision).
        cuda_graph: capture the step in a CUDA graph at the first call (else launch eagerly).
    """

    def __init__(self, runtime, backend, *, cuda_graph: bool = True) -> None:
        why = decline_reason(runtime)
        if why is not None:
            raise NotImplementedError(why)
        self.rt = runtime
        self.backend = backend
        self.cuda_graph = cuda_graph
        dev = backend.device
        inp = runtime.input_op.out
        self.dtype = inp.buf.dtype
        ops = runtime.ops
        # An op whose chain holds a LayerNorm computes into a hidden value first, unless it
        # is a pointwise op with the LayerNorm first: it then reads its input directly.
        hidden = {i: _Hidden(op.out, self.dtype, dev) for i, op in enumerate(ops, start=1)
                  if (sp := _ln_split(op.chain)) and (sp[0] or _builder(op) != ("pair", 2))}
        # One mask per value state (aliases share their state, hence their mask).
        offsets: dict[int, tuple[int, int]] = {}
        self._states: list = []  # (buffer, rows) of every value state, once
        total = 0
        values = [inp] + [o.out for o in ops] + [i for o in ops for i in o.inputs]
        for v in values + list(hidden.values()):
            if id(v.state) not in offsets:
                offsets[id(v.state)] = (total, v.rows)
                self._states.append((v.buf, v.rows))
                total += v.rows
        self.masks = torch.zeros(total + 1, dtype=torch.int8, device=dev)
        # per op: rows computed, active input rows, and (ops of 2-4 inputs) the active rows
        # of the second, third and fourth input, so that each producer is credited with its
        # own changes
        # (then one row per hidden value: the LayerNorm stage's compaction, not an op's)
        # (and a last row: the changed rows of the output, which no op reads)
        n_rows = len(ops) + 1 + len(hidden) + 1
        self.counts = torch.zeros(n_rows, 5, dtype=torch.int32, device=dev)
        self.totals = torch.zeros(n_rows, 5, dtype=torch.int64, device=dev)
        self._others: dict[int, list[int]] = {}  # op index -> ids of its inputs 2.. states

        def mask(v) -> torch.Tensor:
            o, n = offsets[id(v.state)]
            return self.masks[o : o + n]

        self.frame = torch.zeros(inp.shape, dtype=self.dtype, device=dev)
        self._launches = []
        self._workspaces: list[_Workspace] = []
        tk = _kernels()
        b, c, h, w = inp.shape
        mo_in = mask(inp)
        act0 = self.counts[0, 1:2]
        self._launches.append(
            lambda: tk.input_commit_kernel[(_cdiv(inp.rows, 256),)](
                self.frame, inp.buf, mo_in, act0, inp.rows, c, h * w,
                BLOCK=256, BC=max(2, 1 << (c - 1).bit_length()), num_warps=4,
            )  # fmt: skip
        )
        nsm = sm_count(dev)
        self._op_launches: list[int] = []  # the end of each op's launches in _launches
        extra = iter(range(len(ops) + 1, n_rows))
        for i, op in enumerate(ops, start=1):
            self._cur = i  # the op's row of self.counts
            cnt, act = self.counts[i, :1], self.counts[i, 1:2]
            split = _ln_split(op.chain)
            if split is None or i in hidden:
                built = op if split is None else _Stage(op, hidden[i],
                                                        _ChainPart(split[0], op.chain))  # fmt: skip
                name, mode = _builder(op)  # decline_reason accepted every op
                if name == "pair":
                    self._add_pair(built, mode, mask, cnt, act, nsm)
                elif name == "gpool":
                    self._add_gpool(built, mask, cnt, act)
                else:
                    getattr(self, f"_add_{name}")(built, mask, cnt, act, nsm)
            if split is not None:
                if i in hidden:
                    k = next(extra)
                    cnt, act = self.counts[k, :1], self.counts[k, 1:2]
                self._add_norm(op, split, hidden.get(i, op.inputs[0]), mask, cnt, act, nsm)
            self._op_launches.append(len(self._launches))
        self.graph: torch.cuda.CUDAGraph | None = None
        self._pending = 0
        out_changed = self.counts[n_rows - 1, 1:2]
        mo_out = mask(runtime.output)
        self._launches.append(lambda: out_changed.copy_(mo_out.sum(dtype=torch.int32)))
        self._share_workspace(dev)
        # kernels per step: a split GEMM adds its sum, the output's count is a sum and a copy
        self.launches_per_step = len(self._launches) + len(self._workspaces) + 1
        self._prime()

    def _prime(self) -> None:
        """Recompute every row of every op with this step's kernels, from the frame the
        runtime holds. The runtime's dense pass (the per-op driver's first frame: cuDNN)
        sums in other orders than these kernels; a row a later step recomputes and a row it
        keeps would then come from two computations, a quantiser could flip between them,
        and the output would depend on the stream's history. Every state is poisoned with
        NaN (so that every row compares as changed and every op recomputes all of them) and
        one step runs, op by op; its counts are not kept. Rows no input reaches (an output
        window all in padding: a constant no step recomputes) stay NaN; each op's are
        restored from the dense pass before the next op reads them. Each row is then the same
        function of the current inputs as any later step computes: history independent bit
        for bit."""
        frame = self.rt.input_op.out.as_tensor()
        backup = {id(buf): buf[:rows].clone() for buf, rows in self._states}
        for buf, rows in self._states:
            buf[:rows].fill_(float("nan"))
        self.frame.copy_(frame)
        self.masks.zero_()
        self.counts.zero_()
        start = 0
        try:
            for end, op in zip([1, *self._op_launches], [self.rt.input_op, *self.rt.ops],
                               strict=True):  # fmt: skip
                for launch in self._launches[start:end]:
                    launch()
                start = end
                buf, rows = op.out.buf, op.out.rows
                unset = torch.isnan(buf[:rows])
                if bool(unset.any()):
                    buf[:rows] = torch.where(unset, backup[id(buf)], buf[:rows])
        except BaseException:  # a kernel that fails (to compile): the dense pass's state back
            for buf, rows in self._states:
                buf[:rows].copy_(backup[id(buf)])
            raise
        self.counts.zero_()

    # -- building ---------------------------------------------------------------------------
    def _compact(self, x, out, geom, idx, cnt, act, mask, x2=None, hwb: int = 1, act2=None,
                 src=None, more=()):  # fmt: skip
        """The compaction launch of an op; ``x2``, ``more``: its other inputs (elementwise
        ops), ``act2`` and the ``act`` of each of ``more``: their changed-row counters."""
        tk = _kernels()
        ident = geom is None or geom.is_identity
        p_in, p_out = x.rows, out.rows
        if ident:
            geo = dict(KH=1, KW=1, SH=1, SW=1, PH=0, PW=0, DH=1, DW=1)
            h = w = ho = wo = 1
        else:
            (h, w), (ho, wo) = geom.in_hw, geom.out_hw
            geo = window_kw(geom)
        mi = mask(x)
        mi2 = mi if x2 is None else mask(x2)
        p2 = p_in if x2 is None else x2.rows
        ks = 0 if src is None else src.shape[1]
        src = idx if src is None else src
        m34 = [mask(v) for v, _ in more] + [mi] * (2 - len(more))
        a34 = [a for _, a in more] + [act] * (2 - len(more))
        nin = 1 if x2 is None else 2 + len(more)
        grid = (_cdiv(max(p_in, p_out), _COMPACT_BLOCK),)
        return lambda: tk.compact_kernel[grid](
            mi, mi2, *m34, src, idx, cnt, act, act if act2 is None else act2, *a34, p_out,
            p_in, h, w, ho * wo, wo, p2, hwb, IDENT=ident, KS=ks, NIN=nin,
            BLOCK=_COMPACT_BLOCK, num_warps=4, **geo,
        )  # fmt: skip

    def _share_workspace(self, dev) -> None:
        """One buffer, of the largest split GEMM's size, for all of them (a method of its own:
        a loop variable here would rebind names the launch lambdas read)."""
        need = max((math.prod(ws.shape) for ws in self._workspaces), default=0)
        if need:
            flat = torch.empty(need, dtype=torch.float32, device=dev)
            for ws in self._workspaces:
                ws.t = flat[: math.prod(ws.shape)].view(ws.shape)

    def _workspace(self, split: int, rows: int, n: int, dev) -> _Workspace | None:
        """The float32 partial sums of a GEMM split in ``split`` parts (None: unsplit): a
        view of one buffer all split GEMMs share (they run one after another), allocated
        once every op is built."""
        if split == 1:
            return None
        ws = _Workspace((split, rows, n))
        self._workspaces.append(ws)
        return ws

    def _add_linear(self, op, mask, cnt, act, nsm):
        x, out, spec = op.inputs[0], op.out, op.spec
        dev = out.buf.device
        idx = torch.zeros(out.rows, dtype=torch.int32, device=dev)
        chain = chain_args(op.chain, self.dtype, dev)
        rows = out.rows
        bm, bn, _, _ = gemm_config(spec.in_ch, spec.out_ch, self.dtype == torch.float64, rows)
        grid = min(_cdiv(rows, bm) * _cdiv(spec.out_ch, bn), 8 * nsm)
        mo, prec = mask(out), self.backend.precision
        ws = self._workspace(split_k(spec.in_ch, spec.out_ch, rows, self.dtype == torch.float64),
                             rows, spec.out_ch, dev)  # fmt: skip
        self._launches.append(self._compact(x, out, None, idx, cnt, act, mask))
        self._launches.append(
            lambda: launch_rows_gemm(x.buf, spec.wt, spec.bias, idx, out.buf, cnt=cnt, mo=mo,
                                     chain=chain, grid=grid, precision=prec,
                                     ws=ws and ws.t)  # fmt: skip
        )

    def _add_conv(self, op, mask, cnt, act, nsm):
        x, out, spec = op.inputs[0], op.out, op.spec
        dev = out.buf.device
        idx = torch.zeros(out.rows, dtype=torch.int32, device=dev)
        chain = chain_args(op.chain, self.dtype, dev)
        f64 = self.dtype == torch.float64
        mo = mask(out)
        self._launches.append(self._compact(x, out, spec.geom, idx, cnt, act, mask))
        if spec.groups > 1 and not spec.depthwise:
            bm, bn, _ = dw_config(spec.out_ch, f64, out.rows)
            grid = min(_cdiv(out.rows, bm) * _cdiv(spec.out_ch, bn), 8 * nsm)
            self._launches.append(
                lambda: launch_grouped(x.buf, spec, idx, out.buf, cnt=cnt, mo=mo, chain=chain,
                                       grid=grid)  # fmt: skip
            )
        elif spec.depthwise:
            bm, bc, _ = dw_config(spec.out_ch, f64, out.rows)
            grid = min(_cdiv(out.rows, bm) * _cdiv(spec.out_ch, bc), 8 * nsm)
            self._launches.append(
                lambda: launch_depthwise(x.buf, spec, idx, out.buf, cnt=cnt, mo=mo,
                                         chain=chain, grid=grid)  # fmt: skip
            )
        else:
            bm, bn, _, _ = gemm_config(spec.in_ch, spec.out_ch, f64, out.rows)
            grid = min(_cdiv(out.rows, bm) * _cdiv(spec.out_ch, bn), 8 * nsm)
            prec = self.backend.precision
            k2 = spec.geom.kernel[0] * spec.geom.kernel[1]
            split = split_k(k2 * spec.in_ch, spec.out_ch, out.rows, f64, taps_flat(spec, f64))
            ws = self._workspace(split, out.rows, spec.out_ch, dev)
            self._launches.append(
                lambda: launch_taps_gemm(x.buf, spec, idx, out.buf, cnt=cnt, mo=mo,
                                         chain=chain, grid=grid, precision=prec,
                                         ws=ws and ws.t)  # fmt: skip
            )

    def _add_gpool(self, op, mask, cnt, act):
        tk = _kernels()
        x, out = op.inputs[0], op.out
        chain = chain_args(op.chain, self.dtype, out.buf.device)
        hw, c = x.hw[0] * x.hw[1], x.channels
        mi, mo = mask(x), mask(out)
        s = chain.tensors
        mean = op.mode == "mean"
        bc = 32 if mean else 256
        grid = (x.batch, _cdiv(c if mean else c * hw, bc))
        self._launches.append(
            lambda: tk.gpool_kernel[grid](
                x.buf, mi, out.buf, mo, cnt, act, s[0], s[1], s[2], s[3], hw, c,
                IS_F64=self.dtype == torch.float64, HALF=self.dtype in HALF, BR=128, BC=bc,
                MEAN=mean, num_warps=4, **chain.kw(),
            )  # fmt: skip
        )

    def _add_pair(self, op, mode: int, mask, cnt, act, nsm):
        """An elementwise op of its inputs' rows (rows_pair_kernel's ``MODE``): a residual
        add, a channel concatenation, a pointwise chain, a product (of two maps, or of a map
        and a per-sample scale)."""
        tk = _kernels()
        out = op.out
        rest = []
        if mode == 2:
            a = b = op.inputs[0]
        elif mode == 4:  # the map first, the (B, C) scale second
            b, a = op.inputs[op.scale], op.inputs[1 - op.scale]
        else:
            a, b, *rest = op.inputs  # a concatenation: up to 4 (decline_reason)
        hwb = a.rows // b.rows if mode == 4 else 1
        dev = out.buf.device
        idx = torch.zeros(out.rows, dtype=torch.int32, device=dev)
        chain = chain_args(op.chain, self.dtype, dev)
        s, mo = chain.tensors, mask(out)
        bm, bn = 32, 64
        grid = (min(_cdiv(out.rows, bm) * _cdiv(out.channels, bn), 8 * nsm),)
        two = None if mode == 2 else b
        i = self._cur
        act2 = None
        if two is not None:
            act2 = self.counts[i, 2:3]
            self._others[i] = [id(v.state) for v in (b, *rest)]
        more = [(v, self.counts[i, 3 + j : 4 + j]) for j, v in enumerate(rest)]
        self._launches.append(self._compact(a, out, None, idx, cnt, act, mask, x2=two, hwb=hwb,
                                            act2=act2, more=more))  # fmt: skip
        cd = rest + [a] * (2 - len(rest))
        ccd = [v.channels for v in rest] + [0] * (2 - len(rest))
        nin = 1 if two is None else 2 + len(rest)
        self._launches.append(
            lambda: tk.rows_pair_kernel[grid](
                a.buf, b.buf, cd[0].buf, cd[1].buf, idx, cnt, out.buf, mo, s[0], s[1], s[2],
                s[3], a.channels, b.channels, ccd[0], ccd[1], chain.hw, hwb, MODE=mode, NIN=nin,
                IS_F64=self.dtype == torch.float64, HALF=self.dtype in HALF, BM=bm, BN=bn,
                num_warps=4, **chain.kw(),
            )  # fmt: skip
        )

    def _add_norm(self, op, split, src, mask, cnt, act, nsm):
        """The LayerNorm of ``op``'s chain and the steps after it, on the changed rows of
        ``src`` (the op's hidden pre-LayerNorm value, or its input), into the op's output."""
        tk = _kernels()
        out, dev = op.out, op.out.buf.device
        _, ln, post = split
        c = out.channels
        dt = opmath(self.dtype)
        w = torch.ones(c, dtype=dt, device=dev) if ln[1] is None else ln[1]
        b = torch.zeros(c, dtype=dt, device=dev) if ln[2] is None else ln[2]
        w, b = w.reshape(-1).to(dev, dt).contiguous(), b.reshape(-1).to(dev, dt).contiguous()
        chain = chain_args(_ChainPart(post, op.chain), self.dtype, dev)
        s, mo = chain.tensors, mask(out)
        idx = torch.zeros(out.rows, dtype=torch.int32, device=dev)
        bc = max(16, 1 << (c - 1).bit_length())
        bm = max(1, min(32, 4096 // bc))
        grid = (min(_cdiv(out.rows, bm), 8 * nsm),)
        eps = float(ln[3])
        self._launches.append(self._compact(src, out, None, idx, cnt, act, mask))
        self._launches.append(
            lambda: tk.rows_norm_kernel[grid](
                src.buf, w, b, idx, cnt, out.buf, mo, s[0], s[1], s[2], s[3], c, chain.hw, eps,
                IS_F64=self.dtype == torch.float64, HALF=self.dtype in HALF, BM=bm, BC=bc,
                num_warps=8 if bc >= 1024 else 4, **chain.kw(),
            )  # fmt: skip
        )

    def _add_upsample(self, op, mask, cnt, act, nsm):
        tk = _kernels()
        x, out = op.inputs[0], op.out
        dev = out.buf.device
        idx = torch.zeros(out.rows, dtype=torch.int32, device=dev)
        chain = chain_args(op.chain, self.dtype, dev)
        s, mo = chain.tensors, mask(out)
        src = op.idx.contiguous()
        w = out.buf if op.weight is None else op.weight.contiguous()
        c = out.channels
        bm, bc, nw = dw_config(c, self.dtype == torch.float64, out.rows)
        grid = (min(_cdiv(out.rows, bm) * _cdiv(c, bc), 8 * nsm),)
        self._launches.append(self._compact(x, out, None, idx, cnt, act, mask, src=src))
        self._launches.append(
            lambda: tk.gather_kernel[grid](
                x.buf, src, w, idx, cnt, out.buf, mo, s[0], s[1], s[2], s[3], c, chain.hw,
                KS=src.shape[1], HAS_W=op.weight is not None, IS_F64=self.dtype == torch.float64,
                HALF=self.dtype in HALF, BM=bm, BC=bc, num_warps=nw, **chain.kw(),
            )  # fmt: skip
        )

    def _add_pool(self, op, mask, cnt, act, nsm):
        tk = _kernels()
        x, out, g = op.inputs[0], op.out, op.spec.geom
        avg = op.spec.mode != "max"
        div = op.spec.divisor.reshape(-1).contiguous() if avg else out.buf
        dev = out.buf.device
        idx = torch.zeros(out.rows, dtype=torch.int32, device=dev)
        chain = chain_args(op.chain, self.dtype, dev)
        s, mo = chain.tensors, mask(out)
        c = out.channels
        bm, bc, nw = dw_config(c, self.dtype == torch.float64, out.rows)
        grid = (min(_cdiv(out.rows, bm) * _cdiv(c, bc), 8 * nsm),)
        (h, w), (ho, wo) = g.in_hw, g.out_hw
        self._launches.append(self._compact(x, out, g, idx, cnt, act, mask))
        self._launches.append(
            lambda: tk.pool_kernel[grid](
                x.buf, div, idx, cnt, out.buf, mo, s[0], s[1], s[2], s[3], c, h, w, ho * wo,
                wo, chain.hw, **window_kw(g), AVG=avg,
                IS_F64=self.dtype == torch.float64, HALF=self.dtype in HALF, BM=bm, BC=bc,
                num_warps=nw, **chain.kw(),
            )  # fmt: skip
        )

    # -- running ----------------------------------------------------------------------------
    def _body(self) -> None:
        self.masks.zero_()
        self.counts.zero_()
        for launch in self._launches:
            launch()
        self.totals += self.counts

    @torch.no_grad()
    def step(self, frame: torch.Tensor) -> torch.Tensor:
        """One (non-first) engine step on ``frame`` ``(B, C, H, W)``; returns the output."""
        if tuple(frame.shape) != tuple(self.frame.shape) or frame.dtype != self.dtype:
            raise ValueError(
                f"GraphStep: frame {tuple(frame.shape)} {frame.dtype} does not match the "
                f"stream's {tuple(self.frame.shape)} {self.dtype}; reset the engine"
            )
        self.frame.copy_(frame)
        if not self.cuda_graph:
            self._body()
        elif self.graph is None:
            # The first step runs eagerly (it compiles every kernel); then capture. Capture
            # records launches without running them, so the state is updated once.
            self._body()
            torch.cuda.synchronize(self.backend.device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._body()
        else:
            self.graph.replay()
        self._pending += 1
        return self.rt.output.as_tensor()

    def flush_stats(self) -> None:
        """Add the device-side counts of the steps so far into the ops' OpStats."""
        if not self._pending:
            return
        tot = self.totals.tolist()
        self.totals.zero_()
        frames, self._pending = self._pending, 0
        st = self.rt.input_op.stats
        st.frames += frames
        st.changed_out += tot[0][1]
        # An op's changed outputs are its first consumer's active inputs from it (none:
        # unknown); a consumer of several inputs counts each input after the first apart.
        first_reader: dict[int, int] = {}
        for i, op in enumerate(self.rt.ops, start=1):
            for v in op.inputs:
                first_reader.setdefault(id(v.state), i)

        def changed(state: int) -> int:
            r = first_reader[state]
            others = self._others.get(r, [])
            if state in others:
                return tot[r][2 + others.index(state)]
            return tot[r][1] - sum(tot[r][2 : 2 + len(others)])

        for (rows, act, *_), op in zip(tot[1 : 1 + len(self.rt.ops)], self.rt.ops, strict=True):
            st = op.stats
            if id(op.out.state) in first_reader:
                st.changed_out += changed(id(op.out.state))
            elif op.out.state is self.rt.output.state:
                st.changed_out += tot[-1][1]
            st.frames += frames
            st.rows_computed += rows
            st.active_in += act
            st.effective_macs += rows * st.macs_per_row
            if st.in_rows:
                st.delta_macs += st.dense_macs_per_frame * act / st.in_rows
