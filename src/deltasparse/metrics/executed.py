"""Executed MACs: what :class:`~deltasparse.DeltaEngine` will compute on the clips that
:func:`~deltasparse.measure` runs, from the engine's own row-selection rules.

Each batch of ``B`` clips of ``T`` frames is treated as ``B`` independent streams stepping
together (as the engine runs them): the first frame of a clip is dense, and every later frame
recomputes what the engine's ops select from the rows that changed in the dense model
(:class:`~deltasparse.engine.predict.ExecutedPredictor`). Steady-state figures leave the
first frame out, as the paper's counts do; ``*_with_first`` figures include it.
"""

from __future__ import annotations

import logging

import torch
from torch import fx, nn

__all__ = ["ExecutedCounter", "TokenExecutedCounter", "executed_counter"]

log = logging.getLogger(__name__)


def _snapshot(op_stats) -> list[tuple[int, int, int, int]]:
    return [(o.effective_macs, o.dense_macs_per_frame * o.frames, o.rows_computed,
             o.out_rows * o.frames) for o in op_stats]  # fmt: skip


class ExecutedCounter:
    """Runs the frame model node by node on clips and predicts the engine's executed MACs.

    ``error`` holds why no prediction is made (a model the engine cannot run), else None.
    """

    def __init__(self, frame_model: nn.Module, *, backend: str = "auto",
                 crossover: dict[str, float] | None = None) -> None:  # fmt: skip
        self.frame_model = frame_model
        self.backend, self.crossover = backend, crossover
        self.error: str | None = None
        self._preds: dict[tuple, object] = {}
        self._names: list[tuple[str, str]] | None = None
        self._first: list[list[int]] | None = None
        self._steady: list[list[int]] | None = None
        self.frames_first = 0
        self.frames_steady = 0
        self.streams: set[int] = set()
        self.backend_name: str | None = None
        if not isinstance(frame_model, fx.GraphModule):
            self.error = "the model is not an fx GraphModule (convert it first)"

    @property
    def ok(self) -> bool:
        return self.error is None

    def _predictor(self, shape: tuple[int, ...]):
        from ..engine.predict import ExecutedPredictor

        if shape not in self._preds:
            self._preds[shape] = ExecutedPredictor(self.frame_model, shape, backend=self.backend,
                                                   crossover=self.crossover)  # fmt: skip
        return self._preds[shape]

    def run(self, frames: torch.Tensor, b: int, t: int):
        """The frame model's output on ``frames`` (``(B*T, ...)``, batch-major clips), with the
        executed MACs of those ``B`` streams over ``T`` frames accumulated."""
        from ..engine.plan import UnsupportedOpError
        from ..engine.predict import Recorder

        try:
            pred = self._predictor((b, *frames.shape[1:]))
        except (UnsupportedOpError, ValueError, TypeError) as exc:
            self.error = str(exc)
            log.warning("measure(): no executed-MACs prediction: %s", exc)
            return self.frame_model(frames)
        masks: dict[str, torch.Tensor] = {}

        def keep(name: str, out: torch.Tensor) -> None:
            v = out.reshape(b, t, *out.shape[1:])
            ne = v[:, 1:] != v[:, :-1]
            if ne.dim() > 2:
                ne = ne.any(2)
            masks[name] = ne.reshape(b, t - 1, -1)

        y = Recorder(self.frame_model, pred.node_names, keep).run(frames)
        pred.reset()
        before = _snapshot(pred.op_stats)
        pred.step_changes(None)
        after_first = _snapshot(pred.op_stats)
        for i in range(t - 1):
            pred.step_changes({n: m[:, i].reshape(-1).nonzero().squeeze(1)
                               for n, m in masks.items()})  # fmt: skip
        end = _snapshot(pred.op_stats)
        self._accumulate([(o.name, o.kind) for o in pred.op_stats], before, after_first, end,
                         pred.backend.name, b, t)  # fmt: skip
        return y

    def _accumulate(self, names, before, after_first, end, backend: str, b: int, t: int) -> None:
        """Add one batch of ``b`` streams of ``t`` frames: op snapshots before the first frame,
        after it and at the end."""
        if self._names is None:
            self._names = names
            self._first = [[0, 0, 0, 0] for _ in self._names]
            self._steady = [[0, 0, 0, 0] for _ in self._names]
            self.backend_name = backend
        for acc, a, z in ((self._first, before, after_first), (self._steady, after_first, end)):
            for row, x0, x1 in zip(acc, a, z, strict=True):
                for k in range(4):
                    row[k] += x1[k] - x0[k]
        self.frames_first += b
        self.frames_steady += b * (t - 1)
        self.streams.add(b)

    def summary(self) -> dict | None:
        """The executed-MACs part of the report (``None`` before any clip was run)."""
        if self._names is None or not self.frames_steady:
            return None
        eff_s = sum(r[0] for r in self._steady)
        dense_s = sum(r[1] for r in self._steady)
        eff_f = sum(r[0] for r in self._first)
        dense_f = sum(r[1] for r in self._first)
        layers = []
        ops: dict[str, list[int]] = {}
        for (name, kind), r in zip(self._names, self._steady, strict=True):
            if kind == "input":
                continue
            layers.append({
                "name": name, "kind": kind,
                "executed_macs_per_frame": r[0] / self.frames_steady,
                "dense_macs_per_frame": r[1] / self.frames_steady,
                "computed_density": r[2] / r[3] if r[3] else None,
            })  # fmt: skip
            if r[1]:
                acc = ops.setdefault(kind, [0, 0])
                acc[0] += r[0]
                acc[1] += r[1]
        return {
            "backend": self.backend_name,
            "streams": sorted(self.streams),
            "frames": self.frames_steady,
            "executed_macs_per_frame": eff_s / self.frames_steady,
            "dense_macs_per_frame": dense_s / self.frames_steady,
            "executed_fraction": eff_s / dense_s if dense_s else None,
            "executed_fraction_with_first": (eff_s + eff_f) / (dense_s + dense_f)
            if dense_s + dense_f else None,
            # by op kind (conv, depthwise, linear; for transformers qkv, qk, av, proj, mlp)
            "ops": {k: {"executed_macs_per_frame": e / self.frames_steady,
                        "dense_macs_per_frame": d / self.frames_steady,
                        "executed_fraction": e / d} for k, (e, d) in ops.items()},
            "layers": layers,
        }


class TokenExecutedCounter(ExecutedCounter):
    """The executed MACs of a transformer with token gates: each batch of clips is streamed
    through the engine's own token runtime (:mod:`deltasparse.engine.tokens`), ``B`` streams
    from a reset, so that what is counted is what the engine executes."""

    def __init__(self, frame_model: nn.Module, *, backend: str = "auto",
                 crossover: dict[str, float] | None = None) -> None:  # fmt: skip
        super().__init__(frame_model, backend=backend, crossover=crossover)
        self._rt = None

    def run(self, frames: torch.Tensor, b: int, t: int):
        from ..engine.plan import UnsupportedOpError
        from ..engine.tokens import TokenRuntime

        y = self.frame_model(frames)
        try:
            if self._rt is None:
                name = "torch" if self.backend in ("auto", "torch") else self.backend
                self._rt = TokenRuntime(self.frame_model, backend=name,
                                        crossover=(self.crossover or {}).get("linear"))  # fmt: skip
            rt = self._rt
            rt.reset()
            clip = frames.reshape(b, t, *frames.shape[1:])
            rt.step(clip[:, 0])
            ops = rt.op_stats()
            zero = [(0, 0, 0, 0)] * len(ops)
            after_first = _snapshot(ops)
            for i in range(1, t):
                rt.step(clip[:, i])
        except (UnsupportedOpError, ValueError, TypeError, RuntimeError) as exc:
            self.error = str(exc)
            log.warning("measure(): no executed-MACs prediction: %s", exc)
            return y
        self._accumulate([(o.name, o.kind) for o in ops], zero, after_first, _snapshot(ops),
                         rt.backend, b, t)  # fmt: skip
        return y


def executed_counter(frame_model: nn.Module, *, backend: str = "auto",
                     crossover: dict[str, float] | None = None) -> ExecutedCounter:
    """The counter of the engine that runs ``frame_model``: the token runtime's for models with
    token gates, the CNN engine's rules otherwise."""
    from ..engine.tokens import has_tokens

    kind = TokenExecutedCounter if has_tokens(frame_model) else ExecutedCounter
    return kind(frame_model, backend=backend, crossover=crossover)
