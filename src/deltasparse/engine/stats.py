"""``engine.stats``: what the engine computed since ``reset()``, against the dense model.

* ``dense_macs``     -- MACs of the convs and linears of the dense model over the frames seen.
* ``effective_macs`` -- MACs the kernels actually computed (rows computed x MACs per row;
  a layer that fell back to dense counts in full). Equal to ``dense_macs`` on the first frame.
* ``delta_macs``     -- the pixel-granular bound of DESIGN.md §1: each layer's dense MACs
  times the fraction of its input pixels that changed (what an input-scatter kernel needs).
* ``ideal_speedup``  -- ``dense_macs / effective_macs``.
* ``fallbacks``      -- every slower path the engine took, with the reason (an op run densely,
  the torch backend instead of the C++ or Triton one, no CUDA-graph step); each is also
  warned about once, as a :class:`FallbackWarning`.

The ratios are ``inf`` / ``nan`` where undefined (no frame yet); ``to_dict()`` writes them as
``None`` so that the JSON is strict (no ``Infinity`` / ``NaN``, which strict parsers refuse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .ops import OpStats

__all__ = ["EngineStats", "FallbackWarning"]


class FallbackWarning(UserWarning):
    """The delta engine took a slower path than it was asked for (listed in its stats)."""


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


@dataclass
class EngineStats:
    frames: int
    dense_macs: int
    effective_macs: int
    delta_macs: float
    time_s: float
    state_bytes: int
    table_bytes: int
    dense_activation_bytes: int
    backend: str
    layers: list[dict] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)

    @property
    def ideal_speedup(self) -> float:
        return self.dense_macs / self.effective_macs if self.effective_macs else float("inf")

    @property
    def density(self) -> float:
        """``effective_macs / dense_macs``: the fraction of the dense work done."""
        return self.effective_macs / self.dense_macs if self.dense_macs else float("nan")

    @property
    def delta_density(self) -> float:
        return self.delta_macs / self.dense_macs if self.dense_macs else float("nan")

    @property
    def memory_ratio(self) -> float:
        """Engine state (buffers + index tables) over one dense frame's activations."""
        return (self.state_bytes + self.table_bytes) / max(self.dense_activation_bytes, 1)

    @classmethod
    def from_ops(cls, ops: list[OpStats], **kw) -> EngineStats:
        layers = [o.to_dict() for o in ops]
        return cls(
            dense_macs=sum(o.dense_macs_per_frame * o.frames for o in ops),
            effective_macs=sum(o.effective_macs for o in ops),
            delta_macs=float(sum(o.delta_macs for o in ops)),
            time_s=sum(o.time_s for o in ops),
            layers=layers,
            **kw,
        )

    def to_dict(self) -> dict:
        return {
            "frames": self.frames,
            "backend": self.backend,
            "dense_macs": self.dense_macs,
            "effective_macs": self.effective_macs,
            "delta_macs": self.delta_macs,
            "density": _finite(self.density),
            "delta_density": _finite(self.delta_density),
            "ideal_speedup": _finite(self.ideal_speedup),
            "time_s": self.time_s,
            "state_bytes": self.state_bytes,
            "table_bytes": self.table_bytes,
            "dense_activation_bytes": self.dense_activation_bytes,
            "memory_ratio": self.memory_ratio,
            "fallbacks": list(self.fallbacks),
            "layers": self.layers,
        }
