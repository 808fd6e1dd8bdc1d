"""The numbers of a report: summary rows, pairwise comparisons, per-layer rows, plot series.

Everything the page shows is computed here, once, and goes into ``report.json``; the plots and
the HTML only draw it. Densities and accuracies are fractions in ``[0, 1]``; the ``*_pct``
fields are the same numbers in percent, as plotted.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..checkpoint import sanitize
from .runs import PHASES, RunData

__all__ = [
    "COLORS",
    "accuracy_points",
    "comparisons",
    "counted_density",
    "curve_series",
    "density_series",
    "engine_rows",
    "engine_series",
    "finite",
    "layer_rows",
    "sanitize",
    "summary_row",
    "threshold_panels",
]

#: matplotlib's ``tab10``, so a run keeps its colour in every plot and in the tables.
COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip

CURVE_KEYS = (
    "train_loss", "train_task_loss", "train_sparsity_loss", "train_acc", "val_clip_acc",
    "val_video_acc", "train_op_fraction", "val_op_fraction", "lr", "sparsity_weight", "time_s",
)  # fmt: skip


def finite(x: Any) -> float | None:
    """``float(x)`` when it is a finite number, else ``None`` (missing, NaN, inf, text)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def counted_density(layer: dict[str, Any]) -> float | None:
    """The density that the operation count uses: temporal for delta layers, else spatial."""
    if "density" in layer:  # nonzero / total as SparsityReport computed it (NaN -> None)
        return finite(layer["density"])
    t = finite(layer.get("temporal_density"))
    return t if t is not None else finite(layer.get("spatial_density"))


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def summary_row(run: RunData, color: str) -> dict[str, Any]:
    ev = run.eval or {}
    sp = run.sparsity or {}
    op_fraction = finite(ev.get("op_fraction", sp.get("op_fraction")))
    op_reduction = finite(ev.get("op_reduction", sp.get("op_reduction")))
    if op_reduction is None and op_fraction:
        op_reduction = 1.0 / op_fraction
    last = run.epochs[-1] if run.epochs else {}
    return {
        "name": run.name,
        "path": str(run.path),
        "phase": run.phase,
        "model": run.model,
        "color": color,
        "evaluated": run.eval is not None,
        "accuracy": finite(ev.get("accuracy")),
        "clip_accuracy": finite(ev.get("clip_accuracy")),
        "video_accuracy": finite(ev.get("video_accuracy")),
        "op_fraction": op_fraction,
        "op_reduction": op_reduction,
        "effective_macs_per_frame": finite(sp.get("effective_macs_per_frame")),
        "dense_macs_per_frame": finite(sp.get("dense_macs_per_frame")),
        "mac_fraction": finite(sp.get("mac_fraction")),
        "executed_fraction": finite(sp.get("executed_fraction")),
        "sparsity_mode": sp.get("mode"),
        "num_clips": ev.get("num_clips"),
        "num_videos": ev.get("num_videos"),
        "skipped_videos": ev.get("skipped_videos"),
        "num_layers": len(run.layers),
        "epochs": len(run.epochs),
        "last_epoch": last.get("epoch"),
        "missing": list(run.missing),
    }


def _rank(phase: str) -> int:
    return PHASES.index(phase) if phase in PHASES else -1


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run against every run of an earlier phase of the same model (delta vs l1, ...).

    ``op_reduction`` is how many times fewer operations the run performs than the reference;
    ``accuracy_change_pp`` the accuracy difference in percentage points.
    """
    out = []
    for a in rows:
        for b in rows:
            if a is b or a["model"] != b["model"] or _rank(a["phase"]) <= _rank(b["phase"]):
                continue
            if not a["op_fraction"] or not b["op_fraction"]:
                continue
            ea, eb = a["effective_macs_per_frame"], b["effective_macs_per_frame"]
            acc = None
            if a["accuracy"] is not None and b["accuracy"] is not None:
                acc = 100.0 * (a["accuracy"] - b["accuracy"])
            out.append(
                {
                    "run": a["name"],
                    "reference": b["name"],
                    "label": f"{a['phase']} vs {b['phase']}",
                    "op_reduction": b["op_fraction"] / a["op_fraction"],
                    "mac_reduction": eb / ea if ea and eb else None,
                    "accuracy_change_pp": acc,
                }
            )
    return out


def _site(layer: dict[str, Any]) -> str:
    """The activation site: the layer name without the suffix that ``convert()`` appends.

    ``measure()`` probes a plain (baseline) model with ``l1`` layers, so its ``activation``
    rows are named ``<site>_l1`` too.
    """
    return re.sub(r"_(delta|l1)(_\d+)?$", "", str(layer.get("name", "?")))


def layer_rows(runs: list[RunData], names: list[str]) -> list[dict[str, Any]]:
    """One row per layer index, with each run's numbers for its layer at that index.

    Runs of different phases insert differently named layers at the same sites, so layers are
    matched by position, and the row names the site once when all runs agree.
    """
    n = max((len(r.layers) for r in runs), default=0)
    rows = []
    for i in range(n):
        per_run: dict[str, Any] = {}
        sites: list[str] = []
        first: dict[str, Any] = {}
        for run, name in zip(runs, names, strict=True):
            if i >= len(run.layers):
                continue
            lay = run.layers[i]
            first = first or lay
            if _site(lay) not in sites:
                sites.append(_site(lay))
            thr = lay.get("threshold") if isinstance(lay.get("threshold"), dict) else None
            per_run[name] = {
                "name": lay.get("name"),
                "kind": lay.get("kind"),
                "density": counted_density(lay),
                "temporal_density": finite(lay.get("temporal_density")),
                "spatial_density": finite(lay.get("spatial_density")),
                "threshold_mean": finite(thr.get("mean")) if thr else None,
                "effective_macs_per_frame": (
                    finite(lay.get("effective_macs")) / lay["frames"]
                    if finite(lay.get("effective_macs")) is not None and lay.get("frames")
                    else None
                ),
            }
        rows.append(
            {
                "index": i,
                "layer": " / ".join(sites),
                "shape": first.get("shape"),
                "fan_out": finite(first.get("fan_out")),
                "runs": per_run,
            }
        )
    return rows


def density_series(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> dict:
    series = []
    for s in summary:
        vals = [r["runs"].get(s["name"], {}).get("density") for r in rows]
        if any(v is not None for v in vals):
            series.append(
                {"run": s["name"], "color": s["color"], "mode": s["sparsity_mode"], "density": vals}
            )
    pos = [v for s in series for v in s["density"] if v]
    # Delta layers often sit two decades below the dense ones: log scale keeps both readable.
    log = bool(pos) and min(pos) / max(pos) < 0.05
    return {"layers": [r["index"] for r in rows], "series": series,
            "yscale": "log" if log else "linear"}  # fmt: skip


def accuracy_points(runs: list[RunData], summary: list[dict[str, Any]]) -> list[dict]:
    """One point per run: from eval.json, or else from the last logged validation epoch."""
    pts = []
    for run, s in zip(runs, summary, strict=True):
        acc, frac, source = s["accuracy"], s["op_fraction"], "eval"
        if acc is None or not frac:
            for e in reversed(run.epochs):
                va = finite(e.get("val_video_acc"))
                va = va if va is not None else finite(e.get("val_clip_acc"))
                vf = finite(e.get("val_op_fraction"))
                if va is not None and vf:
                    acc, frac, source = va, vf, f"validation, epoch {e.get('epoch')}"
                    break
            else:
                continue
        pts.append(
            {
                "run": s["name"],
                "color": s["color"],
                "phase": s["phase"],
                "accuracy_pct": 100.0 * acc,
                "op_fraction": frac,
                "op_reduction": 1.0 / frac,
                "source": source,
            }
        )
    return pts


def threshold_panels(
    runs: list[RunData], names: list[str], colors: list[str], *, max_panels: int = 28,
    bins: int = 20,
) -> dict:  # fmt: skip
    """Histogram counts of the learned thresholds, one panel per layer index (delta runs)."""
    import numpy as np

    n = max((len(r.layers) for r in runs), default=0)
    panels = []
    for i in range(n):
        entries = []
        for run, name, color in zip(runs, names, colors, strict=True):
            if i >= len(run.layers):
                continue
            thr = run.layers[i].get("threshold")
            vals = thr.get("values") if isinstance(thr, dict) else None
            if not vals:
                continue
            v = np.asarray(vals, dtype=float)
            v = v[np.isfinite(v)]
            if v.size:
                entries.append((name, color, run.layers[i].get("name"), v))
        if not entries:
            continue
        lo = min(float(e[3].min()) for e in entries)
        hi = max(float(e[3].max()) for e in entries)
        if hi <= lo:  # one value (layer granularity): a narrow bin around it
            pad = abs(lo) * 0.05 or 1e-3
            lo, hi = lo - pad, hi + pad
        edges = np.linspace(lo, hi, bins + 1)
        panels.append(
            {
                "index": i,
                "layer": entries[0][2],
                "bin_edges": edges.tolist(),
                "runs": [
                    {
                        "run": name,
                        "color": color,
                        "counts": np.histogram(v, bins=edges)[0].tolist(),
                        "n": int(v.size),
                        "mean": float(v.mean()),
                        "median": float(np.median(v)),
                    }
                    for name, color, _, v in entries
                ],
            }
        )
    return {"panels": panels[:max_panels], "omitted_layers": max(0, len(panels) - max_panels)}


def curve_series(runs: list[RunData], summary: list[dict[str, Any]]) -> list[dict]:
    out = []
    for run, s in zip(runs, summary, strict=True):
        if not run.epochs:
            continue
        d: dict[str, Any] = {"run": s["name"], "color": s["color"]}
        d["epoch"] = [e.get("epoch", i) for i, e in enumerate(run.epochs)]
        for k in CURVE_KEYS:
            d[k] = [finite(e.get(k)) for e in run.epochs]
        out.append(d)
    return out


_ENGINE_FIELDS = ("executed_density", "executed_density_with_first", "predicted_density",
                  "prediction_error", "dense_ms_per_frame", "delta_ms_per_frame", "speedup",
                  "dense_baseline", "accuracy", "agreement", "streams", "threads", "backend",
                  "videos")  # fmt: skip


def engine_rows(runs: list[RunData], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run with an engine stage (``engine.json``)."""
    out = []
    for run, row in zip(runs, rows, strict=True):
        if run.engine:
            e = {k: run.engine.get(k) for k in _ENGINE_FIELDS}
            out.append({"run": row["name"], "color": row["color"], **e})
    return out


def engine_series(runs: list[RunData], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Plot data of the engine stage: latency per frame (dense and delta), executed density
    over the frames of a stream and per layer."""
    series = []
    for run, row in zip(runs, rows, strict=True):
        e = run.engine
        if not e:
            continue
        lat = e.get("latency_ms") or {}
        series.append({
            "run": row["name"], "color": row["color"],
            "latency_delta": lat.get("delta") or [],
            "latency_dense": lat.get("fused") if e.get("dense_baseline") == "fused"
            else lat.get("engine_dense") or [],
            "dense_baseline": e.get("dense_baseline"),
            "density_over_time": e.get("density_over_time") or [],
            "layers": [(r["name"], r.get("executed_density")) for r in e.get("layers") or []],
        })  # fmt: skip
    return {"runs": series}
