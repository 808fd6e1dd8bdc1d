"""``DeltaEngine``: exact streaming delta inference of a converted per-frame model.

Implements the inference side of the Delta Activation Layer (Yousefzadeh & Sifalakis,
arXiv 2107.07305; DESIGN.md §4): after a dense first frame, each ``step()`` recomputes only
the pixels reachable from inputs that changed, so a temporally sparse network does
proportionally less work, and its output equals the dense quantised model on every frame.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from .dense_step import DenseStep, changed_fraction, default_dense_step
from .kernels import Backend, GeometryCache, get_backend
from .ops import FallbackOp
from .plan import UnsupportedOpError, build_plan, trace_model
from .runtime import Runtime, build_runtime
from .stats import EngineStats, FallbackWarning
from .tokens import TokenRuntime, has_tokens

__all__ = ["DeltaEngine"]

log = logging.getLogger(__name__)


def _same_value(node, target, gm) -> bool:
    """Whether ``node`` holds ``target``'s value: ``target`` is its input and ``node`` an
    alias, or only aliases (identity, dropout) lead from ``node`` to ``target``."""
    from .._opset import classify

    modules = dict(gm.named_modules())

    def is_alias(n) -> bool:
        return n.op in ("call_module", "call_function", "call_method") and \
            classify(n, modules, gm)[0] == "alias"  # fmt: skip

    if target in node.all_input_nodes:
        return is_alias(node)
    cur = node
    while cur is not target:
        users = list(cur.users)
        if len(users) != 1 or not is_alias(users[0]):
            return False
        cur = users[0]
    return True


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
        dense_step: on CUDA, the fraction of changed rows at the first MAC op's inputs above
            which a step runs the dense pass as one CUDA graph instead (``"auto"``: 0.25 on
            CUDA where the whole-step sparse graph declines the model, off elsewhere;
            ``None``: off; on the CPU a fraction runs the dense pass without a graph). The
            results are the same either way (engine/dense_step.py); ``measure()`` predicts
            with the same rule. Not taken for models with dense fallback ops; a capture that
            fails is warned about and switches it off.

    The model's parameters are read when the engine is built and again at every ``reset()``.
    Every slower path it takes (a dense fallback op, the torch backend where ``auto`` wanted
    the C++ or Triton one, no CUDA-graph step) is warned about once as a
    :class:`~deltasparse.engine.stats.FallbackWarning` and listed in ``stats.fallbacks``.
    """

    def __init__(self, model: nn.Module, backend: str | Backend = "auto", *,
                 fallback: str = "error", crossover: dict[str, float] | None = None,
                 cuda_graph: bool = True, dense_step: float | str | None = "auto") -> None:  # fmt: skip
        if not isinstance(model, nn.Module):
            raise TypeError(f"DeltaEngine expects an nn.Module, got {type(model).__name__}")
        self.model = model
        self._check_eval(model)
        self._tokens = None
        if has_tokens(model):  # a transformer: the token runtime (engine/tokens.py)
            self._init_tokens(model, backend, crossover)
            return
        self._gm = trace_model(model)
        self._plan, self._alias = build_plan(self._gm, fallback=fallback)
        self._check_layers()
        self._fallbacks: list[str] = []
        for op in self._plan:
            if op.kind == "fallback":
                self._fallback(
                    f"{op.params.get('describe', op.label)} has no delta kernel: it is "
                    "recomputed densely whenever its input changes (fallback='dense')"
                )
        p = next(iter(self._gm.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.dtype = p.dtype if p is not None else torch.float32
        if self.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(
                f"DeltaEngine runs float32, float64, bfloat16 or float16 models, got "
                f"{self.dtype}; call model.float()"
            )
        self.backend = self._resolve_backend(backend)
        self.crossover = {**self.backend.crossover_for(self.dtype), **(crossover or {})}
        self._geoms = GeometryCache()
        self._runtime: Runtime | None = None
        self._frames = 0
        self._shape: tuple[int, ...] | None = None
        # A backend with device kernels (triton) can run whole steps as one CUDA graph.
        self._cuda_graph = cuda_graph
        self._graph = None
        # Steps where most rows changed run the dense pass as one CUDA graph (dense_step.py).
        if dense_step == "auto":
            dense_step = default_dense_step(self.device, cuda_graph)
        if dense_step is not None and not (isinstance(dense_step, (int, float))
                                           and 0 <= dense_step <= 1):  # fmt: skip
            raise ValueError(
                f"DeltaEngine(dense_step=...) is a fraction in [0, 1], 'auto' or None, got "
                f"{dense_step!r}"
            )
        self.dense_step = dense_step
        self._dense: DenseStep | None = None

    def _init_tokens(self, model: nn.Module, backend, crossover) -> None:
        if not isinstance(backend, str):
            raise ValueError("DeltaEngine: token models take a backend name ('torch', 'reference')")
        name = "torch" if backend in ("auto", "torch") else backend
        self._fallbacks = []
        self._tokens = TokenRuntime(model, backend=name,
                                    crossover=(crossover or {}).get("linear"))  # fmt: skip
        self._gm = self._tokens.gm
        p = next(iter(self._gm.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.dtype = p.dtype if p is not None else torch.float32
        if self.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(
                f"DeltaEngine runs float32, float64, bfloat16 or float16 token models, got "
                f"{self.dtype}; call model.float()"
            )
        self.backend = type("TokenBackend", (), {"name": name})()
        self.crossover = {"linear": self._tokens.crossover}
        self._runtime = None
        self._frames = 0
        self._shape = None
        self._graph = None
        self._dense = None
        self._cuda_graph = False

    @property
    def tokens(self) -> TokenRuntime | None:
        """The token runtime of a transformer (``None`` for CNNs)."""
        return self._tokens

    @staticmethod
    def _check_eval(model: nn.Module) -> None:
        """The user's own modules, not the trace's: fx makes fresh containers for it."""
        from ..layers import VideoModel

        frame_model = model.frame_model if isinstance(model, VideoModel) else model
        training = [n or "<root>" for n, m in frame_model.named_modules() if m.training]
        if training:
            more = f" (and {len(training) - 1} more modules)" if len(training) > 1 else ""
            raise ValueError(
                f"DeltaEngine needs the model in eval mode (batch norm and dropout behave "
                f"differently in training); {training[0]!r}{more} is training: call "
                "model.eval()"
            )

    def _fallback(self, reason: str, depth: int = 1) -> None:
        """Record a slower path (once) and warn about it, pointing at the user's line
        (``depth``: engine frames between the user's call and this one)."""
        if reason in self._fallbacks:
            return
        self._fallbacks.append(reason)
        warnings.warn(f"DeltaEngine: {reason}", FallbackWarning, stacklevel=2 + depth)

    def _resolve_backend(self, backend: str | Backend) -> Backend:
        from .kernels import cpp, has_triton

        try:
            resolved = get_backend(backend, self.device)
        except RuntimeError as exc:
            why = cpp.build_error() if backend == "cpp" else None
            if why is None:
                raise
            raise RuntimeError(f"{exc}; the build failed with: {why}") from exc
        if backend == "auto" and resolved.name == "torch":
            if self.device.type == "cuda" and not has_triton():
                self._fallback(
                    "backend 'auto' runs 'torch' on CUDA because triton is not installed "
                    "(launch-bound kernels, slower); pip install triton", depth=2,
                )
            elif self.device.type == "cpu" and cpp.build_error() is not None:
                self._fallback(
                    "backend 'auto' runs 'torch' because the C++ engine op could not be built "
                    f"({cpp.build_error()}); the fused epilogue is lost (slower)", depth=2,
                )
        if getattr(resolved, "_gemm", True) is False:
            self._fallback(
                "backend 'cpp': this torch does not export MKL's sgemm_, so the GEMM rows are "
                "not fused with the epilogue (oneDNN and a separate pass run instead, slower)",
                depth=2,
            )
        return resolved

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
        if self._tokens is not None:
            self._tokens.reset()
        self._runtime = None
        self._frames = 0
        self._shape = None
        self._graph = None
        self._dense = None

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
        if self._tokens is not None:
            self._shape = tuple(frame.shape)
            self._frames += 1
            return self._tokens.step(frame)
        first = self._runtime is None
        if first:
            self._runtime = self._build(tuple(frame.shape))
            self._shape = tuple(frame.shape)
        with self.backend.precision_scope():
            return self._step(frame, first)

    def _step(self, frame: torch.Tensor, first: bool) -> torch.Tensor:
        rt = self._runtime
        if not first and self._graph is not None:
            self._frames += 1
            return self._graph.step(frame)
        dense = self._dense if not first else None
        undo = dense.snapshot() if dense is not None else None
        rt.input_op.set_frame(frame, first)
        for i, op in enumerate(rt.ops):
            if dense is not None and i == dense.lead and \
                    changed_fraction(dense.decide) > self.dense_step:  # fmt: skip
                self._frames += 1
                y = dense.step(frame, undo)
                if dense.failed is not None:
                    self._dense = None
                    self._fallback(f"no dense step (its CUDA-graph capture failed: "
                                   f"{dense.failed}); dense frames run the per-op driver",
                                   depth=4)  # fmt: skip
                return y
            op.run(first)
        self._frames += 1
        if first and self._cuda_graph and getattr(self.backend, "graph_step", None):
            self._graph = self._graph_step(rt)
        if first and self._graph is None and self.dense_step is not None and not any(
                isinstance(op, FallbackOp) for op in rt.ops):  # fmt: skip
            self._dense = DenseStep(rt)  # (a dense fallback op may not be capturable)
        return rt.output.as_tensor()

    def _build(self, shape: tuple[int, ...]) -> Runtime:
        """The runtime for frames of ``shape``, refusing frames too small for the model (the
        dense model raises there; empty maps would give NaN outputs here)."""
        h, w = shape[2], shape[3]
        try:
            rt = build_runtime(
                self._gm, self._plan, self._alias, shape, backend=self.backend,
                crossover=self.crossover, device=self.device, dtype=self.dtype,
                geoms=self._geoms,
            )  # fmt: skip
        except UnsupportedOpError:
            raise
        except RuntimeError as exc:  # a negative size on the way down, typically
            raise ValueError(
                f"DeltaEngine.step: frames of {h}x{w} cannot run through the model ({exc}); "
                "use larger frames (e.g. the resolution the model was trained at)"
            ) from exc
        for op in rt.ops:
            if any(s <= 0 for s in op.out.shape) or any(s <= 0 for v in op.inputs for s in v.shape):
                ins = ", ".join(str(tuple(v.shape)) for v in op.inputs)
                raise ValueError(
                    f"DeltaEngine.step: frames of {h}x{w} are too small for this model: "
                    f"{op.kind} '{op.name}' maps {ins} to {tuple(op.out.shape)}, an empty map; "
                    "use larger frames (e.g. the resolution the model was trained at)"
                )
        return rt

    def _graph_step(self, rt: Runtime):
        """The backend's whole-step CUDA graph, or None (warned and recorded)."""
        decline = getattr(self.backend, "graph_decline_reason", None)
        why = decline(rt) if decline is not None else None
        graph = None if why else self.backend.graph_step(rt)
        if graph is None:
            why = why or getattr(self.backend, "graph_declined", None) or "declined"
            self._fallback(
                f"no CUDA-graph step ({why}): every step runs the per-op driver, one host "
                "synchronisation per op (slower)", depth=4,  # step, no_grad, _step, this
            )
        return graph

    __call__ = step

    def values(self, names=None) -> dict[str, torch.Tensor]:
        """The engine's current state per fx node name (NCHW / (B, F) copies; for checks).

        The input of a fused input gate (C++ backend) is not stored as rows: its value is a
        copy of the tensor last passed to :meth:`step` as it is now (a caller that refills one
        frame buffer in place sees the new contents)."""
        if self._tokens is not None:
            vals = self._tokens.values
            return {n.name: v for n, v in vals.items() if isinstance(v, torch.Tensor)
                    and (names is None or n.name in names)}  # fmt: skip
        rt = self._runtime
        if rt is None:
            return {}
        src = rt.input_op
        held = dict(rt.values)
        # nodes the plan folded into another's value that have that value (a gate followed by
        # a fused dropout or identity, a standalone dropout)
        for node, target in self._alias.items():
            while target in self._alias:
                target = self._alias[target]
            if node not in held and target in held and _same_value(node, target, self._gm):
                held[node] = held[target]
        return {
            # a fused input gate reads the frame itself: the input's rows are never stored
            node.name: src.frame.clone() if src.deferred and v is src.out else v.as_tensor()
            for node, v in held.items()
            if names is None or node.name in names
        }

    # -- reporting ---------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        if self._tokens is not None:
            return self._tokens.engine_stats(backend=self.backend.name, fallbacks=self._fallbacks)
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
            fallbacks=list(self._fallbacks),
        )

    def __repr__(self) -> str:
        backend = getattr(getattr(self, "backend", None), "name", None)
        return f"DeltaEngine(backend={backend!r}, frames={getattr(self, '_frames', 0)})"
