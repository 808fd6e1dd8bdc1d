"""``ActivationL1``: the spatial-only baseline of arXiv 2107.07305 (identity + weighted L1 loss).

Forward is the identity; the loss is ``sparsity_weight * fan_out * sum|x| / numel(x)`` and the
counts are the nonzero activations (the operations of a zero-skipping accelerator).
"""

from __future__ import annotations

import math

import torch

from ._base import LayerStats, SparsityLayer, check_float, count_nonzero

__all__ = ["ActivationL1"]


class ActivationL1(SparsityLayer):
    """Identity layer that penalises ``|x|`` (weighted by fan-out) and counts nonzeros."""

    def __init__(
        self, sparsity_weight: float = 1e-3, fan_out: float = 1.0, *, input_layout: str = "clip"
    ) -> None:
        super().__init__(sparsity_weight, fan_out, input_layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float(x, "ActivationL1")
        if x.dim() < 2:
            raise ValueError(
                f"ActivationL1 expects (B, T, C, ...) clips or (N, C, ...) frames, got shape "
                f"{tuple(x.shape)}"
            )
        abs_sum = x.abs().float().sum()
        self.loss = self.sparsity_weight * self.fan_out * abs_sum / x.numel()
        # a finite sum of |x| means no NaN/inf, which lets the fast count skip its own check
        finite = math.isfinite(abs_sum.item()) if x.device.type == "cpu" else None
        self.stats = LayerStats(count_nonzero(x, finite=finite), x.numel(), self.fan_out)
        return x
