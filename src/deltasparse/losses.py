"""The model-level sparsity loss and schedules for the sparsity weight.

``MultiStageSine`` is the progressive schedule of ProSparse (Song et al., 2024):
``λ = λ_{i-1} + (λ_i − λ_{i-1}) · ½[sin(−π/2 + π(t − T_{i−1})/(T_i − T_{i−1})) + 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import sparsity_layers

__all__ = [
    "Constant",
    "LinearWarmup",
    "MultiStageSine",
    "make_schedule",
    "set_sparsity_weight",
    "sparsity_loss",
]


def sparsity_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the losses of every inserted layer's last forward (0 when there are none)."""
    losses = [m.loss for _, m in sparsity_layers(model) if m.loss is not None]
    if not losses:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack([loss.float() for loss in losses]).sum()


def set_sparsity_weight(model: nn.Module, value: float) -> None:
    """Set ``sparsity_weight`` of every inserted layer (layers with an override keep ratio 1)."""
    for _, m in sparsity_layers(model):
        m.sparsity_weight = float(value)


@dataclass(frozen=True)
class Constant:
    value: float

    def __call__(self, step: int) -> float:
        return float(self.value)


@dataclass(frozen=True)
class LinearWarmup:
    """Ramp linearly from ``start`` to ``value`` over ``warmup_steps``, then hold."""

    value: float
    warmup_steps: int
    start: float = 0.0

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return float(self.value)
        return self.start + (self.value - self.start) * max(step, 0) / self.warmup_steps


@dataclass(frozen=True)
class MultiStageSine:
    """ProSparse's multi-stage sine increase.

    ``milestones = (T_1, ..., T_n)`` (increasing steps) and ``values = (λ_1, ..., λ_n)``;
    ``λ_0 = start`` at ``T_0 = 0``. Within stage ``i`` the weight rises along half a sine from
    ``λ_{i-1}`` to ``λ_i``; after ``T_n`` it holds ``λ_n``.
    """

    milestones: Sequence[int]
    values: Sequence[float]
    start: float = 0.0

    def __post_init__(self):
        if len(self.milestones) != len(self.values) or not self.milestones:
            raise ValueError("MultiStageSine needs as many milestones as values (at least one)")
        if any(b <= a for a, b in zip((0, *self.milestones), self.milestones, strict=False)):
            raise ValueError(f"milestones must increase from > 0, got {tuple(self.milestones)}")

    def __call__(self, step: int) -> float:
        t_prev, lam_prev = 0, float(self.start)
        for t_i, lam_i in zip(self.milestones, self.values, strict=True):
            if step < t_i:
                frac = (max(step, 0) - t_prev) / (t_i - t_prev)
                return lam_prev + (lam_i - lam_prev) * 0.5 * (
                    math.sin(-math.pi / 2 + math.pi * frac) + 1
                )
            t_prev, lam_prev = t_i, float(lam_i)
        return lam_prev


def make_schedule(kind: str, value: float, total_steps: int, warmup_steps: int = 0):
    """Build a schedule by name: ``constant``, ``linear`` (warm-up) or ``sine`` (ProSparse)."""
    if kind == "constant":
        return Constant(value)
    if kind == "linear":
        return LinearWarmup(value, warmup_steps or max(total_steps // 4, 1))
    if kind == "sine":
        # Three stages over the first half of training, reaching value, as ProSparse does.
        n = max(total_steps // 2, 3)
        return MultiStageSine((n // 3, 2 * n // 3, n), (value / 4, value / 2, value))
    raise ValueError(f"unknown sparsity schedule {kind!r}; choose constant, linear or sine")
