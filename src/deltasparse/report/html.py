"""One self-contained HTML page: inline CSS, PNGs as base64 data URIs, no scripts, no network."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

__all__ = ["render_page"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
  margin:0 auto;max-width:1400px;padding:1.2rem 2rem 3rem;color:#222;line-height:1.4}
h1{margin:0 0 .2rem;font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;
  padding-bottom:.2rem;font-size:1.25rem}
.meta{color:#666;font-size:.9rem}.meta code{font-size:.85rem}
table{border-collapse:collapse;font-size:.88rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.28rem .55rem;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.l,th.l{text-align:left}tr:nth-child(even) td{background:#fafafa}
.wrap{overflow-x:auto}
.sw{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.35em;
  vertical-align:-.05em}
.missing{background:#fff8e1;border-left:4px solid #f0b400;padding:.5rem .8rem;margin:.6rem 0}
.missing ul{margin:.2rem 0 .2rem 1.2rem;padding:0}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.88rem;margin-top:.3rem}
.na{color:#999}
"""


def _na() -> str:
    return '<span class="na">–</span>'


def _pct(x: float | None, digits: int = 1) -> str:
    if x is None:
        return _na()
    v = 100.0 * x
    return f"{v:.{digits + 1}f}%" if abs(v) < 1 else f"{v:.{digits}f}%"


def _times(x: float | None) -> str:
    return _na() if x is None else f"{x:.2f}×"


def _macs(x: float | None) -> str:
    if x is None:
        return _na()
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


def _num(x: Any) -> str:
    return _na() if x is None else escape(f"{x:g}" if isinstance(x, float) else str(x))


def _swatch(color: str) -> str:
    return f'<span class="sw" style="background:{escape(color)}"></span>'


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    """``head`` and cells are HTML already; the first ``left`` columns are left-aligned."""
    th = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>"
                 for i, h in enumerate(head))  # fmt: skip
    body = "".join(
        "<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                         for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )  # fmt: skip
    return f'<div class="wrap"><table><tr>{th}</tr>{body}</table></div>'


def _summary(report: dict[str, Any]) -> str:
    vs: dict[str, list[str]] = {}
    for c in report["comparisons"]:
        vs.setdefault(c["run"], []).append(f"{c['op_reduction']:.2f}× vs {escape(c['reference'])}")
    head = ["run", "phase", "model", "accuracy", "clip acc", "video acc", "op_fraction",
            "op reduction", "executed", "eff. MACs/frame", "dense MACs/frame", "mac_fraction",
            "fewer ops than", "epochs", "videos"]  # fmt: skip
    rows = []
    for r in report["runs"]:
        videos = _num(r["num_videos"])
        if r["skipped_videos"]:
            videos += f" ({_num(r['skipped_videos'])} skipped)"
        rows.append([
            _swatch(r["color"]) + escape(r["name"]), escape(r["phase"]), escape(r["model"]),
            _pct(r["accuracy"]), _pct(r["clip_accuracy"]), _pct(r["video_accuracy"]),
            _pct(r["op_fraction"], 2), _times(r["op_reduction"]), _pct(r["executed_fraction"]),
            _macs(r["effective_macs_per_frame"]), _macs(r["dense_macs_per_frame"]),
            _pct(r["mac_fraction"], 2), "<br>".join(vs.get(r["name"], [])) or _na(),
            _num(r["epochs"]), videos,
        ])  # fmt: skip
    return _table(head, rows, left=3)


def _comparisons(report: dict[str, Any]) -> str:
    comps = report["comparisons"]
    if not comps:
        return ('<p class="na">No pair of evaluated runs of the same model and different phases '
                "to compare.</p>")  # fmt: skip
    head = ["run", "reference", "phases", "op reduction vs reference",
            "MAC reduction vs reference", "accuracy change"]  # fmt: skip
    rows = [
        [escape(c["run"]), escape(c["reference"]), escape(c["label"]), _times(c["op_reduction"]),
         _times(c["mac_reduction"]),
         _na() if c["accuracy_change_pp"] is None else f"{c['accuracy_change_pp']:+.2f} pp"]
        for c in comps
    ]  # fmt: skip
    return _table(head, rows, left=3)


def _engine(report: dict[str, Any]) -> str:
    rows_in = report.get("engine") or []
    if not rows_in:
        return ('<p class="na">No run has an engine stage (engine.json, written by the demo or '
                "by <code>deltasparse eval --engine</code>).</p>")  # fmt: skip
    head = ["run", "executed density", "predicted", "delta ms/frame", "dense ms/frame",
            "speedup", "accuracy", "agreement", "streams × threads"]  # fmt: skip
    rows = []
    for r in rows_in:
        rows.append([
            _swatch(r["color"]) + escape(r["run"]), _pct(r["executed_density"]),
            _pct(r["predicted_density"]), f"{r['delta_ms_per_frame']:.3f}",
            f"{r['dense_ms_per_frame']:.3f} ({escape(str(r['dense_baseline']))})",
            _times(r["speedup"]), _pct(r["accuracy"]), _pct(r["agreement"], 2),
            f"{_num(r['streams'])} × {_num(r['threads'])} ({escape(str(r['backend']))})",
        ])  # fmt: skip
    return _table(head, rows, left=1)


def _missing(report: dict[str, Any]) -> str:
    items = []
    for r in report["runs"]:
        if r["missing"]:
            li = "".join(f"<li>{escape(m)}</li>" for m in r["missing"])
            items.append(f"<li><b>{escape(r['name'])}</b> (<code>{escape(r['path'])}</code>)"
                         f"<ul>{li}</ul></li>")  # fmt: skip
    for note in report["notes"]:
        items.append(f"<li>{escape(note)}</li>")
    if not items:
        return ""
    return f'<div class="missing"><b>Missing pieces</b><ul>{"".join(items)}</ul></div>'


def _figure(key: str, caption: str, report: dict[str, Any], images: dict) -> str:
    plot = report["plots"][key]
    png = images.get(key)
    if png is None:
        return f'<p class="missing">{escape(plot.get("reason") or "No data for this plot.")}</p>'
    b64 = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{escape(caption)} (file <code>{escape(plot['file'])}</code>)"
            "</figcaption></figure>")  # fmt: skip


def _layers(report: dict[str, Any]) -> str:
    rows_in = report["layers"]
    if not rows_in:
        return '<p class="missing">No evaluated run lists per-layer numbers.</p>'
    runs = [r for r in report["runs"] if any(r["name"] in row["runs"] for row in rows_in)]
    thr_runs = {n for row in rows_in for n, v in row["runs"].items()
                if v["threshold_mean"] is not None}  # fmt: skip
    head = ["#", "layer", "shape", "fan_out"]
    for r in runs:
        head.append(f"{_swatch(r['color'])}{escape(r['name'])}<br>density")
        if r["name"] in thr_runs:
            head.append(f"{_swatch(r['color'])}{escape(r['name'])}<br>mean |θ|")
    rows = []
    for row in rows_in:
        shape = row["shape"]
        cells = [str(row["index"]), escape(row["layer"]),
                 "×".join(map(str, shape)) if shape else _na(), _num(row["fan_out"])]  # fmt: skip
        for r in runs:
            v = row["runs"].get(r["name"], {})
            cells.append(_pct(v.get("density"), 2))
            if r["name"] in thr_runs:
                t = v.get("threshold_mean")
                cells.append(_na() if t is None else f"{t:.4g}")
        rows.append(cells)
    return _table(head, rows, left=2)


def render_page(report: dict[str, Any], images: dict[str, bytes | None]) -> str:
    """The page for ``report`` (the dict written to report.json) and the plots' PNG bytes."""
    title = escape(report["title"])
    folders = ", ".join(f"<code>{escape(r['path'])}</code>" for r in report["runs"])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{title}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{title}</h1>",
        f'<div class="meta">Generated {escape(report["generated_at"])} by deltasparse '
        f"{escape(report['deltasparse_version'])} from {len(report['runs'])} run(s): {folders}. "
        "The numbers shown are in <code>report.json</code> beside this page.</div></header>",
        _missing(report),
        "<h2>Summary</h2>",
        "<p>Accuracy is the test accuracy of <code>eval.json</code> (clip and video accuracy "
        "beside it). <i>op_fraction</i> is the fraction of the dense model's operations that "
        "delta inference performs (Σ fan_out·nonzero / Σ fan_out·total); <i>op reduction</i> "
        "is its inverse. Effective MACs are counted exactly on the binarised delta maps.</p>",
        _summary(report),
        "<h2>Counted and executed: the engine stage</h2>",
        "<p><i>executed</i> in the summary is what <code>measure()</code> predicts the delta "
        "engine executes on the evaluation clips (whole pixels, widened by every window, dense "
        "where most rows changed); the engine stage streams the held-out videos through "
        "<code>DeltaEngine</code> (several videos as a batch of streams), measures the same "
        "figure and times it against the fastest dense model (batch norm folded), in one "
        "process, at the same threads. Steady state: the first frame of a stream excluded.</p>",
        _engine(report),
        _figure("engine", "Latency per frame (dense vs delta), executed density over the frames "
                "of a stream and per layer", report, images),
        "<h2>Comparisons</h2>",
        "<p>Each run against runs of earlier phases of the same model "
        "(baseline → l1 → delta_scratch → delta).</p>",
        _comparisons(report),
        "<h2>Accuracy against operation reduction</h2>",
        _figure("accuracy_vs_reduction", "Accuracy (%) against op reduction, one point per run "
                "(hollow: last validation epoch, the run has no eval.json)", report, images),
        "<h2>Per-layer density</h2>",
        _figure("layer_density", "Counted density per layer index and run (the indices are "
                "named in the per-layer table below)", report, images),
        "<h2>Learned thresholds</h2>",
        _figure("threshold_histograms", "Histogram of the learned thresholds |θ| of each delta "
                "layer (dashed line: mean)", report, images),
        "<h2>Training curves</h2>",
        _figure("training_curves", "Loss, accuracy, op_fraction and sparsity-loss weight per "
                "epoch", report, images),
        "<h2>Per-layer table</h2>",
        "<p>Layers are matched by position. The density is what the operation count uses: "
        "temporal (deltas) for delta layers, spatial (activations) otherwise.</p>",
        _layers(report),
        "</body></html>",
    ]  # fmt: skip
    return "\n".join(p for p in parts if p)
