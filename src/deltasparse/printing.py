"""Rich tables for the CLI: benchmark rows and engine stats (the library itself never prints)."""

from __future__ import annotations

__all__ = ["StreamProgress", "bench_markdown", "bench_table", "print_bench", "print_stats", "stats_table"]


def bench_table(result: dict):
    from rich.table import Table

    t = Table(title=f"DeltaEngine vs dense ({result.get('device', 'cpu')}, medians)")
    for col in ("model", "res", "thr", "target", "density", "dense ms", "delta ms",
                "speedup", "ideal", "ratio", "mem"):  # fmt: skip
        t.add_column(col, justify="right")
    for r in result["rows"]:
        t.add_row(
            r["model"], r["resolution"], str(r["threads"]), f"{r['target_density']:.0%}",
            f"{r['density']:.1%}", f"{r['dense_ms']:.1f}", f"{r['delta_ms']:.1f}",
            f"{r['achieved_speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", f"{r['ratio']:.2f}",
            f"{r['memory_ratio']:.2f}",
        )  # fmt: skip
    return t


def stats_table(stats, top: int = 0):
    """Per-layer table of ``engine.stats`` (an ``EngineStats`` or its ``to_dict()``)."""
    from rich.table import Table

    if isinstance(stats, dict):
        from .engine.stats import EngineStats

        keys = ("frames", "dense_macs", "effective_macs", "delta_macs", "time_s", "state_bytes",
                "table_bytes", "dense_activation_bytes", "backend", "layers")  # fmt: skip
        stats = EngineStats(**{k: stats[k] for k in keys})

    t = Table(title=f"DeltaEngine stats: {stats.frames} frames, backend {stats.backend}")
    for col in ("layer", "kind", "in dens.", "computed", "out dens.", "MACs eff/dense", "ms/frame"):
        t.add_column(col, justify="right")
    layers = stats.layers
    if top:
        layers = sorted(layers, key=lambda r: -r["time_s"])[:top]
    f = max(stats.frames, 1)
    for r in layers:
        def pct(v):
            return "-" if v is None else f"{v:.1%}"

        eff = f"{r['effective_macs'] / r['dense_macs']:.1%}" if r["dense_macs"] else "-"
        t.add_row(r["name"], r["kind"], pct(r["input_density"]), pct(r["computed_density"]),
                  pct(r["output_density"]), eff, f"{1e3 * r['time_s'] / f:.2f}")  # fmt: skip
    t.caption = (
        f"effective/dense MACs {stats.density:.1%}, ideal speedup {stats.ideal_speedup:.2f}x, "
        f"state {stats.state_bytes / 2**20:.1f} MiB + tables {stats.table_bytes / 2**20:.1f} MiB "
        f"= {stats.memory_ratio:.2f}x one dense frame's activations"
    )
    return t


def print_bench(result: dict, console=None) -> None:
    from rich.console import Console

    (console or Console()).print(bench_table(result))


def print_stats(stats, console=None, top: int = 0) -> None:
    from rich.console import Console

    (console or Console()).print(stats_table(stats, top))


class StreamProgress:
    """A live rich progress bar for ``run_stream(on_frame=...)``: fps and density."""

    def __init__(self, total: int | None = None, console=None) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]stream"), BarColumn(), TextColumn("{task.completed} frames"),
            TextColumn("{task.fields[fps]:.1f} fps"), TextColumn("density {task.fields[dens]}"),
            TimeElapsedColumn(), console=console, transient=False,
        )  # fmt: skip
        self._task = self._progress.add_task("stream", total=total, fps=0.0, dens="-")
        self._times: list[float] = []

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def __call__(self, info: dict) -> None:
        self._times.append(info["time_ms"])
        recent = self._times[-20:]
        fps = 1e3 * len(recent) / max(sum(recent), 1e-9)
        d = info.get("density")
        self._progress.update(self._task, advance=1, fps=fps,
                              dens="-" if d is None else f"{d:.1%}")  # fmt: skip


def bench_markdown(result: dict) -> str:
    """The benchmark rows as a Markdown table (for bench/results/ and the README)."""
    nan = float("nan")
    head = ("| model | resolution | threads | target | density | dense ms | fused dense ms | "
            "delta ms | speedup | ideal | achieved/ideal | vs fused dense | top-1 agree | "
            "max abs err | state/dense act |")  # fmt: skip
    lines = [head, "|" + "---|" * 15]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['height']}x{r['width']} | {r['threads']} | "
            f"{r['target_density']:.0%} | {r['density']:.1%} | {r['dense_ms']:.1f} | "
            f"{r.get('fused_dense_ms', nan):.1f} | {r['delta_ms']:.1f} | "
            f"{r['achieved_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['ratio']:.2f} | "
            f"{r.get('speedup_vs_fused_dense', nan):.2f}x | "
            f"{r.get('top1_agreement', nan):.0%} | {r['max_abs_err']:.1e} | "
            f"{r['memory_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"
