"""``run_bench``: dense and delta inference side by side in one process.

For every model x resolution x thread count x density target, a synthetic stream (static
textured scene, moving textured objects) is run through the dense quantised model and
through :class:`DeltaEngine`, frame by frame interleaved (so both see the same machine
load); medians of per-frame wall time are compared with the ideal speedup
``dense_macs / effective_macs`` of the engine's stats.

Density targets: with a trained checkpoint the thresholds set the density. With random
weights (no checkpoint) scaling the thresholds hardly changes it -- a changed pixel spreads
through every receptive field downstream -- so the size of the moving objects is bisected
to reach each target at each resolution, on the very stream that is then timed (so the
achieved density is the calibrated one), and 100% density is sensor noise with tiny
thresholds. The achieved density of every run is reported next to its target: low targets can
be out of reach at low resolution, where a moving object reaches most of the deep layers.

The headline speedup (``speedup_vs_fused_dense``) is against the engine with every op forced
dense (folded batch norm, fused epilogue: the same MACs as the model, done as well as the
engine can); ``achieved_speedup`` is against the model's own eager forward.

On a GPU every row also times the dense model a GPU user would deploy
(:func:`gpu_dense_baselines`: the model without its sparsity layers, batch norm folded, in
float32 and bfloat16, NCHW and channels-last, eager and as a CUDA-graph replay; cuDNN's
autotuner on), and reports the fastest per dtype with the engine's speedup against each
(``speedup_vs_best_dense_fp32`` / ``_bf16``). ``torch.compile`` is not among them (minutes
of compilation per shape). GPU times are CUDA-event times after a synchronisation.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .data.streams import synthetic_stream
from .engine import DeltaEngine
from .engine.kernels.base import no_tf32
from .exploit import _ALL_DENSE, fused_dense

__all__ = ["RESOLUTIONS", "build_bench_model", "cuda_graphed", "gpu_dense_baselines", "run_bench",
           "scale_thresholds"]

log = logging.getLogger(__name__)

RESOLUTIONS = {"224": (224, 224), "360p": (360, 640), "720p": (720, 1280)}


def _resolution(r) -> tuple[str, tuple[int, int]]:
    if isinstance(r, str):
        if r in RESOLUTIONS:
            return r, RESOLUTIONS[r]
        if "x" in r:
            h, w = (int(v) for v in r.lower().split("x"))
            return r, (h, w)
        raise ValueError(f"unknown resolution {r!r}; use {list(RESOLUTIONS)} or HxW")
    h, w = r
    return f"{h}x{w}", (int(h), int(w))


def _stream(hw, frames: int, batch: int, seed: int, *, size: float = 0.18, noise: float = 0.0):
    # Motion scales with the resolution, so densities are comparable across resolutions.
    scale = min(hw) / 224
    return list(synthetic_stream(frames, (batch, 3, *hw), objects=2, object_size=size,
                                 speed=2.0 * scale, noise=noise, seed=seed))  # fmt: skip


def build_bench_model(name: str, *, checkpoint: str | None = None, seed: int = 0) -> nn.Module:
    """A converted model in eval mode: trained (``checkpoint``) or random with calibrated BN."""
    import deltasparse as ds

    if checkpoint is not None:
        from .checkpoint import load_model

        model, _, _ = load_model(checkpoint)
        return model.frame_model.eval()
    torch.manual_seed(seed)
    kwargs = {"num_classes": 101}
    model = ds.models.create(name, **kwargs)
    # Random weights: set batch-norm statistics from synthetic frames so activations have
    # a realistic scale (unit variance per channel) instead of exploding or vanishing.
    calib = torch.cat(_stream((160, 160), 4, 2, seed + 100))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(calib)
    model.eval()
    gm = ds.convert(model, ds.DeltaConfig(threshold_init=0.1), example_input=calib[:1])
    return gm.eval()


def _thetas(model: nn.Module) -> list:
    import deltasparse as ds

    return [m.theta for m in model.modules() if isinstance(m, ds.DeltaActivation)]


def scale_thresholds(model: nn.Module, factor: float, base: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for theta, b in zip(_thetas(model), base, strict=True):
            theta.copy_(b * factor)


_WARMUP = 2  # frames stepped before timing (the dense first frame and one delta step)


def _density(model, frames, backend: str = "auto") -> float:
    """Effective density (effective / dense MACs) of the engine over ``frames[_WARMUP:]``:
    exactly the frames :func:`run_bench` times, so the two agree."""
    eng = DeltaEngine(model, backend=backend)
    for f in frames[:_WARMUP]:
        eng.step(f)
    first = eng.stats
    for f in frames[_WARMUP:]:
        eng.step(f)
    s = eng.stats
    return (s.effective_macs - first.effective_macs) / (s.dense_macs - first.dense_macs)


def _calibrate(model, hw, target: float, *, frames: int, batch: int, seed: int,
               backend: str = "auto", device: str = "cpu", iters: int = 10,
               tol: float = 0.05, dtype: torch.dtype = torch.float32) -> tuple[float, float]:  # fmt: skip
    """Size of the moving objects giving an effective density near ``target``, measured on
    the very stream that is timed (same seed, batch, frame count and backend).

    Bisects the log of the size; a target below what the smallest objects give (a changed
    pixel spreads through every receptive field downstream) or above what the largest give
    returns that end. Returns ``(object_size, measured_density)``.
    """

    def measure(log_size: float) -> float:
        stream = [f.to(device, dtype) for f in _stream(hw, frames + _WARMUP, batch, seed,
                                                        size=math.exp(log_size))]  # fmt: skip
        return _density(model, stream, backend)

    lo, hi = math.log(0.004), math.log(0.6)
    d_lo = measure(lo)
    if d_lo >= target:
        return math.exp(lo), d_lo
    d_hi = measure(hi)
    if d_hi <= target:
        return math.exp(hi), d_hi
    best = min((abs(math.log(d_lo / target)), lo, d_lo), (abs(math.log(d_hi / target)), hi, d_hi))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        d = measure(mid)
        best = min(best, (abs(math.log(d / target)), mid, d))
        if abs(d - target) <= tol * target:
            break
        if d > target:
            hi = mid
        else:
            lo = mid
    return math.exp(best[1]), best[2]


def _timed(fn, f, device: torch.device):
    """``(fn(f), seconds)``: wall time on the CPU; on a GPU, CUDA events recorded around the
    call after a synchronisation (the queue empty, so only this call is timed) and read once
    the end event completed (a host timer would see only the kernel launches)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        y = fn(f)
        return y, time.perf_counter() - t0
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    y = fn(f)
    end.record()
    end.synchronize()
    return y, start.elapsed_time(end) / 1e3


def cuda_graphed(model: nn.Module, example: torch.Tensor):
    """``fn(x)`` replaying a CUDA graph of ``model`` captured on a static copy of ``example``
    (``x`` is copied in, the static output returned)."""
    static_x = example.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3):  # warm-up outside the capture (cuDNN picks its algorithms here)
            model(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), torch.no_grad():
        static_y = model(static_x)

    def fn(x):
        static_x.copy_(x)
        g.replay()
        return static_y

    return fn


def gpu_dense_baselines(model: nn.Module, frames: Sequence[torch.Tensor]) -> dict[str, float]:
    """Median ms per frame of the dense model on a CUDA device, per variant
    ``{float32,bfloat16}_{nchw,channels_last}_{eager,graph}`` (float32 with cuDNN's default,
    TF32 convolutions) and ``ieee32_{nchw,channels_last}_graph`` (float32 without TF32, the
    engine's precision): ``model`` without its sparsity
    layers and with batch norm folded (:func:`deltasparse.exploit.fused_dense`), cuDNN's
    autotuner on, timed with CUDA events over ``frames`` after a warm-up pass."""
    if not frames or frames[0].device.type != "cuda":
        raise ValueError("gpu_dense_baselines needs frames on a CUDA device")
    dense = fused_dense(model).to(frames[0].device)
    out = {}
    bench_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for dtype, dname in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
            for fmt, fname in ((torch.contiguous_format, "nchw"),
                               (torch.channels_last, "channels_last")):  # fmt: skip
                m = copy.deepcopy(dense).to(dtype=dtype, memory_format=fmt).eval()
                fs = [f.to(dtype).contiguous(memory_format=fmt) for f in frames]
                with torch.no_grad():
                    runs = {"eager": m, "graph": cuda_graphed(m, fs[0])}
                    for mode, fn in runs.items():
                        for f in fs[:2]:
                            fn(f)  # warm-up
                        ts = [_timed(fn, f, f.device)[1] for f in fs]
                        out[f"{dname}_{fname}_{mode}"] = 1e3 * statistics.median(ts)
                if dtype == torch.float32:  # float32 proper (cuDNN's convs default to TF32)
                    with torch.no_grad(), no_tf32():
                        fn = cuda_graphed(m, fs[0])
                        for f in fs[:2]:
                            fn(f)
                        ts = [_timed(fn, f, f.device)[1] for f in fs]
                    out[f"ieee32_{fname}_graph"] = 1e3 * statistics.median(ts)
    finally:
        torch.backends.cudnn.benchmark = bench_before
    return out


def _time_all(dense, fused, delta, frames):
    """Per-frame times of the dense model, the engine forced dense, and the delta engine,
    interleaved frame by frame so that all see the same machine load; also the largest
    output difference and the fraction of frames with the same top-1 class."""
    td, tf, te, err, agree = [], [], [], 0.0, 0
    for f in frames:
        yd, t = _timed(dense, f, f.device)
        td.append(t)
        tf.append(_timed(fused, f, f.device)[1])
        ye, t = _timed(delta, f, f.device)
        te.append(t)
        err = max(err, float((yd - ye).abs().max()))
        agree += bool((yd.argmax(-1) == ye.argmax(-1)).all())
    return td, tf, te, err, agree / len(frames)


def run_bench(
    models: Sequence[str] = ("mobilenet_v1",),
    resolutions: Sequence = ("224", "360p", "720p"),
    threads: Sequence[int] = (1, 2),
    densities: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 1.0),
    *,
    device: str = "cpu",
    frames: int = 5,
    batch: int = 1,
    backend: str = "auto",
    checkpoint: str | None = None,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
    dtype: str = "float32",
) -> dict:
    """Time dense and delta inference; returns a JSON-able dict with one row per run.

    ``dtype``: the model's, the frames' and so the engine's (``"bfloat16"`` / ``"float16"``:
    the half-precision engine, against the dense model in that dtype)."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    dt = getattr(torch, dtype)
    if device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device "
                         "cpu")
    res = [_resolution(r) for r in resolutions]
    rows: list[dict] = []
    skipped: list[dict] = []
    threads_before = torch.get_num_threads()
    try:
        for name in models:
            gpu_dense: dict[str, dict] = {}  # resolution -> gpu_dense_baselines
            try:
                model = build_bench_model(name, checkpoint=checkpoint, seed=seed)
            except ImportError as exc:  # torchvision models without torchvision
                skipped.append({"model": name, "reason": str(exc)})
                log.warning("bench: skipping %s: %s", name, exc)
                continue
            model = model.to(device, dt)
            base = [t.detach().clone() for t in _thetas(model)]
            for label, hw in res:
                # Density targets: the moving area of a noise-free stream sets the density
                # (untrained weights: threshold scaling alone does not stop changes from
                # spreading through the receptive fields); 100%: sensor noise and tiny steps.
                # Calibrated on the stream that is then timed (same seed, batch, frames and
                # backend), so the achieved density is the calibrated one.
                torch.set_num_threads(max(threads))
                setups = {}
                for d in densities:
                    if d >= 1.0:
                        setups[d] = (0.18, 0.02, 1e-3, None)
                    else:
                        scale_thresholds(model, 1.0, base)
                        size, got = _calibrate(model, hw, d, frames=frames, batch=batch,
                                               seed=seed + 2, backend=backend, device=device,
                                               dtype=dt)  # fmt: skip
                        setups[d] = (size, 0.0, 1.0, got)
                        if abs(got - d) > 0.25 * d:
                            log.warning("bench: %s at %s: density target %.0f%% is out of reach "
                                        "of the synthetic stream (got %.1f%%)", name, label,
                                        100 * d, 100 * got)  # fmt: skip
                for nt in threads:
                    torch.set_num_threads(nt)
                    for d in densities:
                        size, noise, thr_scale, calibrated = setups[d]
                        scale_thresholds(model, thr_scale, base)
                        stream = [f.to(device, dt) for f in _stream(hw, frames + _WARMUP, batch,
                                                                      seed + 2, size=size,
                                                                      noise=noise)]  # fmt: skip
                        eng = DeltaEngine(model, backend=backend)
                        # The engine with every op dense: a fused dense baseline (folded BN,
                        # one-pass epilogue), stronger than the model's own eager forward.
                        fused = DeltaEngine(model, backend=backend, crossover=_ALL_DENSE,
                                            cuda_graph=False)  # dense on a GPU too
                        with torch.no_grad():
                            model(stream[0])  # warm-up
                            for e in (eng, fused):
                                for f in stream[:_WARMUP]:
                                    e.step(f)
                            s0 = eng.stats
                            dense_t, fused_t, delta_t, err, agree = _time_all(
                                model, fused.step, eng.step, stream[_WARMUP:])
                        s = eng.stats
                        if device != "cpu" and label not in gpu_dense:
                            gpu_dense[label] = gpu_dense_baselines(model, stream[_WARMUP:])
                        dense_ms = 1e3 * statistics.median(dense_t)
                        fused_ms = 1e3 * statistics.median(fused_t)
                        delta_ms = 1e3 * statistics.median(delta_t)
                        eff = s.effective_macs - s0.effective_macs
                        dense_macs = s.dense_macs - s0.dense_macs
                        ideal = dense_macs / max(eff, 1)
                        achieved = dense_ms / delta_ms
                        row = {
                            "model": name,
                            "resolution": label,
                            "height": hw[0],
                            "width": hw[1],
                            "batch": batch,
                            "threads": nt,
                            "device": device,
                            "dtype": dtype,
                            "backend": eng.backend.name,
                            "target_density": d,
                            "threshold_scale": thr_scale,
                            "object_size": size,
                            "noise": noise,
                            "density": eff / dense_macs,
                            "calibrated_density": calibrated,
                            "delta_density": (s.delta_macs - s0.delta_macs) / dense_macs,
                            "dense_ms": dense_ms,
                            "delta_ms": delta_ms,
                            "fused_dense_ms": fused_ms,
                            # the headline: against the engine forced dense (same MACs, BN
                            # folded); achieved_speedup is against the model's eager forward
                            "speedup_vs_fused_dense": fused_ms / delta_ms,
                            "achieved_speedup": achieved,
                            "ideal_speedup": ideal,
                            "ratio": achieved / ideal,
                            "efficiency": fused_ms / delta_ms / ideal,
                            "max_abs_err": err,
                            "top1_agreement": agree,
                            "state_mb": (s.state_bytes + s.table_bytes) / 2**20,
                            "dense_activation_mb": s.dense_activation_bytes / 2**20,
                            "memory_ratio": s.memory_ratio,
                            "frames_timed": len(delta_t),
                        }  # fmt: skip
                        if device != "cpu":
                            base_ms = gpu_dense[label]
                            row["dense_baselines_ms"] = base_ms
                            for dname in ("float32", "bfloat16"):
                                key = "fp32" if dname == "float32" else "bf16"
                                best = min(v for k, v in base_ms.items() if k.startswith(dname))
                                row[f"best_dense_{key}_ms"] = best
                                row[f"speedup_vs_best_dense_{key}"] = best / delta_ms
                        rows.append(row)
                        if progress is not None:
                            progress(row)
    finally:
        torch.set_num_threads(threads_before)
    return {
        "benchmark": "engine",
        "torch": torch.__version__,
        "device": device,
        "dtype": dtype,
        # cuDNN convs in float32 may use TF32 (torch's default); the engine's are IEEE float32
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if device != "cpu" else None,
        "frames": frames,
        "rows": rows,
        "skipped": skipped,
    }
