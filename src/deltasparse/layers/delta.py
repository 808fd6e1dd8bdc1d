"""The Delta Activation Layer (Yousefzadeh & Sifalakis, arXiv 2107.07305), DESIGN.md §1.

Quantises activations with a learnable step ``thr = |theta|`` and penalises their
frame-to-frame changes, so that a trained network changes few activations between frames.
Rounding is straight-through for the input; the step gets the paper's gradient
``dq/dthr = -round(a / thr)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import LayerStats, SparsityLayer, count_nonzero

__all__ = ["DeltaActivation", "quantize"]

GRANULARITIES = ("layer", "channel", "neuron")
ACTIVATIONS = (None, "relu", "relu6")


def quantize(a: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """``round(a / thr) * thr`` in float32 (round half to even), cast back to ``a.dtype``."""
    return (torch.round(a.float() / thr.float()) * thr.float()).to(a.dtype)


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


class _QuantizeDelta(torch.autograd.Function):
    """``_Quantize`` on a clip ``(B, T, ...)`` fused with the temporal deltas and their sums.

    Returns ``q``, ``d = q[:, 1:] - q[:, :-1]``, ``sum|d|`` (float32) and the exact count of
    nonzero ``d`` (not differentiable). The maths is that of ``_Quantize`` followed by the
    subtraction and ``abs().sum()``; fusing them shares ``sgn(d)`` between the count, the sum
    and the backward, and spares autograd the backward of two time slices (two zero-filled
    clip-sized tensors per layer): most of the layer's training cost on CPU.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, thr: torch.Tensor, thr_shape: torch.Size):
        ctx.set_materialize_grads(False)
        levels = torch.div(a.float(), thr.float()).round_()
        q = (levels * thr.float()).to(a.dtype)
        d = q[:, 1:] - q[:, :-1]
        s = torch.sgn(d)
        if d.dtype == torch.float32:  # sgn(d) * d == |d| exactly; one pass, no temporary
            abs_sum = torch.dot(s.reshape(-1), d.reshape(-1))
        else:
            abs_sum = d.abs().sum(dtype=torch.float32)
        finite = None if d.device.type != "cpu" else math.isfinite(abs_sum.item())
        nonzero = count_nonzero(d, sgn=s, finite=finite)
        ctx.save_for_backward(levels, s)
        ctx.thr_shape = thr_shape
        ctx.mark_non_differentiable(nonzero)
        return q, d, abs_sum, nonzero

    @staticmethod
    def backward(ctx, grad_q, grad_d, grad_abs_sum, _grad_nonzero):
        levels, s = ctx.saved_tensors
        # dL/dq_t = grad_q_t + e_t - e_{t+1}, with e = dL/dd = grad_d + grad_abs_sum * sgn(d)
        g = grad_q
        if grad_d is not None or grad_abs_sum is not None:
            if grad_q is None:
                grad_q = torch.zeros(levels.shape, dtype=s.dtype, device=s.device)
            g = torch.empty(levels.shape, dtype=grad_q.dtype, device=grad_q.device)
            g[:, :1] = grad_q[:, :1]
            if grad_d is None:  # the training case, without a temporary for e
                torch.addcmul(grad_q[:, 1:], s, grad_abs_sum, out=g[:, 1:])
                g[:, :-1].addcmul_(s, grad_abs_sum, value=-1)
            else:
                e = grad_d if grad_abs_sum is None else torch.addcmul(grad_d, s, grad_abs_sum)
                torch.add(grad_q[:, 1:], e, out=g[:, 1:])
                g[:, :-1].sub_(e)
        grad_thr = None
        if g is not None and ctx.needs_input_grad[1]:
            grad_thr = torch.mul(g.float(), levels).sum_to_size(ctx.thr_shape).neg_()
        return g, grad_thr, None


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
        sparsity_weight: weight of the layer's loss ``w * fan_out * sum|d| / numel(d)``.
        fan_out: MACs one nonzero delta triggers in the consumers (set by ``convert()``).
        activation: ``None``, ``"relu"`` or ``"relu6"`` applied before quantising.
        sigma: integrate the input over time first (``cumsum`` along dim 1).
        delta_output: return ``[q_0, q_1 - q_0, ...]`` instead of ``q``.
        threshold_trainable: whether ``theta`` receives gradients.
        num_channels: create ``theta`` now instead of at the first forward
            (``channel``: ``C``; ``neuron``: pass ``neuron_shape=(C, *spatial)`` instead).
        input_layout: ``"clip"`` (``(B,T,C,...)``, the default) or ``"frame"`` (``(N,C,...)``,
            as placed by ``convert()``; told the clip length by ``VideoModel``).
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
    ) -> None:
        super().__init__(sparsity_weight, fan_out, input_layout)
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
        """Dense quantiser on frames ``(N, C, ...)`` (no gradients, no counts)."""
        self._ensure_theta(tuple(x.shape[1:]), x.device)
        return quantize(_activate(x, self.activation), self.frame_threshold(x.dim()))

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
            q = _Quantize.apply(s, thr, thr.shape)
            zero = torch.zeros((), dtype=torch.long, device=x.device)
            self.stats = LayerStats(zero, 0, self.fan_out)
            self.loss = None
            return q
        self._check_time(clip, "DeltaActivation")
        self._ensure_theta(tuple(clip.shape[2:]), clip.device)
        s = torch.cumsum(clip, dim=1) if self.sigma else clip
        a = _activate(s, self.activation)
        thr = self._clip_threshold(clip.dim())
        q, d, abs_sum, nonzero = _QuantizeDelta.apply(a, thr, thr.shape)
        self.loss = self.sparsity_weight * self.fan_out * abs_sum / d.numel()
        self.stats = LayerStats(nonzero, d.numel(), self.fan_out)
        out = torch.cat([q[:, :1], d], dim=1) if self.delta_output else q
        return out.reshape(in_shape)

    def extra_repr(self) -> str:
        return (
            f"granularity={self.granularity!r}, threshold_init={self.threshold_init:g}, "
            f"activation={self.activation!r}, sigma={self.sigma}, "
            f"delta_output={self.delta_output}, " + super().extra_repr()
        )
