"""``TokenDelta``: the Delta Activation Layer at token granularity (DESIGN.md §4), for
transformers.

Between frames of a video most patch tokens barely change. A token gate sends a token's new
value only when it changed enough against the *reference* (the last value it sent), and
otherwise repeats the reference, so that everything downstream of the gate that works token by
token (the qkv projection, the MLP) recomputes only the sent tokens. This is the gate of
Eventful Transformers (Dutson et al., ICCV 2023), trained with the Delta Activation Layer's
recipe (Yousefzadeh & Sifalakis, arXiv 2107.07305): a learnable threshold and a fan-out-weighted
loss on the deltas.

Exact semantics. A *token* is one row of the last dim: input frames ``(N, *tokens, D)``
(``(N, L, D)`` for a ViT), clips ``(B, T, *tokens, D)``. For one stream:

* frame 0 (the first of a clip or of a stream): every token is sent, ``ref = a_0`` (the dense
  first wave, excluded from loss and counts as in the paper);
* frame ``t >= 1``: the change of token ``i`` is its root-mean-square difference against the
  reference, ``e_i = ||a_t,i - ref_i||_2 / sqrt(D)`` (float32); the policy picks the tokens to
  send:

  - ``policy="threshold"``: ``e_i > thr`` with ``thr = |theta|``, a learnable scalar;
  - ``policy="topk"``: the ``k`` tokens of largest ``e_i`` of each frame (ties: lowest index),
    those with ``e_i > 0`` (a token that did not change is never sent);
  - ``policy="fraction"``: the ``ceil(fraction * L)`` tokens of largest ``e_i``, likewise;

  sent tokens take the new value (``ref_i = a_t,i``), the others keep theirs, and the output is
  ``q_t = ref``. For the threshold policy the error is bounded by the step:
  ``||q_t,i - a_t,i||_2 / sqrt(D) <= thr`` for every token at every frame.

Loss (threshold and budget policies alike): ``w * fan_out * sum_{t>=1,i} ||d_t,i||_2 /
(sqrt(D) * numel(d))`` with ``d_t = q_t - q_{t-1}`` over frames ``t >= 1`` (the RMS change per
token, averaged over tokens, times the fan-out per element ``fan_out / D``: the scale of the
scalar and pixel gates' losses, whose fan-outs are per element). ``fan_out`` is the MACs one sent token triggers in
the token-wise ops that follow (``convert()`` computes it from the graph). Counts: ``nonzero`` =
sent tokens of frames ``t >= 1``, ``total`` = their number.

Gradients (the paper's rule, as for the scalar and pixel gates): ``dq/da = 1`` (straight-through)
and ``dq/dthr = -q / thr``; with the sparsity loss alone gradient descent raises the step
(``d(sum ||d||)/dthr = -sum ||d|| / thr``).

Frames outside a clip are the first frame of a stream (every token sent: the layer is the
identity) unless streaming is on (:func:`deltasparse.streaming`): then the reference is kept
from call to call, one call per time step, and the per-frame model is the dense streaming model
that :class:`~deltasparse.DeltaEngine` reproduces.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._base import LayerStats, SparsityLayer, check_float

__all__ = ["POLICIES", "TokenDelta", "token_change", "token_send"]

POLICIES = ("threshold", "topk", "fraction")


def token_change(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``e = ||a - ref||_2 / sqrt(D)`` over the last dim, in float32 (``(N, *tokens)``)."""
    diff = a.float() - ref.float()
    return diff.mul_(diff).mean(-1).sqrt_()


def token_send(e: torch.Tensor, policy: str, thr: torch.Tensor | None, k: int | None,
               fraction: float | None) -> torch.Tensor:  # fmt: skip
    """The tokens to send, a bool map of ``e``'s shape ``(N, *tokens)``, under ``policy``."""
    if policy == "threshold":
        return e > thr
    flat = e.reshape(e.shape[0], -1)
    n = flat.shape[1]
    r = min(n, k) if policy == "topk" else min(n, math.ceil(fraction * n - 1e-9))
    send = torch.zeros_like(flat, dtype=torch.bool)
    if r > 0:
        # a stable descending sort: equal changes are taken lowest index first
        idx = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :r]
        send.scatter_(1, idx, True)
        send &= flat > 0  # an unchanged token is never sent: it would change nothing
    return send.reshape(e.shape)


class _TokenGate(torch.autograd.Function):
    """Returns ``q`` (computed outside); backward ``dq/da = 1``, ``dq/dthr = -q / thr``."""

    @staticmethod
    def forward(ctx, a, thr, q):
        ctx.save_for_backward(q, thr)
        return q

    @staticmethod
    def backward(ctx, grad_q):
        q, thr = ctx.saved_tensors
        grad_thr = None
        if ctx.needs_input_grad[1]:
            grad_thr = -(grad_q.float() * q.float()).sum() / thr
        return grad_q, grad_thr, None


class TokenDelta(SparsityLayer):
    """Send a token only when it changed enough against the last value sent (module docstring).

    Args:
        threshold_init: initial ``theta`` of the threshold policy (``thr = |theta|``, an RMS
            change per token element).
        sparsity_weight: weight ``w`` of the loss on token-delta norms.
        fan_out: MACs one sent token triggers downstream (set by ``convert()``).
        policy: ``"threshold"`` (learnable), ``"topk"`` (``k`` tokens per frame) or
            ``"fraction"`` (``ceil(fraction * tokens)`` per frame).
        k / fraction: the budget of the ``topk`` / ``fraction`` policies.
        threshold_trainable: whether ``theta`` receives gradients.
        input_layout: ``"clip"`` (``(B, T, *tokens, D)``) or ``"frame"`` (``(N, *tokens, D)``, as
            ``convert()`` places it; told the clip length by ``VideoModel``).
    """

    def __init__(
        self,
        threshold_init: float = 0.1,
        sparsity_weight: float = 1e-3,
        fan_out: float = 1.0,
        policy: str = "threshold",
        *,
        k: int | None = None,
        fraction: float | None = None,
        threshold_trainable: bool = True,
        input_layout: str = "clip",
    ) -> None:
        super().__init__(sparsity_weight, fan_out, input_layout)
        if policy not in POLICIES:
            raise ValueError(f"TokenDelta: policy must be one of {POLICIES}, got {policy!r}")
        if policy == "topk" and not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
            raise ValueError(f"TokenDelta(policy='topk') needs k, an integer >= 0; got {k!r}")
        if policy == "fraction" and not (
            isinstance(fraction, (int, float)) and 0.0 <= float(fraction) <= 1.0
        ):
            raise ValueError(
                f"TokenDelta(policy='fraction') needs fraction in [0, 1]; got {fraction!r}"
            )
        if not float(threshold_init) > 0:
            raise ValueError(f"threshold_init must be > 0, got {threshold_init!r}")
        self.policy = policy
        self.k = k
        self.fraction = None if fraction is None else float(fraction)
        self.threshold_init = float(threshold_init)
        self.threshold_trainable = bool(threshold_trainable)
        # the budget policies do not use the threshold: it gets no gradient there
        self.theta = nn.Parameter(torch.tensor(self.threshold_init),
                                  requires_grad=self.threshold_trainable
                                  and policy == "threshold")  # fmt: skip
        self.register_buffer("_ref", None, persistent=False)
        self.streaming = False  # set by deltasparse.streaming(model)

    @property
    def threshold(self) -> torch.Tensor:
        """The threshold ``|theta|`` (float32, a scalar); unused by the budget policies."""
        return self.theta.abs().float()

    def send(self, e: torch.Tensor) -> torch.Tensor:
        """The tokens this gate sends for changes ``e`` ``(N, *tokens)``."""
        thr = self.threshold.detach() if self.policy == "threshold" else None
        return token_send(e, self.policy, thr, self.k, self.fraction)

    def reset_state(self) -> None:
        """Forget the stream reference (the next frame starts a stream and is sent whole)."""
        self._ref = None

    def changed_mask(self, d: torch.Tensor) -> torch.Tensor:
        """The tokens (``d``'s shape without its last dim) with a nonzero delta."""
        return (d != 0).any(-1)

    def _check(self, x: torch.Tensor, min_dim: int) -> None:
        # (N, D) frames are one token per sample (a gate on a pooled feature vector)
        check_float(x, "TokenDelta")
        if x.dim() < min_dim:
            what = "(B, T, L, D) clips" if self.input_layout == "clip" else "(N, L, D) frames"
            raise ValueError(
                f"TokenDelta expects {what} (tokens along the dims before the last, features "
                f"last), got shape {tuple(x.shape)}"
            )

    def _gate(self, a: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        thr = self.threshold
        if torch.is_grad_enabled() and (a.requires_grad or thr.requires_grad):
            return _TokenGate.apply(a, thr, q)
        return q

    def _stream_frame(self, x: torch.Tensor) -> torch.Tensor:
        ref = self._ref if self.streaming else None
        if ref is None:
            q = x.detach().clone()
        else:
            if ref.shape != x.shape or ref.device != x.device:
                raise ValueError(
                    f"TokenDelta: frame of shape {tuple(x.shape)} on {x.device} does not "
                    f"continue the stream of shape {tuple(ref.shape)} on {ref.device}; call "
                    "deltasparse.reset_state(model) before a new stream"
                )
            with torch.no_grad():
                send = self.send(token_change(x, ref))
                q = torch.where(send.unsqueeze(-1), x, ref)
        if self.streaming:
            self._ref = q.detach().clone()  # not the output's storage: it may be changed in place
        return self._gate(x, q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_layout == "frame":
            self._check(x, 2)
            if self.clip_len is None:
                self.stats = LayerStats(torch.zeros((), dtype=torch.long, device=x.device), 0,
                                        self.fan_out)  # fmt: skip
                self.loss = None
                return self._stream_frame(x)
            t = self.clip_len
            if x.shape[0] % t:
                raise ValueError(
                    f"TokenDelta: {x.shape[0]} frames are not a whole number of clips of "
                    f"length {t}"
                )
            clip = x.reshape(x.shape[0] // t, t, *x.shape[1:])
        else:
            self._check(x, 3)
            clip = x
        self._check_time(clip, "TokenDelta")
        with torch.no_grad():
            q = torch.empty_like(clip)
            ref = clip[:, 0]
            q[:, 0] = ref
            sent = []
            for t in range(1, clip.shape[1]):
                send = self.send(token_change(clip[:, t], ref))
                ref = torch.where(send.unsqueeze(-1), clip[:, t], ref)
                q[:, t] = ref
                sent.append(send.sum())
        q = self._gate(clip, q)
        d = q[:, 1:] - q[:, :-1]
        dim = d.shape[-1]
        tokens = d.numel() // dim
        norms = torch.linalg.vector_norm(d.float(), dim=-1)
        self.loss = self.sparsity_weight * self.fan_out * norms.sum() / math.sqrt(dim) / d.numel()
        self.stats = LayerStats(torch.stack(sent).sum(), tokens, self.fan_out)
        return q.reshape(x.shape)

    def extra_repr(self) -> str:
        budget = {"topk": f", k={self.k}", "fraction": f", fraction={self.fraction}"}
        return (
            f"policy={self.policy!r}{budget.get(self.policy, '')}, "
            f"threshold_init={self.threshold_init:g}, " + super().extra_repr()
        )
