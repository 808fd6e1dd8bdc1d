"""The report's PNG plots, drawn from the numbers that :mod:`.summary` computed.

matplotlib is imported lazily and drawn through the Agg canvas directly (no ``pyplot``), so
building a report neither needs a display nor changes the backend of the caller's session.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["plot_accuracy", "plot_curves", "plot_engine", "plot_layer_density", "plot_thresholds"]

_RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png", dpi=100)


def _nan(vals: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in vals]


def plot_layer_density(data: dict[str, Any], path: Path) -> None:
    """Grouped bars: per layer index, the counted density of each run."""
    import matplotlib
    import numpy as np

    layers, series = data["layers"], data["series"]
    n, k = len(layers), len(series)
    with matplotlib.rc_context(_RC):
        fig = _figure(min(24.0, max(8.0, 1.6 + n * (0.16 * k + 0.14))), 4.6)
        ax = fig.add_subplot()
        x = np.arange(n)
        width = 0.84 / max(k, 1)
        for j, s in enumerate(series):
            mode = f", {s['mode']}" if s["mode"] else ""
            ax.bar(
                x + (j - (k - 1) / 2) * width, _nan(s["density"]), width,
                color=s["color"], label=f"{s['run']}{mode}", edgecolor="white", linewidth=0.3,
            )  # fmt: skip
        ax.set_yscale(data["yscale"])
        if data["yscale"] == "linear":
            ax.set_ylim(0, None)
        ax.set_xticks(x, [str(i) for i in layers])
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_xlabel("layer index (names in the per-layer table)")
        ax.set_ylabel("counted density (nonzero / total)")
        ax.set_title(
            "Per-layer density of the counted activations\n"
            "(temporal deltas for delta runs, activations otherwise; lower = fewer operations)",
            fontsize=10,
        )
        ax.grid(axis="x", visible=False)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        _save(fig, path)


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 1.5, 2, 3, 5, 7):
            ticks.append(m * 10**e)
    ticks = [t for t in ticks if lo <= t <= hi]
    while len(ticks) > 9:
        ticks = ticks[::2]
    return ticks


def plot_accuracy(points: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (%) against op reduction (x, log), one labelled point per run."""
    import matplotlib
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    with matplotlib.rc_context(_RC):
        fig = _figure(7.5, 5.0)
        ax = fig.add_subplot()
        for j, p in enumerate(points):
            hollow = p["source"] != "eval"
            ax.scatter(
                [p["op_reduction"]], [p["accuracy_pct"]], s=90, zorder=3,
                color="white" if hollow else p["color"], edgecolors=p["color"], linewidths=2,
                label=p["run"] + (f" ({p['source']})" if hollow else ""),
            )  # fmt: skip
            ax.annotate(
                f"{p['run']}\n{p['op_reduction']:.2f}× fewer ops, {p['accuracy_pct']:.1f}%",
                (p["op_reduction"], p["accuracy_pct"]), xytext=(10, 10 if j % 2 == 0 else -24),
                textcoords="offset points", fontsize=9, color=p["color"],
            )  # fmt: skip
        xs = [p["op_reduction"] for p in points]
        ys = [p["accuracy_pct"] for p in points]
        lo, hi = min(xs + [1.0]) / 1.25, max(xs) * 2.2
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(FixedLocator(_log_ticks(lo, hi)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        span = max(max(ys) - min(ys), 2.0)
        ax.set_ylim(max(0.0, min(ys) - 0.4 * span), min(100.0, max(ys) + 0.4 * span))
        ax.set_xlabel("op reduction = 1 / op_fraction (log scale; right = fewer operations)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Accuracy against operation reduction")
        ax.legend(loc="best", frameon=False)
        _save(fig, path)


def plot_thresholds(data: dict[str, Any], path: Path) -> None:
    """Small multiples: histogram of the learned thresholds of each delta layer."""
    import matplotlib
    import numpy as np

    panels = data["panels"]
    ncols = min(7, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with matplotlib.rc_context({**_RC, "font.size": 8, "axes.titlesize": 8.5}):
        fig = _figure(max(6.0, 2.3 * ncols), 1.9 * nrows + 0.9)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        handles = {}
        for ax, p in zip(axes, panels, strict=False):
            edges = np.asarray(p["bin_edges"])
            for r in p["runs"]:
                h = ax.stairs(r["counts"], edges, fill=True, alpha=0.35, color=r["color"])
                ax.stairs(r["counts"], edges, color=r["color"], linewidth=1.2)
                ax.axvline(r["mean"], color=r["color"], linestyle="--", linewidth=0.9)
                handles.setdefault(r["run"], h)
            name = str(p["layer"] or "")
            ax.set_title(f"#{p['index']} {name[-22:]}", loc="left")
            ax.tick_params(labelsize=7)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        fig.supxlabel("threshold |θ| (dashed: mean)")
        fig.supylabel("number of thresholds")
        extra = data.get("omitted_layers") or 0
        more = f" (first {len(panels)} layers; {extra} more omitted)" if extra else ""
        fig.suptitle(f"Learned delta thresholds per layer{more}", fontsize=11)
        fig.legend(list(handles.values()), list(handles), loc="outside upper right",
                   ncols=min(4, len(handles)), frameon=False)  # fmt: skip
        _save(fig, path)


_PANELS = (
    ("loss", "loss", [("train_loss", "-", "train (total)"),
                      ("train_task_loss", "--", "train (task)")]),
    ("accuracy", "accuracy (%)", [("train_acc", "-", "train"),
                                  ("val_video_acc", "--", "val (video)"),
                                  ("val_clip_acc", ":", "val (clip)")]),
    ("op_fraction", "op_fraction (ops performed / dense)",
     [("train_op_fraction", "-", "train"), ("val_op_fraction", "--", "val")]),
    ("sparsity weight", "sparsity-loss weight", [("sparsity_weight", "-", "schedule")]),
)  # fmt: skip


def plot_curves(curves: list[dict[str, Any]], path: Path) -> None:
    """Training curves: loss, accuracy, op_fraction and sparsity weight per epoch."""
    import matplotlib
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    with matplotlib.rc_context(_RC):
        fig = _figure(12.0, 7.5)
        axes = fig.subplots(2, 2).ravel()
        for ax, (title, ylabel, keys) in zip(axes, _PANELS, strict=True):
            styles = []
            for c in curves:
                for key, ls, label in keys:
                    vals = c[key]
                    if all(v is None for v in vals):
                        continue
                    if key.endswith("acc"):
                        vals = [None if v is None else 100.0 * v for v in vals]
                    # Validation may run every few epochs: join the epochs that have it.
                    xy = [(e, v) for e, v in zip(c["epoch"], vals, strict=True) if v is not None]
                    ax.plot([e for e, _ in xy], [v for _, v in xy], linestyle=ls,
                            color=c["color"], marker="o", markersize=3, linewidth=1.6)  # fmt: skip
                    if (ls, label) not in styles:
                        styles.append((ls, label))
            if keys[0][0] == "sparsity_weight" and any(
                v and v > 0 for c in curves for v in c["sparsity_weight"]
            ):
                ax.set_yscale("log")
            ax.set_title(title)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            if not styles:
                ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center",
                        color="grey")  # fmt: skip
            elif len(keys) > 1:
                ax.legend([Line2D([], [], color="0.3", linestyle=ls) for ls, _ in styles],
                          [lab for _, lab in styles], frameon=False)  # fmt: skip
        fig.suptitle("Training curves", fontsize=12)
        fig.legend([Line2D([], [], color=c["color"], linewidth=3) for c in curves],
                   [c["run"] for c in curves], loc="outside upper right",
                   ncols=min(5, len(curves)), frameon=False)  # fmt: skip
        _save(fig, path)


def plot_engine(data: dict[str, Any], path: Path) -> None:
    """The engine stage: latency per frame (dense vs delta), executed density over the frames
    of a stream, and executed density per layer."""
    import matplotlib
    import numpy as np

    runs = data["runs"]
    with matplotlib.rc_context(_RC):
        fig = _figure(13.0, 4.4)
        ax_lat, ax_t, ax_l = fig.subplots(1, 3, width_ratios=[1.0, 1.2, 1.4])
        labels, boxes, colors = [], [], []
        for r in runs:
            for kind, key in (("dense", "latency_dense"), ("delta", "latency_delta")):
                if r[key]:
                    labels.append(f"{r['run']}: {kind}")
                    boxes.append(r[key])
                    colors.append(r["color"] if kind == "delta" else "0.6")
        if boxes:
            bp = ax_lat.boxplot(boxes, showfliers=False, patch_artist=True)
            for patch, c in zip(bp["boxes"], colors, strict=True):
                patch.set_facecolor(c)
                patch.set_alpha(0.6)
            ax_lat.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right",
                              fontsize=8)  # fmt: skip
        ax_lat.set_ylabel("ms per frame (steady state)")
        ax_lat.set_ylim(0, None)
        ax_lat.set_title("Latency per frame")
        for r in runs:
            d = _nan(r["density_over_time"])
            ax_t.plot(np.arange(len(d)), [100 * v for v in d], marker="o", markersize=3,
                      color=r["color"], label=r["run"])  # fmt: skip
        ax_t.set_xlabel("frame of the stream (0: dense first frame)")
        ax_t.set_ylabel("executed MACs / dense MACs (%)")
        ax_t.set_ylim(0, 105)
        ax_t.set_title("Executed density over time")
        ax_t.legend(frameon=False)
        names = [n for n, _ in runs[0]["layers"]] if runs else []
        x = np.arange(len(names))
        width = 0.84 / max(len(runs), 1)
        for j, r in enumerate(runs):
            vals = dict(r["layers"])
            ax_l.bar(x + (j - (len(runs) - 1) / 2) * width,
                     [100 * (vals.get(n) or 0) for n in names], width, color=r["color"],
                     label=r["run"])  # fmt: skip
        ax_l.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax_l.set_ylabel("executed density (%)")
        ax_l.set_ylim(0, 105)
        ax_l.set_title("Executed density per layer (steady state)")
        ax_l.grid(axis="x", visible=False)
        _save(fig, path)
