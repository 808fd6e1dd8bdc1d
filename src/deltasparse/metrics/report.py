"""``SparsityReport``: per-layer and total sparsity of a model, as JSON and as a rich table."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["LayerReport", "SparsityReport"]


@dataclass
class LayerReport:
    """One inserted (or probed) layer.

    ``nonzero``/``total`` are what the layer's operations count: deltas for delta layers
    on clips, activations otherwise. Densities are fractions in ``[0, 1]``.
    """

    name: str
    kind: str  # "delta", "l1" or "activation"
    shape: list[int]
    fan_out: float
    nonzero: int
    total: int
    temporal_density: float | None
    spatial_density: float
    effective_macs: int | None
    dense_macs: int | None
    frames: int
    threshold: dict | None = None

    @property
    def density(self) -> float:
        return self.nonzero / self.total if self.total else float("nan")


@dataclass
class SparsityReport:
    """Per-layer counts and their totals.

    ``executed``: what the delta engine would execute on the same clips (see
    :mod:`deltasparse.metrics.executed`; ``None`` when not predicted, with the reason in
    ``executed_error``). ``op_fraction`` counts changed scalars (the paper);
    ``executed_fraction`` counts what the engine runs: whole pixels, widened by every window.
    """

    layers: list[LayerReport] = field(default_factory=list)
    mode: str = "spatial"  # "temporal" when deltas were counted on clips
    executed: dict | None = None
    executed_error: str | None = None

    @property
    def executed_fraction(self) -> float | None:
        """Predicted executed MACs over dense MACs, steady state (first frames excluded)."""
        return None if self.executed is None else self.executed["executed_fraction"]

    @property
    def op_fraction(self) -> float:
        """``sum fan_out * nonzero / sum fan_out * total`` (the paper's ``op_avg``)."""
        num = sum(r.fan_out * r.nonzero for r in self.layers)
        den = sum(r.fan_out * r.total for r in self.layers)
        return num / den if den else float("nan")

    @property
    def op_reduction(self) -> float:
        f = self.op_fraction
        return 1.0 / f if f > 0 else math.inf

    def _mac_total(self, attr: str) -> float | None:
        vals = [(getattr(r, attr), r.frames) for r in self.layers]
        if not vals or any(v is None or f == 0 for v, f in vals):
            return None
        return float(sum(v / f for v, f in vals))

    @property
    def effective_macs_per_frame(self) -> float | None:
        return self._mac_total("effective_macs")

    @property
    def dense_macs_per_frame(self) -> float | None:
        return self._mac_total("dense_macs")

    @property
    def mac_fraction(self) -> float | None:
        e, d = self.effective_macs_per_frame, self.dense_macs_per_frame
        return e / d if e is not None and d else None

    def to_dict(self) -> dict:
        layers = []
        for r in self.layers:
            d = asdict(r)
            d["density"] = r.density
            layers.append(d)
        return {
            "mode": self.mode,
            "op_fraction": self.op_fraction,
            "op_reduction": self.op_reduction,
            "effective_macs_per_frame": self.effective_macs_per_frame,
            "dense_macs_per_frame": self.dense_macs_per_frame,
            "mac_fraction": self.mac_fraction,
            "executed_fraction": self.executed_fraction,
            "executed": self.executed,
            "executed_error": self.executed_error,
            "layers": layers,
        }

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        from ..checkpoint import sanitize

        text = json.dumps(sanitize(self.to_dict()), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def table(self, title: str | None = None):
        """A ``rich.table.Table`` of the per-layer rows and the totals."""
        from rich.table import Table

        t = Table(title=title or f"Sparsity report ({self.mode})", show_lines=False)
        for col in ("layer", "kind", "shape", "fan_out", "temporal", "spatial", "eff. MACs/fr"):
            t.add_column(col, justify="left" if col in ("layer", "kind") else "right")

        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}%"

        for r in self.layers:
            per = "-" if r.effective_macs is None or not r.frames else f"{r.effective_macs / r.frames:,.0f}"
            t.add_row(
                r.name, r.kind, "×".join(map(str, r.shape)), f"{r.fan_out:g}",
                pct(r.temporal_density), pct(r.spatial_density), per,
            )  # fmt: skip
        t.add_section()
        eff = self.effective_macs_per_frame
        t.add_row(
            "total", "", "", "", "", f"op_fraction {100 * self.op_fraction:.2f}%",
            "-" if eff is None else f"{eff:,.0f}",
        )  # fmt: skip
        return t

    def print(self, console=None) -> None:
        from rich.console import Console

        (console or Console()).print(self.table())
