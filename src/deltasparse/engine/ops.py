"""Runtime ops of the delta engine: state buffers, row selection, compute, chain, commit.

Exactness (DESIGN.md §4). An op never *accumulates* deltas: when an input
pixel changes, the op recomputes the outputs whose window contains it **from the stored
current inputs** (gather the reachable rows -> dense GEMM), applies its fused pointwise chain
(activation, quantiser) and overwrites those rows of its state. Every stored value is
therefore a function of the current inputs only -- the same function the dense model
computes, up to float summation order -- so there is no temporal error to accumulate and
no drift, however long the stream. For 1x1 convs and linears this costs exactly the ideal
(changed rows x C_in x C_out); for k x k convs it costs the reachable output rows x full
fan-in. A quantiser output that did not change is not propagated: the next op only sees
the rows whose value changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._opset import ACTIVATION_BY_NAME
from .kernels import Backend, ConvSpec, LinearSpec, PoolSpec
from .kernels.base import HALF, opmath
from .kernels.geometry import reached_samples
from .plan import ChainOp, UnsupportedOpError

__all__ = ["InputGateOp", "OpStats", "RuntimeOp", "Value"]

_EMPTY = torch.empty(0)


class _State:
    __slots__ = ("buf", "changed")

    def __init__(self, buf: torch.Tensor) -> None:
        self.buf = buf
        self.changed: torch.Tensor | None = None  # None: every row (first frame)


class Value:
    """The stored state of one activation map: rows ``(B*H*W + 1, C)``, last row zero.

    Values made with :meth:`alias` (flatten of a ``(B, C, 1, 1)`` map) share the state.
    """

    def __init__(self, name: str, shape: tuple[int, ...], device, dtype,
                 state: _State | None = None, layout: str = "nchw") -> None:  # fmt: skip
        self.name = name
        self.shape = tuple(int(s) for s in shape)  # (B, C, H, W) or (B, F)
        # "nhwc": the model's tensor is this map permuted to (B, H, W, C) (the same rows; as
        # after ConvNeXt's permute, where a Linear and a LayerNorm act on the channels)
        if layout not in ("nchw", "nhwc") or (layout == "nhwc" and len(self.shape) != 4):
            raise ValueError(f"engine value layout {layout!r} for shape {self.shape}")
        self.layout = layout
        if len(self.shape) == 4:
            b, c, h, w = self.shape
        elif len(self.shape) == 2:
            (b, c), h, w = self.shape, 1, 1
        else:
            raise ValueError(f"engine values are (B, C, H, W) or (B, F), got {self.shape}")
        self.batch, self.channels, self.hw = b, c, (h, w)
        self.rows = b * h * w
        if state is None:
            state = _State(torch.zeros(self.rows + 1, c, device=device, dtype=dtype))
        self.state = state

    @property
    def buf(self) -> torch.Tensor:
        return self.state.buf

    @property
    def changed(self) -> torch.Tensor | None:
        return self.state.changed

    @changed.setter
    def changed(self, v: torch.Tensor | None) -> None:
        self.state.changed = v

    def alias(self, name: str, shape: tuple[int, ...], layout: str = "nchw") -> Value:
        return Value(name, shape, None, None, state=self.state, layout=layout)

    @property
    def model_shape(self) -> tuple[int, ...]:
        """The shape of the model's tensor: ``(B, H, W, C)`` for an ``nhwc`` value."""
        if self.layout == "nhwc":
            b, c, h, w = self.shape
            return (b, h, w, c)
        return self.shape

    @property
    def spatial(self) -> bool:
        return len(self.shape) == 4

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()

    def dense_bytes(self) -> int:
        return self.rows * self.channels * self.buf.element_size()

    def as_tensor(self) -> torch.Tensor:
        """A fresh tensor in the model's layout (NCHW, NHWC or (B, F))."""
        x = self.buf[: self.rows]
        if not self.spatial:
            return x.clone()
        b, c, h, w = self.shape
        if self.layout == "nhwc":
            return x.reshape(b, h, w, c).clone()
        # clone: for a 1x1 (or one-channel) map the permuted view is already contiguous, and
        # contiguous() would hand out the live state
        return x.view(b, h, w, c).permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


@dataclass
class OpStats:
    name: str
    kind: str
    kernel: str
    dense_macs_per_frame: int = 0
    macs_per_row: int = 0
    out_rows: int = 0
    in_rows: int = 0
    frames: int = 0
    dense_frames: int = 0
    rows_computed: int = 0
    active_in: int = 0
    changed_out: int = 0
    effective_macs: int = 0
    delta_macs: float = 0.0
    time_s: float = 0.0

    def to_dict(self) -> dict:
        f = max(self.frames, 1)
        return {
            "name": self.name,
            "kind": self.kind,
            "kernel": self.kernel,
            "frames": self.frames,
            "dense_frames": self.dense_frames,
            "dense_macs": self.dense_macs_per_frame * self.frames,
            "effective_macs": self.effective_macs,
            "delta_macs": self.delta_macs,
            "input_density": self.active_in / (self.in_rows * f) if self.in_rows else None,
            "computed_density": self.rows_computed / (self.out_rows * f) if self.out_rows else None,
            "output_density": self.changed_out / (self.out_rows * f) if self.out_rows else None,
            "time_s": self.time_s,
        }


def _union(parts: list[torch.Tensor], n: int) -> torch.Tensor:
    nonempty = [p for p in parts if p.numel()]
    if not nonempty:
        return parts[0]
    parts = nonempty
    if len(parts) == 1:
        return parts[0]
    mask = torch.zeros(n, dtype=torch.bool, device=parts[0].device)
    for p in parts:
        mask[p] = True
    return mask.nonzero().squeeze(1)


def _empty_rows(device=None) -> torch.Tensor:
    return torch.empty(0, dtype=torch.long, device=device)


class Chain:
    """The fused pointwise ops of one runtime op, applied in place to computed rows.

    ``layout`` is the layout of the op's value (``"nhwc"``: the model's tensor is channels-last,
    so a gate's "channels" are its dim 1, the map's rows)."""

    def __init__(self, ops: list[ChainOp], out_shape: tuple[int, ...], device, dtype,
                 layout: str = "nchw") -> None:  # fmt: skip
        self.steps: list[tuple] = []
        # the state's dtype; the steps' constants are in the dtype they compute in (float32
        # for a half-precision state, whose chain runs in float32, rounded after each step)
        self.dtype = dtype
        dtype = opmath(dtype)
        spatial = len(out_shape) == 4
        hw = out_shape[2] * out_shape[3] if spatial else 1
        self.hw = hw
        channels = self.channels = out_shape[1]
        for op in ops:
            if op.kind == "clamp":
                self.steps.append(("clamp", op.params["lo"], op.params["hi"]))
            elif op.kind == "bn":
                if layout == "nhwc":  # BatchNorm2d acts on the tensor's dim 1: H here
                    raise UnsupportedOpError(
                        f"DeltaEngine: batch norm '{op.name}' on a channels-last tensor "
                        "normalises its dim 1 (H), not the map's channels")
                bn = op.params["bn"]
                alpha, beta = _bn_affine(bn, out_shape[1], device, dtype)
                self.steps.append(("affine", alpha, beta))
            elif op.kind == "affine":
                alpha = _channel_vector(op.params["scale"].detach(), out_shape, layout, op.name)
                # one factor per channel (a number too: the device kernels read C factors);
                # cloned: the parameter as it is now, not a live view
                alpha = alpha.to(device=device, dtype=dtype).expand(channels).clone()
                self.steps.append(("affine", alpha, torch.zeros_like(alpha)))
            elif op.kind == "act":
                p = {k: (v.detach().to(device=device, dtype=dtype).clone()
                         if isinstance(v, torch.Tensor) else v)
                     for k, v in op.params.items() if k != "act"}  # fmt: skip
                w = p.get("weight")
                if w is not None and (w.numel() not in (1, channels)
                                      or (layout == "nhwc" and w.numel() > 1)):  # fmt: skip
                    raise UnsupportedOpError(
                        f"DeltaEngine: {op.params['act']} '{op.name}' has {w.numel()} weights "
                        f"for {channels} channels"
                        + (" (on a channels-last tensor they run along H)"
                           if layout == "nhwc" else "")
                    )
                name = op.params["act"]
                self.steps.append(("act", ACTIVATION_BY_NAME[name].apply, p, name))
            elif op.kind == "layernorm":
                self.steps.append(_layernorm_step(op, out_shape, layout, device, dtype))
            elif op.kind == "quant":
                layer = op.params["layer"]
                if layer.activation == "relu":
                    self.steps.append(("clamp", 0.0, None))
                elif layer.activation == "relu6":
                    self.steps.append(("clamp", 0.0, 6.0))
                thr = layer.threshold.detach().to(device=device, dtype=torch.float32)
                per_row = False
                if layout == "nhwc":
                    if layer.gate == "pixel":
                        raise UnsupportedOpError(
                            f"DeltaEngine: a pixel gate '{op.name}' on a channels-last tensor "
                            "gates the model's dim 1 (H), not the map's pixels; use "
                            "gate='scalar' there"
                        )
                    if thr.dim():  # the model's dim 1 is H: a step per (y, x, c) row entry
                        _, c, h, w = out_shape
                        full = thr.reshape(*thr.shape, *([1] * (3 - thr.dim())))
                        thr = full.expand(h, w, c).reshape(h * w, c).contiguous()
                        per_row = True
                elif thr.dim() > 1:  # neuron granularity on a (C, H, W) map -> (H*W, C)
                    thr = thr.reshape(thr.shape[0], -1).t().contiguous()
                    per_row = True
                if layer.mode == "hysteresis":
                    # compared with the stored value (the last one sent): needs the state
                    self.steps.append(("hyst", thr, per_row, layer.gate == "pixel"))
                else:
                    self.steps.append(("quant", thr, per_row))
            else:  # pragma: no cover - plan only emits the kinds above
                raise AssertionError(op.kind)

    @property
    def gated(self) -> bool:
        """Whether the chain ends in a quantiser or gate (it decides which rows change)."""
        return bool(self.steps) and self.steps[-1][0] in ("quant", "hyst")

    @property
    def stateful(self) -> bool:
        """Whether the chain reads the stored values (a hysteresis gate)."""
        return any(step[0] == "hyst" for step in self.steps)

    @property
    def fused(self) -> tuple | None:
        """``(lo, hi, thr, thr_mode, gate)`` when the chain is ``[clamp]? [quant|hyst]?`` (else
        None). ``gate``: 0 grid quantiser (or none), 1 scalar hysteresis, 2 pixel hysteresis."""
        steps = list(self.steps)
        lo, hi = float("-inf"), float("inf")
        if steps and steps[0][0] == "clamp":
            lo = float("-inf") if steps[0][1] is None else float(steps[0][1])
            hi = float("inf") if steps[0][2] is None else float(steps[0][2])
            steps.pop(0)
        if not steps:
            return lo, hi, _EMPTY, 0, 0
        if len(steps) == 1 and steps[0][0] in ("quant", "hyst"):
            thr, per_row = steps[0][1], steps[0][2]
            mode = 3 if per_row else (1 if thr.dim() == 0 else 2)
            gate = 0 if steps[0][0] == "quant" else (2 if steps[0][3] else 1)
            return lo, hi, thr.reshape(-1).contiguous(), mode, gate
        return None

    def _row_thr(self, thr: torch.Tensor, per_row: bool, rows, n: int, batch: int):
        """The step broadcast against ``n`` computed rows (``rows is None``: all rows)."""
        if not per_row:
            return thr
        if rows is None:
            return thr.repeat(batch, 1)
        return thr.index_select(0, rows % self.hw)

    def __call__(self, z: torch.Tensor, rows: torch.Tensor | None, batch: int,
                 buf: torch.Tensor | None = None) -> None:  # fmt: skip
        """Apply the chain in place to ``z`` (the new values of ``rows``, or of all rows);
        ``buf`` is the op's stored state, read by hysteresis gates (zeros before a stream).
        A float32 ``z`` of a half-precision chain is rounded to its dtype after each step."""
        rounds = self.dtype in HALF and z.dtype != self.dtype
        for step in self.steps:
            self._apply(step, z, rows, batch, buf)
            if rounds:
                z.copy_(z.to(self.dtype))

    def _apply(self, step: tuple, z: torch.Tensor, rows, batch: int, buf) -> None:
        if step[0] == "clamp":
            z.clamp_(step[1], step[2])
        elif step[0] == "affine":
            z.mul_(step[1]).add_(step[2])
        elif step[0] == "act":
            z.copy_(step[1](z, step[2]))
        elif step[0] == "ln":
            z.copy_(F.layer_norm(z, (z.shape[1],), step[1], step[2], step[3]))
        elif step[0] == "quant":
            thr = step[1]
            if step[2]:
                if rows is None:
                    zz = z.view(batch, self.hw, -1)
                    zz.div_(thr).round_().mul_(thr)
                    return
                thr = thr.index_select(0, rows % self.hw)
            # quantize(): round(a / thr) * thr, round half to even, in the engine's dtype
            # (float32 for half precision, as DeltaActivation) on every backend (the Triton
            # kernels too); a float64 engine can thus differ from DeltaActivation, which
            # rounds in float32, by a flip at a boundary.
            z.div_(thr).round_().mul_(thr)
        else:  # hysteresis_step(): send where |a - ref| > thr (float32), else keep ref
            if buf is None:
                raise AssertionError("a hysteresis gate needs the stored values")
            n = z.shape[0]
            old = buf[:n] if rows is None else buf.index_select(0, rows)
            thr = self._row_thr(step[1], step[2], rows, n, batch)
            send = (z.float() - old.float()).abs() > thr
            if step[3]:
                send = send.any(1, keepdim=True)
            torch.where(send, z, old, out=z)


def _channel_vector(t: torch.Tensor, shape: tuple[int, ...], layout: str, name: str):
    """A constant that multiplies a map, as one factor per channel of its rows (``(1,)`` for a
    number); anything that varies along other dims is refused."""
    c = shape[1]
    if t.numel() == 1:
        return t.reshape(1)
    # the broadcast shape of a per-channel constant in the model's layout
    per_channel = (c, 1, 1) if len(shape) == 4 and layout == "nchw" else (c,)
    dims = tuple(t.shape)
    while len(dims) > len(per_channel) and dims[0] == 1:
        dims = dims[1:]
    if dims != per_channel:
        raise UnsupportedOpError(
            f"DeltaEngine: '{name}' multiplies by a constant of shape {tuple(t.shape)}; only "
            f"numbers and per-channel constants {per_channel} are supported"
        )
    return t.reshape(c)


def _layernorm_step(op: ChainOp, shape: tuple[int, ...], layout: str, device, dtype) -> tuple:
    """``("ln", weight, bias, eps)``: LayerNorm over the channels of each row."""
    p, c = op.params, shape[1]
    over_channels = (p["axis"] == "channels" and len(shape) == 4 and layout == "nchw") or (
        p["axis"] == "last" and (layout == "nhwc" or len(shape) == 2))
    if not over_channels or tuple(p["shape"]) != (c,):
        what = "the channels (dim 1)" if p["axis"] == "channels" else "the last dim"
        raise UnsupportedOpError(
            f"DeltaEngine: LayerNorm '{op.name}' over {what} of {tuple(p['shape'])} on a "
            f"{layout} map of shape {shape}: only a LayerNorm over the channels of each pixel "
            "(LayerNorm2d on NCHW, nn.LayerNorm on NHWC or (B, F)) is supported"
        )

    def t(v):  # the parameter as it is now (a copy: re-read at every reset)
        return None if v is None else v.detach().to(device=device, dtype=dtype).clone()

    return ("ln", t(p["weight"]), t(p["bias"]), p["eps"])


def _bn_affine(bn, channels: int, device, dtype):
    """PyTorch's eval-mode batch norm as ``x * alpha + beta`` (its own CPU formulation)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"DeltaEngine: {type(bn).__name__} without running statistics "
            "(track_running_stats=False) uses batch statistics at inference; not supported"
        )
    invstd = 1.0 / torch.sqrt(bn.running_var.detach().float() + bn.eps)
    w = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(invstd)
    b = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(invstd)
    alpha = invstd * w
    beta = b - bn.running_mean.detach().float() * alpha
    return alpha.to(device=device, dtype=dtype), beta.to(device=device, dtype=dtype)


class RuntimeOp:
    """One engine op: choose rows -> compute (backend) -> chain -> commit into ``out``."""

    kernel = "pointwise"
    # True where the rows are computed exactly as selected (the CUDA-graph step: no crossover
    # to the dense path, no padding to a kernel's tile); set by ExecutedPredictor only.
    exact_rows: bool = False
    bias: torch.Tensor | None = None

    def __init__(self, name: str, kind: str, inputs: list[Value], out: Value, chain: Chain,
                 backend: Backend, crossover: dict[str, float]) -> None:  # fmt: skip
        self.name, self.kind = name, kind
        self.inputs, self.out, self.chain = inputs, out, chain
        self.backend = backend
        self.crossover = crossover.get(self.kernel, 0.5) if backend.sparse else 0.0
        self.stats = OpStats(name, kind, self.kernel, out_rows=out.rows,
                             in_rows=sum(v.rows for v in inputs))  # fmt: skip

    # -- to override -------------------------------------------------------------------
    def select(self) -> torch.Tensor | None:
        """Output rows to recompute (inputs' changes are known); None = all."""
        return _union([v.changed for v in self.inputs], self.out.rows)

    def compute(self, rows: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def compute_commit(self, rows: torch.Tensor | None, first: bool):
        """``compute`` and the backend's ``finish`` in one kernel, where the backend has one
        for this op (the changed rows, as ``finish`` returns them); else NotImplemented."""
        return NotImplemented

    # -- driver ------------------------------------------------------------------------
    def _too_dense(self, n: int, total: int) -> bool:
        return n > self.crossover * total

    def plan(self, first: bool) -> tuple[torch.Tensor | None, int] | None:
        """The engine's row selection for one step, with its counts in ``self.stats``.

        ``None`` when no input changed (nothing to do); else ``(rows, n)``: the output rows to
        recompute (``None``: all of them, the dense path) and how many. The crossover to the
        dense path is taken here, from the inputs' changed rows alone, so that
        :class:`~deltasparse.engine.predict.ExecutedPredictor` can apply the same rules to the
        changes of a dense model without computing anything.
        """
        st = self.stats
        st.frames += 1
        if first or any(v.changed is None for v in self.inputs):
            active = sum(v.rows for v in self.inputs)
            rows = None
        else:
            active = sum(int(v.changed.numel()) for v in self.inputs)
            if active == 0 and self.backend.sparse:
                return None
            if self.backend.sparse and not self._too_dense(active, st.in_rows):
                rows = self.select()
                if rows is not None and self._too_dense(int(rows.numel()), self.out.rows):
                    rows = None
            else:
                rows = None
        n = self.out.rows if rows is None else int(rows.numel())
        st.active_in += active
        st.rows_computed += n
        st.dense_frames += rows is None
        computed = n if self.exact_rows else self.backend.rows_computed(
            self.kernel, n, self.out.rows, st.macs_per_row)
        st.effective_macs += computed * st.macs_per_row
        if st.in_rows:
            st.delta_macs += st.dense_macs_per_frame * active / st.in_rows
        return rows, n

    def run(self, first: bool) -> None:
        t0 = time.perf_counter()
        st = self.stats
        planned = self.plan(first)
        rows, n = (None, 0) if planned is None else planned
        if n:
            changed = self.compute_commit(rows, first)
            if changed is NotImplemented:
                z = self.compute(rows)
                changed = self.backend.finish(self.out, rows, z, self.chain, first, self.bias)
            self.out.changed = changed
            if first:
                st.changed_out += self.out.rows
            else:
                st.changed_out += int(self.out.changed.numel())
        else:
            self.out.changed = _empty_rows(self.out.buf.device)
        st.time_s += time.perf_counter() - t0


class InputOp(RuntimeOp):
    kernel = "input"
    prev: torch.Tensor | None = None
    # False when every consumer of the frame is a gate that examines all pixels anyway (an
    # input gate): finding the changed pixels first would only cost a pass.
    detect: bool = True
    # True when the one reader is an InputGateOp, which reads the NCHW frame itself (in the
    # same pass as its gate): this op only hands the frame on, its rows are never stored.
    deferred: bool = False
    frame: torch.Tensor | None = None

    def set_frame(self, frame: torch.Tensor, first: bool) -> None:
        """Store the frame as rows (or, ``deferred``, keep the frame for the fused input gate);
        the changed pixels are found on the NCHW frame itself so that a mostly static frame
        is not transposed in full (C is tiny: a strided copy)."""
        t0 = time.perf_counter()
        v = self.out
        b, c = frame.shape[:2]
        st = self.stats
        st.frames += 1
        if self.deferred:
            self.frame = frame.contiguous()
            v.changed = None
            st.changed_out += v.rows
        elif first or self.prev is None or not self.detect:
            v.buf[: v.rows].copy_(frame.permute(0, 2, 3, 1).reshape(v.rows, c))
            if self.detect:
                if self.prev is not None and self.prev.shape == frame.shape:
                    # in place: a dense step captured in a CUDA graph keeps writing this buffer
                    # (a tensor allocated during a capture holds nothing until a replay)
                    self.prev.copy_(frame)
                else:
                    self.prev = frame.contiguous().clone()
            v.changed = None
            st.changed_out += v.rows
        else:
            ne = (frame != self.prev).view(b, c, -1)
            mask = ne[:, 0].clone()
            for k in range(1, c):
                mask |= ne[:, k]
            changed = mask.view(-1).nonzero().squeeze(1)
            n = int(changed.numel())
            if n > v.rows // 4:
                v.buf[: v.rows].copy_(frame.permute(0, 2, 3, 1).reshape(v.rows, c))
            elif n:
                hw = v.rows // b
                rows = frame.reshape(b, c, hw)[changed // hw, :, changed % hw]
                v.buf.index_copy_(0, changed, rows)
            self.prev.copy_(frame)
            v.changed = changed
            st.changed_out += n
        st.time_s += time.perf_counter() - t0


class PointwiseOp(RuntimeOp):
    kernel = "pointwise"

    def compute(self, rows):
        x = self.inputs[0].buf
        if rows is None:
            # a backend whose epilogue only reads z (the fused C++ one) needs no copy
            view = x[: self.out.rows]
            return view if self.backend.finish_reads_only(self.chain, view) else view.clone()
        return x.index_select(0, rows)


class InputGateOp(PointwiseOp):
    """A gate right on the input pixels, the input op's only reader, reading the NCHW frame
    itself (the C++ backend's ``frame_gate``: one pass over the frame instead of a
    transposing copy and a pass over all rows; the input's rows are not stored, nothing else
    reads them). Every pixel is examined each frame, as :class:`PointwiseOp` does when the
    input op does not detect changes."""

    def __init__(self, *a, source: InputOp, **kw) -> None:
        super().__init__(*a, **kw)
        self.source = source
        source.deferred = True

    def run(self, first: bool) -> None:
        t0 = time.perf_counter()
        self.plan(first)  # the input's changed rows are None: every pixel, as PointwiseOp
        out = self.out
        out.changed = self.backend.frame_gate(self.source.frame, self.inputs[0], out,
                                              self.chain, first)  # fmt: skip
        self.stats.changed_out += out.rows if first else int(out.changed.numel())
        self.stats.time_s += time.perf_counter() - t0


class LinearOp(RuntimeOp):
    """``Linear`` or a 1x1 stride-1 conv: output row r depends on input row r only."""

    kernel = "linear"

    def __init__(self, *a, spec: LinearSpec, **kw) -> None:
        super().__init__(*a, **kw)
        self.spec, self.bias = spec, spec.bias
        self.stats.macs_per_row = spec.macs_per_row
        self.stats.dense_macs_per_frame = spec.macs_per_row * self.out.rows

    def select(self):
        return self.inputs[0].changed

    def compute(self, rows):
        return self.backend.linear(self.inputs[0].buf, self.spec, rows)

    def compute_commit(self, rows, first):
        return self.backend.linear_commit(self.inputs[0].buf, self.spec, rows, self.out,
                                          self.chain, first)  # fmt: skip


class ConvOp(RuntimeOp):
    kernel = "conv"

    def __init__(self, *a, spec: ConvSpec, **kw) -> None:
        self.kernel = "depthwise" if spec.depthwise else "conv"
        super().__init__(*a, **kw)
        self.spec, self.bias = spec, spec.bias
        self.stats.macs_per_row = spec.macs_per_row
        self.stats.dense_macs_per_frame = spec.macs_per_row * self.out.rows

    def select(self):
        return self.spec.geom.reachable(self.inputs[0].changed)

    def compute(self, rows):
        fn = self.backend.depthwise if self.spec.depthwise else self.backend.conv
        return fn(self.inputs[0].buf, self.spec, rows)

    def compute_commit(self, rows, first):
        return self.backend.conv_commit(self.inputs[0].buf, self.spec, rows, self.out,
                                        self.chain, first)  # fmt: skip


class PoolOp(RuntimeOp):
    kernel = "pool"

    def __init__(self, *a, spec: PoolSpec, **kw) -> None:
        super().__init__(*a, **kw)
        self.spec = spec

    def select(self):
        return self.spec.geom.reachable(self.inputs[0].changed)

    def compute(self, rows):
        return self.backend.pool(self.inputs[0].buf, self.spec, rows)

    def compute_commit(self, rows, first):
        return self.backend.pool_commit(self.inputs[0].buf, self.spec, rows, self.out,
                                        self.chain, first)  # fmt: skip


class SampleOp(RuntimeOp):
    """Ops whose output row is a whole sample: global average pooling and flatten."""

    kernel = "pointwise"

    def __init__(self, *a, mode: str, **kw) -> None:
        super().__init__(*a, **kw)
        self.mode = mode  # "mean" | "flatten"

    def select(self):
        x = self.inputs[0]
        return reached_samples(x.changed, x.batch, x.hw)

    def compute(self, rows):
        x = self.inputs[0]
        (h, w), c = x.hw, x.channels
        m = x.buf[: x.rows].view(x.batch, h * w, c)
        if rows is not None:
            m = m.index_select(0, rows)
        if self.mode == "mean":
            return (m.float() if m.dtype in HALF else m).mean(1)  # finish rounds the mean
        return m.view(-1, h, w, c).permute(0, 3, 1, 2).reshape(m.shape[0], c * h * w)

    def compute_commit(self, rows, first):
        if self.mode != "mean":
            return NotImplemented
        return self.backend.gpool_commit(self.inputs[0], rows, self.out, self.chain, first)


def _rows_of_both(op: RuntimeOp, rows):
    """The stored rows ``rows`` (``None``: all) of an op's two inputs of one shape."""
    a, b = (v.buf for v in op.inputs)
    if rows is None:
        p = op.out.rows
        return a[:p], b[:p]
    return a.index_select(0, rows), b.index_select(0, rows)


class AddOp(RuntimeOp):
    def compute(self, rows):
        a, b = _rows_of_both(self, rows)
        return a + b


class MulOp(RuntimeOp):
    """The elementwise product of two maps of the same shape, or of a map ``(B, C, H, W)`` and a
    per-sample scale ``(B, C, 1, 1)`` (squeeze-excitation: ``x * sigmoid(mlp(mean(x)))``).

    A scale row is a whole sample: when the scale of sample ``b`` changed (in any channel, as
    it does when any pixel of ``b`` changed and no gate holds the scale), every row of ``b`` is
    recomputed, and counted so (no MACs, but the next op sees those rows change)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        x, y = self.inputs
        # the operand that is one row per sample (None: both are maps of the same shape)
        self.scale = None if x.rows == y.rows else (0 if x.rows < y.rows else 1)
        self.hw = self.out.rows // self.out.batch

    def select(self):
        parts = []
        for i, v in enumerate(self.inputs):
            ch = v.changed
            if i == self.scale and ch.numel():
                ch = (ch[:, None] * self.hw + torch.arange(self.hw, device=ch.device)).reshape(-1)
            parts.append(ch)
        return _union(parts, self.out.rows)

    def compute(self, rows):
        if self.scale is None:
            a, b = _rows_of_both(self, rows)
            return a * b
        s = self.inputs[self.scale].buf
        m = self.inputs[1 - self.scale].buf
        if rows is None:
            p, c = self.out.rows, m.shape[1]
            return (m[:p].view(-1, self.hw, c) * s[: self.out.batch, None]).view(p, c)
        return m.index_select(0, rows) * s.index_select(0, rows // self.hw)


class UpsampleOp(RuntimeOp):
    """Nearest or bilinear upsampling: output row ``r`` is ``sum_k w[r, k] * x[idx[r, k]]``
    over its ``K`` source rows (1 or 4, ``geometry.upsample_sources``); the rows recomputed are
    those with a changed source."""

    kernel = "pool"

    def __init__(self, *a, idx: torch.Tensor, weight: torch.Tensor | None, **kw) -> None:
        super().__init__(*a, **kw)
        self.idx, self.weight = idx, weight  # weight None: nearest (a copy)

    def select(self):
        x = self.inputs[0]
        mask = torch.zeros(x.rows, dtype=torch.bool, device=x.buf.device)
        mask[x.changed] = True
        hit = mask.index_select(0, self.idx.view(-1)).view(self.idx.shape).any(1)
        return hit.nonzero().squeeze(1)

    def compute(self, rows):
        x = self.inputs[0].buf
        idx = self.idx if rows is None else self.idx.index_select(0, rows)
        g = x.index_select(0, idx.view(-1)).view(idx.shape[0], idx.shape[1], x.shape[1])
        if self.weight is None:
            return g[:, 0]
        w = self.weight if rows is None else self.weight.index_select(0, rows)
        if g.dtype in HALF:  # in float32 (the weights are); finish rounds the sum
            g = g.float()
        z = g[:, 0] * w[:, :1]
        for k in range(1, idx.shape[1]):  # the same order on every path: history independent
            z += g[:, k] * w[:, k : k + 1]
        return z


class CatOp(RuntimeOp):
    def compute(self, rows):
        if rows is None:
            p = self.out.rows
            return torch.cat([v.buf[:p] for v in self.inputs], dim=1)
        return torch.cat([v.buf.index_select(0, rows) for v in self.inputs], dim=1)


class FallbackOp(RuntimeOp):
    """An op the engine has no kernel for, run densely whenever one of its inputs changed."""

    kernel = "fallback"

    def __init__(self, *a, fn, **kw) -> None:
        super().__init__(*a, **kw)
        self.fn = fn  # list of NCHW tensors -> NCHW tensor
        self.crossover = 0.0

    def compute(self, rows):
        y = self.fn([v.as_tensor() for v in self.inputs])
        if y.dim() == 4:
            y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
        return y.contiguous()
