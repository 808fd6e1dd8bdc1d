"""``build_report``: run folders → ``report.html`` + PNG plots + ``report.json``.

Compares the phases of the paper's pipeline (Yousefzadeh & Sifalakis, arXiv 2107.07305):
a dense baseline, spatial L1 sparsity, and temporal delta sparsity, by accuracy and by the
operations that delta inference performs.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import plots, summary
from .html import render_page
from .runs import RunData, load_run

__all__ = ["PLOT_FILES", "build_report"]

log = logging.getLogger(__name__)

#: The plot keys of ``report.json["plots"]`` and the PNG file each is written to.
PLOT_FILES = {
    "accuracy_vs_reduction": "accuracy_vs_reduction.png",
    "layer_density": "layer_density.png",
    "threshold_histograms": "threshold_histograms.png",
    "training_curves": "training_curves.png",
    "engine": "engine.png",
}


def _unique_names(runs: list[RunData]) -> list[str]:
    names: list[str] = []
    for run in runs:
        name = run.name
        if name in names and run.path.name != name:
            name = f"{name} ({run.path.name})"
        base, i = name, 2
        while name in names:
            name, i = f"{base} #{i}", i + 1
        names.append(name)
    return names


def _version() -> str:
    from .. import __version__

    return __version__


def build_report(
    run_dirs: list[str | Path], out_dir: str | Path, *, title: str | None = None
) -> dict[str, Any]:
    """Read training run folders and write a report to ``out_dir``; return its JSON dict.

    Writes ``report.html`` (one self-contained page), the plots as PNG files and
    ``report.json`` with the numbers the page shows (NaN and infinities as ``null``). Runs
    that are not evaluated or have no logged epochs are reported with what is missing.

    Raises:
        ValueError: ``run_dirs`` is empty, or a run file is not valid JSON.
        FileNotFoundError: a folder does not exist or has no ``config.json``.
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise ValueError("build_report(): no run folders given; pass one or more run folders")
    runs = [load_run(p) for p in run_dirs]
    names = _unique_names(runs)
    colors = [summary.COLORS[i % len(summary.COLORS)] for i in range(len(runs))]
    rows = []
    for run, name, color in zip(runs, names, colors, strict=True):
        row = summary.summary_row(run, color)
        row["name"] = name
        rows.append(row)

    layer_rows = summary.layer_rows(runs, names)
    thresholds = summary.threshold_panels(runs, names, colors)
    notes: list[str] = []
    if thresholds["omitted_layers"]:
        notes.append(
            f"threshold histograms: only the first {len(thresholds['panels'])} layers are "
            f"drawn; {thresholds['omitted_layers']} more are in report.json only as means"
        )
    plot_data: dict[str, dict[str, Any]] = {
        "accuracy_vs_reduction": {"points": summary.accuracy_points(runs, rows)},
        "layer_density": summary.density_series(layer_rows, rows),
        "threshold_histograms": thresholds,
        "training_curves": {"runs": summary.curve_series(runs, rows)},
        "engine": summary.engine_series(runs, rows),
    }
    reasons = {
        "accuracy_vs_reduction": (
            not plot_data["accuracy_vs_reduction"]["points"],
            "No run has an accuracy and an op_fraction (no eval.json, no validated epoch).",
        ),
        "layer_density": (
            not plot_data["layer_density"]["series"],
            "No run has per-layer densities (they come from eval.json).",
        ),
        "threshold_histograms": (
            not thresholds["panels"],
            "No delta run with recorded threshold values (eval.json of a delta run, layers "
            "with at most 4096 thresholds).",
        ),
        "training_curves": (
            not plot_data["training_curves"]["runs"],
            "No run has logged epochs in metrics.json.",
        ),
        "engine": (
            not plot_data["engine"]["runs"],
            "No run has an engine stage (engine.json, written by the demo or by "
            "`deltasparse eval --engine --out RUN/engine.json`).",
        ),
    }
    drawers = {
        "accuracy_vs_reduction": lambda d, p: plots.plot_accuracy(d["points"], p),
        "layer_density": plots.plot_layer_density,
        "threshold_histograms": plots.plot_thresholds,
        "training_curves": lambda d, p: plots.plot_curves(d["runs"], p),
        "engine": plots.plot_engine,
    }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes | None] = {}
    for key, fname in PLOT_FILES.items():
        path = out / fname
        empty, reason = reasons[key]
        if empty:
            path.unlink(missing_ok=True)  # a stale plot of an earlier report would mislead
            plot_data[key] = {**plot_data[key], "file": None, "reason": reason}
            images[key] = None
            continue
        drawers[key](plot_data[key], path)
        plot_data[key] = {**plot_data[key], "file": fname}
        images[key] = path.read_bytes()
        log.info("report: wrote %s", path)

    report = summary.sanitize(
        {
            "title": title or f"deltasparse report: {', '.join(names)}",
            "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "deltasparse_version": _version(),
            "runs": rows,
            "comparisons": summary.comparisons(rows),
            "engine": summary.engine_rows(runs, rows),
            "plots": plot_data,
            "layers": layer_rows,
            "notes": notes,
        }
    )
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    (out / "report.html").write_text(render_page(report, images), encoding="utf-8")
    log.info("report: wrote %s", out / "report.html")
    return report
