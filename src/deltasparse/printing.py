"""Rich tables for the CLI: benchmark rows and engine stats (the library itself never prints)."""

from __future__ import annotations

__all__ = ["StreamProgress", "bench_markdown", "bench_table", "print_bench", "print_stats",
           "print_stream", "short_name", "stats_table", "stream_summary"]


def short_name(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters: the tail is kept (it tells layers apart),
    cut at a ``.`` where possible, e.g. ``features.12.1.0`` -> ``…12.1.0``."""
    if len(name) <= width:
        return name
    tail = name[-(width - 1) :]
    dot = tail.find(".")
    if 0 <= dot < len(tail) - 1 and len(tail) - dot - 1 >= width // 2:
        tail = tail[dot + 1 :]
    return "…" + tail


def fmt(v, spec: str, suffix: str = "", none: str = "-") -> str:
    """``format(v, spec) + suffix``, or ``none`` for a missing figure (None)."""
    return none if v is None else format(v, spec) + suffix


def bench_table(result: dict):
    """The benchmark rows; the headline speedup is against the fused dense baseline (the
    engine with every op dense: folded batch norm, one-pass epilogue), the model's own eager
    forward is the secondary column. Fits 80 columns."""
    from rich import box
    from rich.table import Table

    t = Table(title=f"DeltaEngine vs dense ({result.get('device', 'cpu')}, medians)",
              box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0, 0, 1))  # fmt: skip
    cols = ("model", "res", "thr", "target\ndens.", "got\ndens.", "fused\nms", "delta\nms",
            "speedup\n(fused)", "vs\neager", "ideal")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True)
    for r in result["rows"]:
        fused = r.get("speedup_vs_fused_dense")
        t.add_row(
            short_name(r["model"], 12), short_name(r["resolution"], 7), str(r["threads"]),
            f"{r['target_density']:.0%}", _density(r["density"]),
            _ms(r.get("fused_dense_ms")), _ms(r["delta_ms"]),
            fmt(fused, ".2f") + ("x" if fused is not None else ""),
            f"{r['achieved_speedup']:.1f}x", f"{r['ideal_speedup']:.1f}x",
        )  # fmt: skip
    t.caption = ("speedup: fused dense ms / delta ms (the engine with every op dense: same MACs, "
                 "BN folded); vs eager: the model's own forward; ideal: dense / effective MACs")  # fmt: skip
    return t


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def _density(d: float) -> str:
    """Achieved density in at most 5 characters (the JSON has every digit)."""
    return f"{d:.1%}" if d < 0.995 else f"{d:.0%}"


def stats_table(stats, top: int = 0):
    """Per-layer table of ``engine.stats`` (an ``EngineStats`` or its ``to_dict()``); fits 80
    columns (long layer names keep their tail)."""
    from rich.table import Table

    if isinstance(stats, dict):
        from .engine.stats import EngineStats

        keys = ("frames", "dense_macs", "effective_macs", "delta_macs", "time_s", "state_bytes",
                "table_bytes", "dense_activation_bytes", "backend", "layers")  # fmt: skip
        stats = EngineStats(**{k: stats[k] for k in keys}, fallbacks=stats.get("fallbacks", []))

    t = Table(title=f"DeltaEngine stats: {stats.frames} frames, backend {stats.backend}")
    layers = stats.layers
    if top:
        layers = sorted(layers, key=lambda r: -r["time_s"])[:top]
    width = min(24, max([5, *(len(r["name"]) for r in layers)]))
    t.add_column("layer", justify="left", no_wrap=True, min_width=width, max_width=width)
    kind_w = max([4, *(len(r["kind"]) for r in layers)])
    t.add_column("kind", no_wrap=True, min_width=kind_w)
    for col in ("in", "computed", "out", "MACs", "ms/frame"):
        t.add_column(col, justify="right", no_wrap=True)
    f = max(stats.frames, 1)

    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    for r in layers:
        eff = r["effective_macs"] / r["dense_macs"] if r["dense_macs"] else None
        t.add_row(short_name(r["name"], width), r["kind"], pct(r["input_density"]),
                  pct(r["computed_density"]), pct(r["output_density"]), pct(eff),
                  f"{1e3 * r['time_s'] / f:.2f}")  # fmt: skip
    density = pct(stats.density if stats.dense_macs else None)
    speedup = fmt(stats.ideal_speedup if stats.effective_macs else None, ".2f") + "x"
    t.caption = (
        f"in / out: changed input / output pixels; computed: rows recomputed; MACs: "
        f"effective / dense. Total {density} of the dense MACs (ideal speedup {speedup}); "
        f"state {stats.state_bytes / 2**20:.1f} MiB + tables {stats.table_bytes / 2**20:.1f} "
        f"MiB = {stats.memory_ratio:.2f}x one dense frame's activations"
    )
    for reason in stats.fallbacks:
        t.caption += f"\nfallback: {reason}"
    return t


def print_bench(result: dict, console=None) -> None:
    from rich.console import Console

    (console or Console()).print(bench_table(result))


def print_stats(stats, console=None, top: int = 0) -> None:
    from rich.console import Console

    (console or Console()).print(stats_table(stats, top))


class StreamProgress:
    """A live rich progress bar for ``run_stream(on_frame=...)``: engine fps and density.

    fps is :func:`deltasparse.stream.engine_fps` over the frames so far (frames / the sum of
    their step times), the figure the result's ``engine_fps`` reports at the end."""

    def __init__(self, total: int | None = None, console=None) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]stream"), BarColumn(), TextColumn("{task.completed} frames"),
            TextColumn("{task.fields[fps]:.1f} engine fps"),
            TextColumn("density {task.fields[dens]}"),
            TimeElapsedColumn(), console=console, transient=False,
        )  # fmt: skip
        self._task = self._progress.add_task("stream", total=total, fps=0.0, dens="-")
        self._times: list[float] = []

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    @property
    def fps(self) -> float | None:
        from .stream import engine_fps

        return engine_fps(self._times)

    def __call__(self, info: dict) -> None:
        self._times.append(info["time_ms"])
        d = info.get("density")
        self._progress.update(self._task, advance=1, fps=self.fps or 0.0,
                              dens="-" if d is None else f"{d:.1%}")  # fmt: skip


def stream_summary(result: dict) -> list[str]:
    """The lines the CLI prints after ``run_stream``: speed, predictions, the verify verdict."""
    from collections import Counter

    from .stream import verify_message

    lines = []
    fps = result.get("engine_fps")
    dens = result.get("density")
    lines.append(
        f"{result['frames']} frames {result['height']}x{result['width']} on {result['device']} "
        f"({result['backend']}): {fmt(fps, '.1f')} engine fps (frames / sum of step times), "
        f"{fmt(dens, '.1%')} of the dense MACs"
    )
    preds = Counter(f.get("label", f.get("pred")) for f in result["per_frame"] if "pred" in f)
    if preds:
        top = ", ".join(f"{k} ({n} frames)" for k, n in preds.most_common(3))
        lines.append(f"predicted: {top}")
    v = result.get("verify")
    if v is not None:
        lines.append(verify_message(v))
    return lines


def print_stream(result: dict, console=None) -> None:
    """Engine stats table, then :func:`stream_summary` (the verify verdict last)."""
    from rich.console import Console

    console = console or Console()
    console.print(stats_table(result["stats"]))
    v = result.get("verify")
    for line in stream_summary(result):
        style = None
        if v is not None and line.startswith("verify"):
            style = "bold green" if v["passed"] else "bold red"
        console.print(line, style=style, markup=False, highlight=False)


def bench_markdown(result: dict) -> str:
    """The benchmark rows as a Markdown table (for bench/results/ and the README); the
    headline speedup is against the fused dense baseline, as in :func:`bench_table`."""

    def f(r, key, spec, suffix=""):
        return fmt(r.get(key), spec, suffix)

    head = ("| model | resolution | threads | target density | achieved density | "
            "fused dense ms | delta ms | speedup vs fused dense | eager ms | vs eager | ideal | "
            "fused speedup / ideal | top-1 agree | max abs err | state/dense act |")  # fmt: skip
    lines = [head, "|" + "---|" * 15]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['height']}x{r['width']} | {r['threads']} | "
            f"{r['target_density']:.0%} | {r['density']:.1%} | {f(r, 'fused_dense_ms', '.1f')} | "
            f"{r['delta_ms']:.1f} | {f(r, 'speedup_vs_fused_dense', '.2f', 'x')} | "
            f"{r['dense_ms']:.1f} | {r['achieved_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
            f"{f(r, 'efficiency', '.2f')} | {f(r, 'top1_agreement', '.0%')} | "
            f"{r['max_abs_err']:.1e} | {r['memory_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"
