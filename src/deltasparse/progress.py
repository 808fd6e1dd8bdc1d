"""rich progress bars for long work (training epochs, streams, benchmarks)."""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["train_progress"]


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
