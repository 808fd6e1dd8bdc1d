"""The engine's dense pass as one CUDA graph, for steps where most of the input changed.

A delta step pays per op for finding and gathering the rows that changed; where nearly every
row changed that costs more than the dense model (on a GPU far more: the per-op driver reads
every op's row count on the host). :class:`DenseStep` runs instead what the first frame of a
stream runs -- every op on every row, the fused chain applied, the state overwritten, no
change detection -- captured once in a CUDA graph (cuDNN / cuBLAS kernels on the engine's own
channels-last state buffers) and replayed.

It computes what a delta step computes (DESIGN.md §4: every stored value is a function of the
current inputs; a hysteresis gate compares every row with its reference, and rows no change
reached keep it, as in a delta step), so the choice changes speed, never results. The engine
takes it when the changed rows at the inputs of its first MAC op exceed
``DeltaEngine(dense_step=...)`` of their rows (the leading ops -- the input and the gates on it
-- run first as usual, and run again inside the graph: they are idempotent on the same frame),
and :class:`~deltasparse.engine.predict.ExecutedPredictor` applies the same rule.
"""

from __future__ import annotations

import dataclasses

import torch

from .ops import OpStats

__all__ = ["DenseStep", "changed_fraction", "decision_rows", "default_dense_step",
           "leading_ops"]

# the cumulative counts of an OpStats (a replay adds the pass's; host times are not measured)
_COUNTS = [f.name for f in dataclasses.fields(OpStats) if f.type in ("int", "float")
           and f.name not in ("dense_macs_per_frame", "macs_per_row", "out_rows", "in_rows",
                              "time_s")]  # fmt: skip
DEFAULT = 0.25  # on CUDA: changed fraction at the first MAC op above which a step runs dense


def default_dense_step(device: torch.device, cuda_graph: bool) -> float | None:
    """The engine's default ``dense_step``: :data:`DEFAULT` on CUDA with CUDA graphs, else off
    (on the CPU the fused C++ kernels take the dense path per op, without a graph)."""
    return DEFAULT if torch.device(device).type == "cuda" and cuda_graph else None


def changed_fraction(values) -> float:
    """Changed rows of ``values`` over their rows (a ``changed`` of ``None`` counts every
    row)."""
    total = sum(v.rows for v in values)
    if not total:
        return 0.0
    n = sum(v.rows if v.changed is None else int(v.changed.numel()) for v in values)
    return n / total


def leading_ops(runtime) -> int:
    """How many ops run before the first op with MACs (the input's pointwise gates)."""
    for i, op in enumerate(runtime.ops):
        if op.stats.macs_per_row:
            return i
    return len(runtime.ops)


def decision_rows(runtime, lead: int) -> list:
    """The values the first MAC op (``runtime.ops[lead]``) reads: their changed fraction
    decides a dense step."""
    return [] if lead == len(runtime.ops) else list(runtime.ops[lead].inputs)


def _snapshot(stats: list[OpStats]) -> list[dict]:
    return [{k: getattr(s, k) for k in _COUNTS} for s in stats]


def _restore(stats: list[OpStats], snap: list[dict]) -> None:
    for s, d in zip(stats, snap, strict=True):
        for k, v in d.items():
            setattr(s, k, v)


class DenseStep:
    """The dense pass of ``runtime`` (``input_op.set_frame(f, first=True)`` and every op's
    ``run(first=True)``) captured in a CUDA graph on its first use; :meth:`step` replays it
    and adds the pass's counts to the ops' stats (a replay runs no Python). Off CUDA the pass
    runs eagerly (what the tests check on the CPU)."""

    def __init__(self, runtime) -> None:
        self.rt = runtime
        inp = runtime.input_op.out
        self.frame = torch.zeros(inp.shape, dtype=inp.buf.dtype, device=inp.buf.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None  # why the capture failed (the engine then drops it)
        self._delta: list[dict] | None = None
        self.steps = 0
        self.lead = leading_ops(runtime)  # the decision is taken before op ``lead`` runs
        self.decide = decision_rows(runtime, self.lead)

    def snapshot(self) -> list[dict]:
        """The counts of the input and the leading ops now: the ops that run before the
        decision (undone if the step turns dense; a few ops, on every step)."""
        return _snapshot(self._stats()[: 1 + self.lead])

    def _stats(self) -> list[OpStats]:
        return [self.rt.input_op.stats] + [o.stats for o in self.rt.ops]

    def _body(self) -> None:
        self.rt.input_op.set_frame(self.frame, True)
        for op in self.rt.ops:
            op.run(True)

    def step(self, frame: torch.Tensor, undo: list[dict] | None = None) -> torch.Tensor:
        """The dense pass on ``frame``; ``undo``: stats to restore first (the leading ops
        that already ran on this frame, counted again by the pass)."""
        stats = self._stats()
        if undo is not None:
            _restore(stats[: len(undo)], undo)
        self.frame.copy_(frame)
        if self.frame.device.type != "cuda":  # no graph to capture: the pass runs eagerly
            self._body()
        elif self.graph is None:
            before = _snapshot(stats)
            self._body()  # eagerly once (allocations, cuDNN's choice), then capture
            after = _snapshot(stats)
            self._delta = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
            torch.cuda.synchronize(self.frame.device)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self._body()
            except Exception as exc:  # noqa: BLE001 - an op that cannot be captured
                self.failed = f"{type(exc).__name__}: {exc}"  # the eager pass stands
            else:
                self.graph = graph
            _restore(stats, after)  # capture records launches, it does not run them
        else:
            self.graph.replay()
            for s, d in zip(stats, self._delta, strict=True):
                for k, v in d.items():
                    setattr(s, k, getattr(s, k) + v)
        for op in self.rt.ops:  # every row is new on this step
            op.out.changed = None
        self.rt.input_op.out.changed = None
        self.steps += 1
        return self.rt.output.as_tensor()
