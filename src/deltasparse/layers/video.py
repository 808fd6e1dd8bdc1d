"""Time handling: run a per-frame model on clips, with delta layers seeing the true time axis."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ._base import SparsityLayer

__all__ = ["VideoModel", "sparsity_layers"]

_AVERAGES = ("logits", "softmax", "none")


def sparsity_layers(model: nn.Module):
    """``(name, layer)`` for every inserted sparsity layer in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, SparsityLayer):
            yield name, m


@contextmanager
def clip_context(model: nn.Module, clip_len: int):
    """Tell every frame-layout layer in ``model`` the clip length for one forward."""
    layers = [m for _, m in sparsity_layers(model) if m.input_layout == "frame"]
    for m in layers:
        m.clip_len = clip_len
    try:
        yield
    finally:
        for m in layers:
            m.clip_len = None


class VideoModel(nn.Module):
    """Apply a per-frame model to clips ``(B, T, C, H, W)`` and average its outputs over time.

    Time is folded into the batch (``B*T`` frames, batch-major) for speed; the delta layers
    inside are told ``T`` so that deltas are taken within each clip, never across clips.

    Args:
        frame_model: a model mapping frames ``(N, C, H, W)`` to outputs ``(N, ...)``.
        average: ``"logits"`` (mean of the per-frame outputs, the default, suited to training
            with cross-entropy), ``"softmax"`` (mean of per-frame softmax probabilities, as the
            paper evaluates) or ``"none"`` (per-frame outputs ``(B, T, ...)``).
    """

    def __init__(self, frame_model: nn.Module, average: str = "logits") -> None:
        super().__init__()
        if average not in _AVERAGES:
            raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")
        self.frame_model = frame_model
        self.average = average

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"VideoModel expects clips (B, T, C, ...) e.g. (B, T, C, H, W), got {shape}; "
                f"for single frames call the per-frame model (video.frame_model) directly"
            )
        b, t = x.shape[:2]
        with clip_context(self.frame_model, t):
            y = self.frame_model(x.reshape(b * t, *x.shape[2:]))
        return self.pool(y, b, t)

    def pool(self, y: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """The clip outputs from the per-frame outputs ``y`` ``(B*T, ...)`` (batch-major)."""
        y = y.reshape(b, t, *y.shape[1:])
        if self.average == "none":
            return y
        if self.average == "softmax":
            return y.float().softmax(dim=-1).mean(dim=1)
        return y.mean(dim=1)
