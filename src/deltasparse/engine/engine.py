"""``DeltaEngine``: exact streaming delta inference of a converted per-frame model.

Implements the inference side of the Delta Activation Layer (Yousefzadeh & Sifalakis,
arXiv 2107.07305; DESIGN.md §4): after a dense first frame, each ``step()`` recomputes only
the pixels reachable from inputs that changed, so a temporally sparse network does
proportionally less work, and its output equals the dense quantised model on every frame.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .kernels import Backend, GeometryCache, get_backend
from .plan import build_plan, trace_model
from .runtime import Runtime, build_runtime
from .stats import EngineStats

__all__ = ["DeltaEngine"]

log = logging.getLogger(__name__)


class DeltaEngine:
    """Stateful delta inference over ``B`` independent streams of frames ``(B, C, H, W)``.

    Args:
        model: the per-frame model (the GraphModule ``ds.convert()`` returns, any fx-traceable
            ``nn.Module``, or a ``VideoModel`` around one), in eval mode. It is not modified:
            batch norm is folded into copies of the weights.
        backend: ``"auto"`` (triton on CUDA when available, else torch), ``"torch"``,
            ``"triton"`` or ``"reference"`` (every frame dense: the spec).
        fallback: ``"error"`` (default) raises :class:`UnsupportedOpError` on an op without a
            kernel; ``"dense"`` recomputes such ops densely when their input changes.
        crossover: per op kind (``linear``, ``conv``, ``depthwise``, ``pool``, ``pointwise``),
            the fraction of rows to recompute above which the dense path is used.

    The model's parameters are read when the engine is built and again at every ``reset()``.
    """

    def __init__(self, model: nn.Module, backend: str | Backend = "auto", *,
                 fallback: str = "error", crossover: dict[str, float] | None = None,
                 cuda_graph: bool = True) -> None:  # fmt: skip
        if not isinstance(model, nn.Module):
            raise TypeError(f"DeltaEngine expects an nn.Module, got {type(model).__name__}")
        self.model = model
        self._gm = trace_model(model)
        training = [n or "<root>" for n, m in self._gm.named_modules() if m.training]
        if training:
            raise ValueError(
                f"DeltaEngine needs the model in eval mode (batch norm and dropout behave "
                f"differently in training); {training[0]!r} is training: call model.eval()"
            )
        self._plan, self._alias = build_plan(self._gm, fallback=fallback)
        self._check_layers()
        p = next(iter(self._gm.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.dtype = p.dtype if p is not None else torch.float32
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"DeltaEngine runs float32 (or float64) models, got {self.dtype}; call "
                "model.float()"
            )
        self.backend = get_backend(backend, self.device)
        self.crossover = {**self.backend.crossover, **(crossover or {})}
        self._geoms = GeometryCache()
        self._runtime: Runtime | None = None
        self._frames = 0
        self._shape: tuple[int, ...] | None = None
        # A backend with device kernels (triton) can run whole steps as one CUDA graph.
        self._cuda_graph = cuda_graph
        self._graph = None

    def _check_layers(self) -> None:
        from ..layers import DeltaActivation

        for name, m in self._gm.named_modules():
            if not isinstance(m, DeltaActivation):
                continue
            if m.input_layout != "frame":
                raise ValueError(
                    f"DeltaEngine: DeltaActivation '{name}' has input_layout='clip'; the engine "
                    "runs per-frame models (layers inserted by ds.convert() are 'frame')"
                )
            if m.theta is None:
                raise ValueError(
                    f"DeltaEngine: DeltaActivation '{name}' has no threshold yet; run the model "
                    "on one batch first (or convert with example_input=...)"
                )

    # -- streaming ---------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the stream: the next frame is computed densely; parameters are re-read."""
        self._runtime = None
        self._frames = 0
        self._shape = None
        self._graph = None

    def _check_frame(self, frame) -> None:
        if not isinstance(frame, torch.Tensor):
            raise TypeError(f"DeltaEngine.step expects a torch.Tensor, got {type(frame).__name__}")
        if frame.dim() != 4:
            raise ValueError(
                f"DeltaEngine.step expects frames (B, C, H, W), got shape {tuple(frame.shape)}"
            )
        if frame.dtype != self.dtype:
            raise TypeError(
                f"DeltaEngine.step: frame dtype {frame.dtype} does not match the model's "
                f"{self.dtype}; convert the frame with .to({self.dtype})"
            )
        if frame.device != self.device:
            raise ValueError(
                f"DeltaEngine.step: frame is on {frame.device}, the model on {self.device}"
            )
        if self._shape is not None and tuple(frame.shape) != self._shape:
            raise ValueError(
                f"DeltaEngine.step: frame shape {tuple(frame.shape)} differs from the stream's "
                f"{self._shape}; call engine.reset() before changing resolution or batch"
            )

    @torch.no_grad()
    def step(self, frame: torch.Tensor) -> torch.Tensor:
        """The model output for ``frame``; the first frame after ``reset()`` is dense."""
        self._check_frame(frame)
        first = self._runtime is None
        if first:
            self._shape = tuple(frame.shape)
            self._runtime = build_runtime(
                self._gm, self._plan, self._alias, self._shape, backend=self.backend,
                crossover=self.crossover, device=self.device, dtype=self.dtype,
                geoms=self._geoms,
            )  # fmt: skip
        rt = self._runtime
        if not first and self._graph is not None:
            self._frames += 1
            return self._graph.step(frame)
        rt.input_op.set_frame(frame, first)
        for op in rt.ops:
            op.run(first)
        self._frames += 1
        if first and self._cuda_graph and getattr(self.backend, "graph_step", None):
            # None when an op has no device kernel: the per-op path is kept (logged).
            self._graph = self.backend.graph_step(rt)
        return rt.output.as_tensor()

    __call__ = step

    def values(self, names=None) -> dict[str, torch.Tensor]:
        """The engine's current state per fx node name (NCHW / (B, F) copies; for checks)."""
        rt = self._runtime
        if rt is None:
            return {}
        return {
            node.name: v.as_tensor()
            for node, v in rt.values.items()
            if names is None or node.name in names
        }

    # -- reporting ---------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        if self._graph is not None:
            self._graph.flush_stats()
        rt = self._runtime
        ops = [] if rt is None else [rt.input_op.stats] + [o.stats for o in rt.ops]
        return EngineStats.from_ops(
            ops,
            frames=self._frames,
            state_bytes=0 if rt is None else rt.state_bytes(),
            table_bytes=self._geoms.nbytes(),
            dense_activation_bytes=0 if rt is None else rt.dense_bytes,
            backend=self.backend.name,
        )

    def __repr__(self) -> str:
        backend = getattr(getattr(self, "backend", None), "name", None)
        return f"DeltaEngine(backend={backend!r}, frames={getattr(self, '_frames', 0)})"
