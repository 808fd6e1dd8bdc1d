"""What the delta engine will execute, predicted from a dense model's activations.

"Counted = executed" (DESIGN.md §4): the paper's ``op_fraction`` counts changed scalars times
their fan-out, but :class:`~deltasparse.engine.DeltaEngine` recomputes whole pixels, widened by
every k x k window and pooling on the way, and falls back to the dense kernels where most rows
changed. :class:`ExecutedPredictor` runs the engine's own row selection
(:meth:`RuntimeOp.plan`: the same ``select``, crossovers and padded row counts; on a GPU
whose backend runs the whole step as a CUDA graph, the graph's rules: exactly the selected
rows, no crossover, the rule the engine itself follows after its first frame) on the changed
rows of every stored value, taken from the dense model's outputs of consecutive frames -- no
second model of the engine. The engine's row changes equal the dense model's up to float
summation order (a quantiser can flip where a value sits on a rounding boundary), so the
prediction matches the engine's measured MACs to within those flips.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .dense_step import changed_fraction, decision_rows, default_dense_step, leading_ops
from .kernels import GeometryCache, get_backend
from .plan import build_plan, trace_model
from .runtime import build_runtime
from .stats import EngineStats

__all__ = ["ExecutedPredictor", "Recorder", "changed_rows"]


def changed_rows(cur: torch.Tensor, prev: torch.Tensor, layout: str = "nchw") -> torch.Tensor:
    """Engine rows (``b*H*W + y*W + x``, or ``b`` for ``(B, F)``) where any channel differs
    (``layout="nhwc"``: the tensors are channels-last ``(B, H, W, C)``)."""
    ne = cur != prev
    if ne.dim() > 1:
        ne = ne.any(dim=-1 if layout == "nhwc" else 1)
    return ne.reshape(-1).nonzero().squeeze(1)


class ExecutedPredictor:
    """Replays the engine's row selection on the dense activations of ``B`` streams.

    Args:
        model: what :class:`DeltaEngine` would be given (converted per-frame model or
            ``VideoModel``), in eval mode.
        frame_shape: ``(B, C, H, W)`` of one step (``B`` independent streams, as the engine).
        backend / crossover / cuda_graph / dense_step: as for the engine (``"auto"`` resolves
            the same way; where the engine would take the CUDA-graph step or a dense step, the
            prediction follows it).

    Call :meth:`step` once per frame with the dense outputs of :attr:`node_names` for that
    frame; :attr:`stats` then holds what the engine would have computed (an
    :class:`EngineStats` without times).
    """

    def __init__(self, model: nn.Module, frame_shape, *, backend="auto",
                 crossover: dict[str, float] | None = None, device=None,
                 cuda_graph: bool = True, dense_step: float | str | None = "auto") -> None:  # fmt: skip
        gm = trace_model(model)
        plan, alias = build_plan(gm)
        p = next(iter(gm.parameters()), None)
        device = torch.device(device) if device is not None else (
            p.device if p is not None else torch.device("cpu"))
        dtype = p.dtype if p is not None else torch.float32
        self.backend = get_backend(backend, device)
        self.crossover = {**self.backend.crossover_for(dtype), **(crossover or {})}
        self.gm = gm
        self.runtime = build_runtime(gm, plan, alias, tuple(frame_shape), backend=self.backend,
                                     crossover=self.crossover, device=device, dtype=dtype,
                                     geoms=GeometryCache())  # fmt: skip
        # The engine's CUDA-graph step (taken after the first frame wherever the backend does
        # not decline the runtime) recomputes exactly the selected rows of every op.
        decline = getattr(self.backend, "graph_decline_reason", None)
        self.graph = bool(cuda_graph and getattr(self.backend, "graph_step", None) is not None
                          and (decline is None or decline(self.runtime) is None))  # fmt: skip
        if self.graph:
            for op in self.runtime.ops:
                op.crossover, op.exact_rows = float("inf"), True
        # The engine's dense step (where the whole-step graph declines): every op on every
        # row when the changed rows at the first MAC op's inputs exceed ``dense_step``.
        if dense_step == "auto":
            dense_step = default_dense_step(device, cuda_graph)
        self.dense_step = None if self.graph else dense_step  # (no dense fallback ops here)
        self._lead = leading_ops(self.runtime)
        self._decide = decision_rows(self.runtime, self._lead)
        # One recorded fx node per stored value (aliases share a value).
        self._values: list[tuple[str, object]] = []
        seen: set[int] = set()
        for node, v in self.runtime.values.items():
            if id(v.state) not in seen:
                seen.add(id(v.state))
                self._values.append((node.name, v))
        self._prev: dict[str, torch.Tensor] | None = None
        self.frames = 0

    @property
    def node_names(self) -> set[str]:
        """fx node names whose dense outputs :meth:`step` needs."""
        return {name for name, _ in self._values}

    def reset(self) -> None:
        """The next frame starts new streams (computed densely, as after ``engine.reset()``)."""
        self._prev = None

    @property
    def op_stats(self) -> list:
        """The :class:`OpStats` of the input and of every op (cumulative counts)."""
        return [self.runtime.input_op.stats] + [o.stats for o in self.runtime.ops]

    def step(self, outputs: dict[str, torch.Tensor]) -> None:
        """One frame: ``outputs[name]`` is node ``name``'s dense output ``(B, ...)``."""
        missing = self.node_names - set(outputs)
        if missing:
            raise KeyError(f"ExecutedPredictor.step: no dense output for {sorted(missing)}")
        changes = None
        if self._prev is not None:
            changes = {name: changed_rows(outputs[name], self._prev[name], v.layout)
                       for name, v in self._values}  # fmt: skip
        self.step_changes(changes)
        self._prev = {name: outputs[name] for name, _ in self._values}

    def step_changes(self, changes: dict[str, torch.Tensor] | None) -> None:
        """One frame given the changed rows of every value since the previous frame
        (``None``: the first frame of new streams, computed densely)."""
        first = changes is None
        rt = self.runtime
        for name, v in self._values:
            v.changed = None if first else changes[name]
        if not rt.input_op.detect:  # the engine hands every input pixel to the input gate
            rt.input_op.out.changed = None
        rt.input_op.stats.frames += 1
        dense = (not first and self.dense_step is not None and self._lead < len(rt.ops)
                 and changed_fraction(self._decide) > self.dense_step)  # fmt: skip
        for op in rt.ops:
            op.plan(first or dense)
        self.frames += 1

    @property
    def stats(self) -> EngineStats:
        rt = self.runtime
        return EngineStats.from_ops(
            self.op_stats, frames=self.frames,
            state_bytes=rt.state_bytes(), table_bytes=rt.geoms.nbytes(),
            dense_activation_bytes=rt.dense_bytes, backend=self.backend.name,
        )  # fmt: skip


class Recorder(fx.Interpreter):
    """Runs a GraphModule node by node, calling ``fn(name, output)`` for the nodes in ``keep``
    (module hooks still fire: modules are called as usual)."""

    def __init__(self, gm: fx.GraphModule, keep: set[str], fn) -> None:
        super().__init__(gm)
        self.keep, self.fn = keep, fn

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.keep:
            self.fn(n.name, out.detach())
        return out
