"""The Delta Activation Layer (Yousefzadeh & Sifalakis, arXiv 2107.07305), DESIGN.md §1, with
gates at the granularity the delta engine skips (DESIGN.md §4).

Quantises activations with a learnable step ``thr = |theta|`` and penalises their
frame-to-frame changes, so that a trained network changes few activations between frames.
Rounding is straight-through for the input; the step gets the paper's gradient
``dq/dthr = -round(a / thr)``.

Exact semantics of the options (``a`` is the activated input of one frame, ``(N, C, ...)``;
a *pixel* is one row of the channels-last map: all ``C`` channels at one position, or the
whole feature vector of a ``(N, F)`` input):

``mode="grid"`` (the paper, default): ``q_t = round(a_t / thr) * thr``, stateless.

``mode="hysteresis"`` (sigma-delta neurons, as in lava-dl and DeltaCNN's inference): a
reference ``ref`` (the last value sent) starts at zero before the first frame of a clip or
stream; at each frame ``send = |a_t - ref| > thr`` (float32, elementwise), for
``gate="pixel"`` widened to the whole pixel (``send.any(channels)``, i.e. the max over channels
of ``|a_t - ref| / thr`` exceeds 1, DeltaCNN's rule); then ``ref = where(send, a_t, ref)`` and the
output is ``q_t = ref``. The output depends on history; its error is bounded by the step:
``|q_t - a_t| <= thr`` for every scalar, at every frame (the first included).

``gate="scalar"`` (default) counts and penalises single changed scalars (the paper).
``gate="pixel"`` counts and penalises whole pixels, as the engine executes them: a pixel with
any nonzero delta counts as ``C`` changed scalars; the loss is the group norm
``w * fan_out * sum_p sqrt(C) * ||d_p||_2 / numel(d)`` over pixels ``p`` (equal to the scalar
loss when all channels of a pixel change alike; smaller when changes are concentrated in
few pixels). With :attr:`DeltaActivation.spread` set (``convert()`` sets it for every pixel
gate whose consumers it can follow), the loss counts what the engine executes instead:
``w * sum_r macs_r * max_{p in win(r)} ||d_p||_2 / sqrt(C) / numel(d)`` over the output rows
``r`` of every consumer (``win(r)``: the pixels of this layer that row reads, through pools;
``macs_r``: the consumer's MACs per row), so a change costs every row it reaches, at the
largest change in the row's window; ``fan_out`` then does not enter the loss (it still scales
the counts). In grid mode the forward of both gates is the same quantiser.

Gradients (every mode and gate, one rule): ``dq/da = 1`` (straight-through) and
``dq/dthr = -q / thr`` (in grid mode exactly the paper's ``-round(a / thr)``): with the sparsity
loss alone, gradient descent raises the step.

Clips ``(B, T, C, ...)`` are processed with their time axis (hysteresis unrolled over ``T``).
Frames outside a clip (the per-frame model): grid layers are plain quantisers. Hysteresis
layers are stateless there too -- each call is the first frame of a stream (reference zero) --
unless streaming is switched on with :func:`streaming`: then they keep their reference from
call to call, one call per time step, and the per-frame model is the dense streaming model
that the delta engine reproduces; :func:`reset_state` starts new streams.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ._base import LayerStats, SparsityLayer, count_nonzero
from .token import TokenDelta

__all__ = ["DeltaActivation", "hysteresis_step", "is_stateful", "quantize", "reset_state",
           "streaming"]  # fmt: skip

GRANULARITIES = ("layer", "channel", "neuron")
ACTIVATIONS = (None, "relu", "relu6")
GATES = ("scalar", "pixel")
MODES = ("grid", "hysteresis")


def quantize(a: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """``round(a / thr) * thr`` in float32 (round half to even), cast back to ``a.dtype``."""
    return (torch.round(a.float() / thr.float()) * thr.float()).to(a.dtype)


def hysteresis_step(
    a: torch.Tensor, ref: torch.Tensor, thr: torch.Tensor, pixel: bool
) -> torch.Tensor:
    """One frame of the hysteresis gate on ``(N, C, ...)``: the new reference (= output).

    ``send = |a - ref| > thr`` in float32; with ``pixel`` a whole pixel (all of dim 1) is sent
    when any of its channels is; sent entries take ``a``, the others keep ``ref``.
    """
    diff = (a.float() - ref.float()).abs_()  # a new tensor: abs in place
    if pixel:
        # any_c(|d_c| > thr_c) as max_c(|d_c| - thr_c) > 0: the same decision (an IEEE
        # difference is > 0 exactly when x > y), ~3x faster on CPU than any() over a bool map
        # (for finite values: a NaN channel makes the pixel's max NaN, and it is not sent)
        send = diff.sub_(thr.float()).amax(dim=1, keepdim=True) > 0
    else:
        send = diff > thr.float()
    return torch.where(send, a, ref.to(a.dtype))


class _StraightThrough(torch.autograd.Function):
    """Returns ``y`` exactly; backward ``dy/da = 1`` and ``dy/dthr = -levels`` (``y / thr``)."""

    @staticmethod
    def forward(ctx, a, thr, thr_shape, y, levels):
        ctx.save_for_backward(levels)
        ctx.thr_shape = thr_shape
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (levels,) = ctx.saved_tensors
        grad_thr = None
        if ctx.needs_input_grad[1]:
            g = -(grad_y.float() * levels)
            grad_thr = g.sum_to_size(ctx.thr_shape) if ctx.thr_shape != g.shape else g
        return grad_y, grad_thr, None, None, None


class _Quantize(torch.autograd.Function):
    """Forward: ``round(a/thr)*thr``. Backward: ``dq/da = 1``, ``dq/dthr = -round(a/thr)``."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, thr: torch.Tensor, thr_shape: torch.Size):
        levels = torch.round(a.float() / thr.float())
        ctx.save_for_backward(levels)
        ctx.thr_shape = thr_shape
        return (levels * thr.float()).to(a.dtype)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor):
        (levels,) = ctx.saved_tensors
        grad_a = grad_q
        grad_thr = None
        if ctx.needs_input_grad[1]:
            g = -(grad_q.float() * levels)
            # Sum the broadcast dimensions back onto the threshold's own shape.
            grad_thr = g.sum_to_size(ctx.thr_shape) if ctx.thr_shape != g.shape else g
        return grad_a, grad_thr, None


class _GateDelta(torch.autograd.Function):
    """The gate on a clip ``(B, T, ...)`` fused with the temporal deltas and their loss sums.

    Returns ``q``, ``d = q[:, 1:] - q[:, :-1]``, the loss sum (float32: ``sum|d|`` for the scalar
    gate, ``sum_p sqrt(C) ||d_p||_2`` for the pixel gate) and the exact count of changed scalars
    (not differentiable; whole pixels for the pixel gate). Fusing them shares ``dloss/dd``
    between the sum and the backward, and spares autograd the backward of two time slices (two
    zero-filled clip-sized tensors per layer): most of the layer's training cost on CPU.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, thr: torch.Tensor, thr_shape: torch.Size, mode: str,
                pixel: bool, weight_fn=None, spec=None):  # fmt: skip
        ctx.set_materialize_grads(False)
        tf = thr.float()
        if mode == "grid":
            levels = torch.div(a.float(), tf).round_()
            q = (levels * tf).to(a.dtype)
        else:
            q = torch.empty_like(a)
            ref = torch.zeros_like(a[:, 0])
            for t in range(a.shape[1]):
                ref = hysteresis_step(a[:, t], ref, tf, pixel)
                q[:, t] = ref
            levels = q.float() / tf
        d = q[:, 1:] - q[:, :-1]
        cpu = d.device.type == "cpu"
        factor = None
        if not pixel:
            s = torch.sgn(d)
            if d.dtype == torch.float32:  # sgn(d) * d == |d| exactly; one pass, no temporary
                loss_sum = torch.dot(s.reshape(-1), d.reshape(-1))
            else:
                loss_sum = d.abs().sum(dtype=torch.float32)
            finite = math.isfinite(loss_sum.item()) if cpu else None
            nonzero = count_nonzero(d, sgn=s, finite=finite)
        else:
            c = d.shape[2]
            df = d.float()
            # the channels' L2 norm; (d*d).sum is ~20x faster than linalg.vector_norm here
            norm = (df * df).sum(2, keepdim=True).sqrt_()
            loss_sum, factor, nonzero = _pixel_loss(norm, c, weight_fn, spec)
            # dloss/dd = d * factor: kept as d (an output anyway) and the per-pixel factor,
            # not as a clip-sized product (one pass and one tensor less per layer)
            s = d
        ctx.save_for_backward(levels, s, factor)
        ctx.thr_shape = thr_shape
        ctx.mark_non_differentiable(nonzero)
        return q, d, loss_sum, nonzero

    @staticmethod
    def backward(ctx, grad_q, grad_d, grad_loss_sum, _grad_nonzero):
        levels, s, factor = ctx.saved_tensors
        # dL/dq_t = grad_q_t + e_t - e_{t+1}, with e = dL/dd = grad_d + grad_loss_sum * s
        # (pixel gates: dloss/dd = s * factor, factor broadcast over the channels)
        g = grad_q
        if grad_loss_sum is not None and factor is not None:
            grad_loss_sum = factor * grad_loss_sum
        if grad_d is not None or grad_loss_sum is not None:
            if grad_q is None:
                grad_q = torch.zeros(levels.shape, dtype=s.dtype, device=s.device)
            g = torch.empty(levels.shape, dtype=grad_q.dtype, device=grad_q.device)
            g[:, :1] = grad_q[:, :1]
            if grad_d is None:  # the training case, without a temporary for e
                torch.addcmul(grad_q[:, 1:], s, grad_loss_sum, out=g[:, 1:])
                g[:, :-1].addcmul_(s, grad_loss_sum, value=-1)
            else:
                e = grad_d if grad_loss_sum is None else torch.addcmul(grad_d, s, grad_loss_sum)
                torch.add(grad_q[:, 1:], e, out=g[:, 1:])
                g[:, :-1].sub_(e)
        grad_thr = None
        if g is not None and ctx.needs_input_grad[1]:
            grad_thr = torch.mul(g.float(), levels).sum_to_size(ctx.thr_shape).neg_()
        return g, grad_thr, None, None, None, None, None


def _pixel_loss(norm: torch.Tensor, c: int, weight_fn, spec=None) -> tuple[torch.Tensor, ...]:
    """The pixel gate's loss sum ``sum_p W_p ||d_p|| / sqrt(C)`` from the per-pixel delta norms
    ``(B, T-1, 1, *spatial)``, the per-pixel factor of its gradient (``dloss/dd = d *
    factor``; float32, zero where nothing changed: sqrt(C)/norm overflows half precision) and
    the count of changed scalars (the changed pixels times ``C``).
    ``W_p = C`` (the plain group loss, times the layer's fan-out outside), or what ``weight_fn``
    gives (the executed MACs a change of pixel p triggers in the consumers, see
    :attr:`DeltaActivation.spread`). ``spec`` (see :meth:`DeltaActivation._loss_spec`): the
    same in one C++ pass (the weights bit for bit, the sum to float rounding)."""
    if spec is not None:
        loss_sum, factor, nonzero, _ = _pixel_loss_cpp()(norm.view(-1, *norm.shape[-2:]), spec, c)
        return loss_sum, factor.view(norm.shape), nonzero
    w = None if weight_fn is None else weight_fn(norm)
    if w is None:  # the plain group loss
        loss_sum = math.sqrt(c) * norm.sum()
        factor = math.sqrt(c) / norm.clamp_min(1e-30)
    else:
        loss_sum = (w * norm).sum() / math.sqrt(c)
        factor = w / (math.sqrt(c) * norm.clamp_min(1e-30))
    finite = math.isfinite(loss_sum.item()) if norm.device.type == "cpu" else None
    nonzero = count_nonzero(norm, finite=finite) * c
    return loss_sum, torch.where(norm > 0, factor, 0.0), nonzero


_ACT_CODES = {None: 0, "relu": 1, "relu6": 2}
_FUSED_MIN_POSITIONS = 16  # smaller maps: the torch path is faster (loops along positions)
_FUSED: dict = {}


def _pixel_loss_cpp():
    """``deltasparse::pixel_loss`` or None (built with the fused gate)."""
    if "loss" not in _FUSED:
        _FUSED["loss"] = None
        if _fused_gate_ops() is not None:
            from ..engine.kernels import cpp

            _FUSED["loss"] = cpp.pixel_loss_op()
    return _FUSED["loss"]


def _fused_gate_ops():
    """The C++ training gate (``engine/kernels/cpp.py``), or None; warns once when it failed
    to build (``DELTASPARSE_NO_CPP=1`` turns it off without a warning)."""
    if "ops" not in _FUSED:
        from ..engine.kernels import cpp  # here: the engine package imports the layers

        _FUSED["ops"] = cpp.gate_ops()
        if _FUSED["ops"] is None and cpp.build_error() is not None:
            import warnings

            warnings.warn(
                "DeltaActivation: the fused C++ training gate could not be built "
                f"({cpp.build_error()}); the layers train on the torch path, ~1.3-2x slower "
                "per layer (set DELTASPARSE_NO_CPP=1 to choose that path silently)",
                RuntimeWarning, stacklevel=3)  # fmt: skip
    return _FUSED["ops"]


class _GateDeltaFused(torch.autograd.Function):
    """:class:`_GateDelta` with the activation, in one C++ pass forward and one backward
    (float32 clips on the CPU, a step per layer or per channel; ``d`` is not returned)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, thr: torch.Tensor, act: str | None, mode: str,
                pixel: bool, weight_fn=None, spec=None):  # fmt: skip
        ctx.set_materialize_grads(False)
        fwd, _ = _fused_gate_ops()
        b, t, c = x.shape[:3]
        tc = thr.reshape(-1).expand(c).contiguous()
        code, hyst = _ACT_CODES[act], mode == "hysteresis"
        q, aux, sent = fwd(x, tc, code, hyst, pixel)
        factor = None
        if pixel:
            norm = aux.view(b, t - 1, 1, *x.shape[3:])
            loss_sum, factor, nonzero = _pixel_loss(norm, c, weight_fn, spec)
        else:
            sums = aux.sum((0, 1))  # float64: sum |d|, count of d != 0
            loss_sum, nonzero = sums[0].float(), sums[1].round().to(torch.int64)
        # q is replayed from x in the backward (x and the pixels sent are saved, not q: the
        # output may be changed in place, and x is a clip-sized tensor less than q and d)
        ctx.save_for_backward(x, sent, factor, tc)
        ctx.cfg = (code, hyst, pixel, tuple(thr.shape))
        ctx.mark_non_differentiable(nonzero)
        return q, loss_sum, nonzero

    @staticmethod
    @torch.autograd.function.once_differentiable  # the C++ backward has no derivative itself
    def backward(ctx, grad_q, grad_loss_sum, _grad_nonzero):
        x, sent, factor, tc = ctx.saved_tensors
        code, hyst, pixel, thr_shape = ctx.cfg
        _, bwd = _fused_gate_ops()
        empty = x.new_empty(0)
        gq = empty if grad_q is None else grad_q.float().contiguous()
        gls = 0.0 if grad_loss_sum is None else float(grad_loss_sum)
        # pixel: the C++ op scales the per-pixel factor by gls (the float32 product torch's
        # factor * gls would give)
        w = factor.contiguous() if pixel and grad_loss_sum is not None else empty
        need_thr = ctx.needs_input_grad[1]
        gx, gthr = bwd(gq, x, sent, w, gls, tc, code, hyst, pixel, need_thr)
        grad_thr = None
        if need_thr:
            g = gthr.sum(0).float()  # (C,), float64 partial sums per sample
            grad_thr = g.sum().reshape(thr_shape) if len(thr_shape) == 0 else g.reshape(thr_shape)
        return gx, grad_thr, None, None, None, None, None


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return x
    if activation == "relu":
        return F.relu(x)
    return F.relu6(x)


class DeltaActivation(SparsityLayer):
    """Quantise activations with a learnable step and penalise their temporal changes.

    Args:
        granularity: ``"layer"`` (one step), ``"channel"`` (one per channel, dim 2 of a clip)
            or ``"neuron"`` (one per channel and spatial position).
        threshold_init: initial value of ``theta`` (the step is ``|theta|``).
        sparsity_weight: weight ``w`` of the layer's loss (``w * fan_out * sum|d| / numel(d)``
            for scalar gates; pixel gates: see the module docstring).
        fan_out: MACs one nonzero delta triggers in the consumers (set by ``convert()``).
        activation: ``None``, ``"relu"`` or ``"relu6"`` applied before quantising.
        sigma: integrate the input over time first (``cumsum`` along dim 1).
        delta_output: return ``[q_0, q_1 - q_0, ...]`` instead of ``q``.
        threshold_trainable: whether ``theta`` receives gradients.
        num_channels: create ``theta`` now instead of at the first forward
            (``channel``: ``C``; ``neuron``: pass ``neuron_shape=(C, *spatial)`` instead).
        input_layout: ``"clip"`` (``(B,T,C,...)``, the default) or ``"frame"`` (``(N,C,...)``,
            as placed by ``convert()``; told the clip length by ``VideoModel``).
        gate: ``"scalar"`` (the paper) or ``"pixel"`` (whole channels-last rows, as the delta
            engine skips them); see the module docstring.
        mode: ``"grid"`` (stateless quantiser, the paper) or ``"hysteresis"`` (send a change only
            where it exceeds the step against the last value sent).
    """

    def __init__(
        self,
        granularity: str = "channel",
        threshold_init: float = 0.1,
        sparsity_weight: float = 1e-3,
        fan_out: float = 1.0,
        activation: str | None = None,
        sigma: bool = False,
        delta_output: bool = False,
        threshold_trainable: bool = True,
        *,
        num_channels: int | None = None,
        neuron_shape: tuple[int, ...] | None = None,
        input_layout: str = "clip",
        gate: str = "scalar",
        mode: str = "grid",
    ) -> None:
        super().__init__(sparsity_weight, fan_out, input_layout)
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "hysteresis" and (sigma or delta_output):
            raise ValueError(
                "DeltaActivation: mode='hysteresis' sends changes against its own reference; "
                "it does not combine with sigma=True or delta_output=True (use mode='grid')"
            )
        self.gate = gate
        self.mode = mode
        # For pixel gates: the consumers as convert() found them, so that the loss counts the
        # rows each change reaches ({"windows": [(k, stride, pad, dilation, ceil) | "global"],
        # "macs_per_row": int} per consumer); None: the plain group loss.
        self.spread: list[dict] | None = None
        # Set by convert() when the layer took over the activation before it
        # (DeltaConfig.absorb_activation): (op, target, kwargs, name) of that fx node, for revert().
        self.absorbed: tuple | None = None
        # The reference of a hysteresis layer streaming frame by frame; not saved.
        self.register_buffer("_ref", None, persistent=False)
        self.streaming = False  # set by deltasparse.streaming(model)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not float(threshold_init) > 0:
            raise ValueError(f"threshold_init must be > 0, got {threshold_init!r}")
        self.granularity = granularity
        self.threshold_init = float(threshold_init)
        self.activation = activation
        self.sigma = bool(sigma)
        self.delta_output = bool(delta_output)
        self.threshold_trainable = bool(threshold_trainable)
        self.register_parameter("theta", None)
        shape = None
        if granularity == "layer":
            shape = ()
        elif granularity == "channel" and num_channels is not None:
            shape = (int(num_channels),)
        elif granularity == "neuron" and neuron_shape is not None:
            shape = tuple(int(s) for s in neuron_shape)
        if shape is not None:
            self._create_theta(shape, device=None)

    # -- the threshold --------------------------------------------------------------------
    def _create_theta(self, shape: tuple[int, ...], device) -> None:
        theta = torch.full(shape, self.threshold_init, dtype=torch.float32, device=device)
        self.theta = nn.Parameter(theta, requires_grad=self.threshold_trainable)

    def _theta_shape_for(self, x_frame_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of theta for one frame of shape ``(C, *spatial)``."""
        if self.granularity == "layer":
            return ()
        if self.granularity == "channel":
            return (x_frame_shape[0],)
        return tuple(x_frame_shape)

    def _ensure_theta(self, frame_shape: tuple[int, ...], device) -> None:
        want = self._theta_shape_for(frame_shape)
        if self.theta is None:
            self._create_theta(want, device)
            return
        if tuple(self.theta.shape) != want:
            what = "channels" if self.granularity == "channel" else "(channels, *spatial)"
            raise ValueError(
                f"DeltaActivation: input has {what} {want} but the threshold was created for "
                f"{tuple(self.theta.shape)}; feed inputs of the shape the layer was built for, "
                f"or build a new layer"
            )

    @property
    def threshold(self) -> torch.Tensor:
        """The quantisation step ``|theta|`` (float32)."""
        if self.theta is None:
            raise RuntimeError(
                "DeltaActivation: the threshold is created at the first forward; run one "
                "batch (or pass num_channels=/neuron_shape=) first"
            )
        return self.theta.abs().float()

    def frame_threshold(self, ndim: int) -> torch.Tensor:
        """The step reshaped to broadcast against a frame tensor ``(N, C, ...)`` of ``ndim`` dims."""
        thr = self.threshold
        if self.granularity == "channel":
            return thr.reshape(thr.shape[0], *([1] * (ndim - 2)))
        return thr

    def _clip_threshold(self, ndim: int) -> torch.Tensor:
        thr = self.threshold
        if self.granularity == "channel":
            return thr.reshape(thr.shape[0], *([1] * (ndim - 3)))
        return thr

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Dense grid quantiser on frames ``(N, C, ...)`` (no gradients, no counts)."""
        if self.mode != "grid":
            raise ValueError(
                "DeltaActivation.quantize() is the stateless grid quantiser; a hysteresis layer "
                "depends on its stream: call the layer frame by frame (or on clips) instead"
            )
        self._ensure_theta(tuple(x.shape[1:]), x.device)
        return quantize(_activate(x, self.activation), self.frame_threshold(x.dim()))

    @property
    def pixel(self) -> bool:
        return self.gate == "pixel"

    @torch.no_grad()
    def _spread_weights(self, norm: torch.Tensor) -> torch.Tensor:
        """``W_p`` of the pixel loss: per consumer, the consumer's rows whose window (through
        the pools on the way) has its largest change at pixel ``p``, times the MACs of a row.

        ``norm`` is ``(B, T-1, 1, *spatial)``; the sum of ``W_p * norm_p`` over pixels is then
        the sum over the consumers' rows of the largest change in each row's window times the
        row's MACs: what the engine executes for these changes, weighted by their size (an
        isolated change pays for every row it reaches, a change next to others shares them).
        """
        shape = norm.shape
        m = norm.reshape(-1, 1, *shape[3:])
        one = ((1, 1), (1, 1), (0, 0), (1, 1), False)
        if m.dim() != 4 or all(all(w == one for w in c["windows"]) for c in self.spread):
            # (N, F) maps (one row per sample) or 1x1 consumers: a change reaches one row
            return torch.full_like(norm, float(sum(c["macs_per_row"] for c in self.spread)))
        n, _, h, w = m.shape
        pos = torch.arange(h * w, device=m.device, dtype=torch.float32)  # exact below 2**24
        pos = pos.reshape(1, 1, h, w).expand(n, 1, h, w)
        total = torch.zeros(n, h * w, dtype=torch.float32, device=m.device)
        for cons in self.spread:
            if all(w == one for w in cons["windows"]):
                total += float(cons["macs_per_row"])
                continue
            x, where = m, pos
            for win in cons["windows"]:
                if win == "global":
                    flat = x.reshape(n, -1)
                    i = flat.argmax(1, keepdim=True)
                    where = where.reshape(n, -1).gather(1, i)
                    x = flat.gather(1, i)
                    break
                k, st, pd, dl, ceil = win
                if pd[0] > k[0] // 2 or pd[1] > k[1] // 2:  # max_pool2d refuses such padding
                    x = F.pad(x, (pd[1], pd[1], pd[0], pd[0]), value=float("-inf"))
                    where = F.pad(where, (pd[1], pd[1], pd[0], pd[0]))
                    pd = (0, 0)
                x, i = F.max_pool2d(x, k, st, pd, dl, ceil_mode=ceil, return_indices=True)
                where = where.reshape(n, 1, -1).gather(2, i.reshape(n, 1, -1)).reshape(i.shape)
            idx = where.reshape(n, -1).long()
            total.scatter_add_(1, idx, torch.full(idx.shape, float(cons["macs_per_row"]),
                                                  device=m.device))  # fmt: skip
        return total.to(norm.dtype).reshape(shape)

    def reset_state(self) -> None:
        """Forget the stream reference of a hysteresis layer (the next frame starts a stream)."""
        self._ref = None

    def changed_mask(self, d: torch.Tensor) -> torch.Tensor:
        """Boolean map of the scalars that count as changed in deltas ``d`` (channels dim 1 of
        frames ``(N, C, ...)``): nonzero scalars, or whole pixels with any nonzero channel."""
        nz = d != 0
        if self.pixel:
            nz = nz.any(dim=1, keepdim=True).expand_as(nz)
        return nz

    def _stream_frame(self, s: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
        ref = self._ref if self.streaming else None
        if ref is None:
            ref = torch.zeros_like(s)
        elif ref.shape != s.shape or ref.device != s.device:
            raise ValueError(
                f"DeltaActivation (hysteresis): frame of shape {tuple(s.shape)} on {s.device} "
                f"does not continue the stream of shape {tuple(ref.shape)} on {ref.device}; "
                "call deltasparse.reset_state(model) before a new stream"
            )
        y = hysteresis_step(s, ref, thr, self.pixel)
        if self.streaming:
            self._ref = y.detach()
        if torch.is_grad_enabled() and (s.requires_grad or thr.requires_grad):
            y = _StraightThrough.apply(s, thr, thr.shape, y, (y.float() / thr).detach())
        return y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "theta"
        if key in state_dict and self.theta is None:
            self._create_theta(tuple(state_dict[key].shape), device=state_dict[key].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clip, in_shape = self._to_clip(x)
        if clip is None:  # frames outside a clip: the dense quantiser, no temporal counts
            self._ensure_theta(tuple(x.shape[1:]), x.device)
            s = _activate(x, self.activation)
            thr = self.frame_threshold(x.dim())
            if self.mode == "hysteresis":
                q = self._stream_frame(s, thr)
            else:
                q = _Quantize.apply(s, thr, thr.shape)
            zero = torch.zeros((), dtype=torch.long, device=x.device)
            self.stats = LayerStats(zero, 0, self.fan_out)
            self.loss = None
            return q
        self._check_time(clip, "DeltaActivation")
        self._ensure_theta(tuple(clip.shape[2:]), clip.device)
        s = torch.cumsum(clip, dim=1) if self.sigma else clip
        thr = self._clip_threshold(clip.dim())
        weight_fn = self._spread_weights if (self.pixel and self.spread) else None
        spec = self._loss_spec(s) if self.pixel else None
        if self._fused(s):
            q, loss_sum, nonzero = _GateDeltaFused.apply(s.contiguous(), thr, self.activation,
                                                         self.mode, self.pixel, weight_fn,
                                                         spec)  # fmt: skip
            d = None
            n_d = q.numel() // q.shape[1] * (q.shape[1] - 1)
        else:
            a = _activate(s, self.activation)
            q, d, loss_sum, nonzero = _GateDelta.apply(a, thr, thr.shape, self.mode,
                                                       self.pixel, weight_fn, spec)  # fmt: skip
            n_d = d.numel()
        scale = 1.0 if weight_fn is not None else self.fan_out
        self.loss = self.sparsity_weight * scale * loss_sum / n_d
        self.stats = LayerStats(nonzero, n_d, self.fan_out)
        out = torch.cat([q[:, :1], d], dim=1) if self.delta_output else q
        return out.reshape(in_shape)

    def _loss_spec(self, s: torch.Tensor) -> torch.Tensor | None:
        """The consumers of :attr:`spread` as the int64 list ``deltasparse::pixel_loss`` reads
        (empty: the plain group loss), when the pixel loss of clip ``s`` takes that C++ op:
        float32 ``(B, T, C, H, W)`` clips on the CPU; else None (torch ops). Cached per spread."""
        if (s.device.type != "cpu" or s.dtype != torch.float32 or s.dim() != 5
                or _pixel_loss_cpp() is None):  # fmt: skip
            return None
        cached = self.__dict__.get("_spec_cache")
        if cached is not None and cached[0] == self.spread:
            return cached[1]
        flat: list[int] = []
        if self.spread:
            flat.append(len(self.spread))
            for cons in self.spread:
                flat += [int(cons["macs_per_row"]), len(cons["windows"])]
                for win in cons["windows"]:
                    if win == "global":
                        flat += [1] + [0] * 9
                    else:
                        k, st, pd, dl, ceil = win
                        flat += [0, *k, *st, *pd, *dl, int(bool(ceil))]
        spec = torch.tensor(flat, dtype=torch.int64)
        self.__dict__["_spec_cache"] = (copy.deepcopy(self.spread), spec)
        return spec

    def _fused(self, s: torch.Tensor) -> bool:
        """Whether the clip takes the fused C++ gate (same results as the torch path to float
        rounding of the loss sums and gradients; the outputs are identical). Its loops run
        along the positions of a map: ``(B, T, F)`` clips and maps of fewer than 16 positions
        (e.g. a classifier's features) are faster on the torch path. The fused gate saves its
        input for the backward: changing that input in place afterwards is an error (as for
        any op that saves its input)."""
        return (s.device.type == "cpu" and s.dtype == torch.float32 and not self.delta_output
                and self.granularity != "neuron" and s.dim() >= 4 and s.numel() > 0
                and math.prod(s.shape[3:]) >= _FUSED_MIN_POSITIONS
                and _fused_gate_ops() is not None)  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"granularity={self.granularity!r}, gate={self.gate!r}, mode={self.mode!r}, "
            f"threshold_init={self.threshold_init:g}, "
            f"activation={self.activation!r}, sigma={self.sigma}, "
            f"delta_output={self.delta_output}, " + super().extra_repr()
        )


_STATEFUL = (DeltaActivation, TokenDelta)


def is_stateful(model: nn.Module) -> bool:
    """Whether ``model``'s output on a frame depends on the frames before it: hysteresis
    layers and token gates keep the last value sent (then compare it streaming, under
    :func:`streaming`); grid layers do not."""
    return any(isinstance(m, TokenDelta) or (isinstance(m, DeltaActivation)
                                             and m.mode == "hysteresis")
               for m in model.modules())  # fmt: skip


def reset_state(model: nn.Module) -> None:
    """Reset the stream state of every hysteresis or token gate in ``model`` (a new stream
    starts)."""
    for m in model.modules():
        if isinstance(m, _STATEFUL):
            m.reset_state()


@contextmanager
def streaming(model: nn.Module):
    """Within the block, the hysteresis layers and token gates of ``model`` called frame by
    frame keep their references between calls (one call = one time step of ``B`` streams),
    starting from new streams; on exit they are stateless again. Grid layers are unaffected.

    ``with deltasparse.streaming(frame_model): outs = [frame_model(f) for f in frames]`` is
    the dense streaming model that ``DeltaEngine`` reproduces frame by frame."""
    layers = [m for m in model.modules() if isinstance(m, _STATEFUL)]
    before = [m.streaming for m in layers]
    for m in layers:
        m.streaming = True
        m.reset_state()
    try:
        yield model
    finally:
        for m, b in zip(layers, before, strict=True):
            m.streaming = b
            m.reset_state()
