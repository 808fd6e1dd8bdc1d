"""No drift: the engine stays equal to the dense model over long streams.

The engine never accumulates deltas (each op recomputes its changed outputs from the stored
current inputs), so its error against the dense model is float rounding that does not grow.
Checked frame by frame: the logit error stays under a fixed bound and the fraction of
quantised activations that differ from the dense model stays tiny with no upward trend.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import AllOps, DenseRecorder, compare, converted

from deltasparse.data.streams import synthetic_stream
from deltasparse.engine import DeltaEngine


def _run(frames: int, shape, backend="torch"):
    stream = synthetic_stream(frames, shape, objects=1, object_size=0.2, speed=0.7, seed=11)
    first = next(stream)
    gm = converted(AllOps(), first, thr=0.2)
    eng = DeltaEngine(gm, backend)
    rec = DenseRecorder(gm)
    errs, diffs, total = [], [], 0
    for f in [first, *stream]:
        e, d, total = compare(eng, rec, f)
        errs.append(e)
        diffs.append(d)
    return eng, errs, diffs, total


def _check(eng, errs, diffs, total):
    n = len(errs)
    assert max(errs) <= 1e-4, max(errs)
    frac = sum(diffs) / (total * n)
    assert frac <= 1e-4, frac
    half = n // 2
    # no upward trend: the second half does not differ more than the first (+ slack of 2)
    assert sum(diffs[half:]) <= sum(diffs[:half]) + 2
    assert eng.stats.effective_macs < eng.stats.dense_macs  # it really skipped work


def test_no_drift_1000_frames():
    _check(*_run(1000, (1, 3, 28, 44)))


@pytest.mark.slow
def test_no_drift_5000_frames_fused_backend():
    from deltasparse.engine.kernels import CppBackend

    backend = "cpp" if CppBackend.available() else "torch"
    _check(*_run(5000, (1, 3, 28, 44), backend))


def test_engine_state_is_exact_function_of_inputs():
    """After a long stream, a fresh engine on the last frame holds the same state."""
    stream = list(synthetic_stream(300, (1, 3, 28, 44), noise=0.01, seed=12))
    gm = converted(AllOps(), stream[0], thr=0.2)
    long_run = DeltaEngine(gm, "torch", crossover={k: 1.0 for k in
                                                   ("linear", "conv", "depthwise", "pool",
                                                    "pointwise")})  # fmt: skip
    for f in stream:
        y_long = long_run.step(f)
    fresh = DeltaEngine(gm, "torch")
    y_fresh = fresh.step(stream[-1])
    torch.testing.assert_close(y_long, y_fresh, rtol=0, atol=1e-5)
    a, b = long_run.values(), fresh.values()
    diff = sum(int((a[k] != b[k]).sum()) for k in a if k.endswith("_delta"))
    assert diff <= 2
