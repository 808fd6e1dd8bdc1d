"""rich progress bars for long work (training epochs, streams, benchmarks)."""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["task_progress", "train_progress"]


class _Bar:
    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def update(self, advance: int = 1, **fields) -> None:
        text = "  ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in fields.items()
            if v is not None
        )
        if self._progress is not None:
            self._progress.update(self._task, advance=advance, info=text)


@contextmanager
def train_progress(cfg, epoch: int, total: int, *, enabled: bool = True):
    """A bar per epoch with live loss, accuracy and op_fraction (no-op when disabled)."""
    if not enabled:
        yield _Bar(None, None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn(f"[bold]{cfg.phase}[/] epoch {epoch + 1}/{cfg.epochs}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=False,
    ) as progress:
        task = progress.add_task("train", total=total, info="")
        yield _Bar(progress, task)


@contextmanager
def task_progress(title: str, *, console=None, enabled: bool = True):
    """A bar for long work that reports ``(done, total, info=...)``; ``total`` may be None
    (unknown). Yields the callable ``update(done, total, info="")``."""
    if not enabled:
        yield lambda done, total, info="": None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{title}[/]"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console,
                  transient=False) as progress:  # fmt: skip
        task = progress.add_task(title, total=None, info="")

        def update(done: int, total: int | None, info: str = "") -> None:
            progress.update(task, completed=done, total=total, info=info)

        yield update
