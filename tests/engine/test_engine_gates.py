"""The engine with pixel gates and hysteresis: equal to the dense streaming model (the per-frame
model called frame by frame under ``ds.streaming``, its hysteresis layers keeping their
reference), on every frame, with the input gated too; the C++ epilogue equals the torch one."""

import pytest
import torch
from engine_helpers import AllOps, randomize

import deltasparse as ds
from deltasparse.data.streams import synthetic_stream


def _model(gate: str, mode: str, frames, seed: int = 0):
    torch.manual_seed(seed)
    m = randomize(AllOps(), seed).eval()
    cfg = ds.DeltaConfig(gate=gate, mode=mode, threshold_init=0.05, on_input=True,
                         overrides={"input": {"threshold_init": 0.03, "granularity": "layer"}})
    return ds.convert(m, cfg, example_input=frames[0]).eval()


@pytest.mark.parametrize("gate", ["scalar", "pixel"])
@pytest.mark.parametrize("mode", ["grid", "hysteresis"])
def test_engine_equals_dense_streaming_model(gate, mode, backend, crossover):
    frames = list(synthetic_stream(25, (2, 3, 32, 32), noise=0.01, seed=1))
    gm = _model(gate, mode, frames)
    eng = ds.DeltaEngine(gm, backend=backend, crossover=crossover)
    with torch.no_grad(), ds.streaming(gm):
        for t, f in enumerate(frames):
            want, got = gm(f), eng.step(f)
            scale = float(want.abs().max())
            assert float((want - got).abs().max()) <= 1e-5 * scale, f"frame {t}"
    st = eng.stats
    assert 0 < st.density < 1  # it did skip work on the static background


def test_hysteresis_engine_skips_noise_that_grid_propagates():
    """Sensor noise below the step flips grid outputs at rounding boundaries every frame;
    hysteresis sends nothing for it: the input gate stops the noise at the first layer."""
    frames = list(synthetic_stream(12, (1, 3, 32, 32), objects=0, noise=0.003, seed=2))
    density = {}
    for mode in ("grid", "hysteresis"):
        gm = _model("pixel", mode, frames)
        eng = ds.DeltaEngine(gm, backend="torch")
        with torch.no_grad():
            for f in frames:
                eng.step(f)
            first = ds.DeltaEngine(gm, backend="torch")
            first.step(frames[0])
        density[mode] = (eng.stats.effective_macs - first.stats.effective_macs) / (
            eng.stats.dense_macs - first.stats.dense_macs)
    assert density["hysteresis"] == 0.0  # noise of 0.003 (x sqrt 2) stays far below the step 0.03
    assert density["grid"] > 0.05


def test_engine_hysteresis_state_restarts_at_reset():
    frames = list(synthetic_stream(6, (1, 3, 32, 32), noise=0.01, seed=3))
    gm = _model("pixel", "hysteresis", frames)
    eng = ds.DeltaEngine(gm, backend="torch")
    with torch.no_grad():
        first = [eng.step(f) for f in frames]
        eng.reset()
        again = [eng.step(f) for f in frames]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gate", [1, 2])
@pytest.mark.parametrize("thr_mode", [1, 2, 3])
@pytest.mark.parametrize("sparse", [False, True])
def test_cpp_hysteresis_epilogue_equals_torch(gate, thr_mode, sparse):
    from deltasparse.engine.kernels import cpp

    if not cpp.available():
        pytest.skip("the C++ engine op is not available here")
    g = torch.Generator().manual_seed(gate * 10 + thr_mode)
    p, c, hw = 24, 5, 6
    buf = torch.randn(p + 1, c, generator=g)
    buf[-1] = 0
    rows = torch.tensor([0, 3, 4, 9, 17, 23]) if sparse else torch.empty(0, dtype=torch.long)
    n = int(rows.numel()) if sparse else p
    z = buf[:p][rows] + 0.3 * torch.randn(n, c, generator=g) if sparse else (
        buf[:p] + 0.3 * torch.randn(p, c, generator=g))
    bias = 0.1 * torch.randn(c, generator=g)
    thr = {1: torch.tensor([0.25]), 2: 0.1 + 0.3 * torch.rand(c, generator=g),
           3: 0.1 + 0.3 * torch.rand(hw * c, generator=g)}[thr_mode]
    lo, hi = -0.5, 1.5
    # the torch formulation, in the engine's own Chain
    a = (z + bias).clamp(lo, hi)
    idx = rows if sparse else torch.arange(p)
    old = buf.index_select(0, idx)
    t = thr.reshape(hw, c).index_select(0, idx % hw) if thr_mode == 3 else thr
    send = (a - old).abs() > t
    if gate == 2:
        send = send.any(1, keepdim=True)
    new = torch.where(send, a, old)
    want_buf = buf.clone()
    want_buf.index_copy_(0, idx, new)
    want_changed = (new != old).any(1)
    got_buf = buf.clone()
    mask = cpp.quant_commit(z.contiguous(), got_buf, rows, bias, lo, hi, thr, thr_mode, hw,
                            True, gate)  # fmt: skip
    assert torch.equal(got_buf, want_buf)
    assert torch.equal(mask, want_changed)


@pytest.mark.parametrize("gate", [0, 1, 2])
@pytest.mark.parametrize("thr_mode", [1, 2, 3])
@pytest.mark.parametrize("c", [3, 5])
@pytest.mark.parametrize("b,h,w", [(2, 3, 4), (3, 20, 30)])  # 20x30: blocks of 256 pixels
def test_cpp_frame_gate_equals_copy_then_commit(gate, thr_mode, c, b, h, w):
    """frame_gate (store the NCHW frame's rows and gate them, one pass) == the input op's
    copy followed by quant_commit over every row."""
    from deltasparse.engine.kernels import cpp

    if not cpp.available():
        pytest.skip("the C++ engine op is not available here")
    g = torch.Generator().manual_seed(gate * 100 + thr_mode * 10 + c + h)
    p, hw = b * h * w, h * w
    frame0 = torch.rand(b, c, h, w, generator=g)
    thr = {1: torch.tensor([0.1]), 2: 0.05 + 0.2 * torch.rand(c, generator=g),
           3: 0.05 + 0.2 * torch.rand(hw * c, generator=g)}[thr_mode]  # fmt: skip
    e = torch.empty(0)
    buf = torch.zeros(p + 1, c)  # the state after frame0
    cpp.quant_commit(frame0.permute(0, 2, 3, 1).reshape(p, c).contiguous(), buf, e.long(), e,
                     0.0, 0.9, thr, thr_mode, hw, False, gate)  # fmt: skip
    frame = frame0.clone()
    frame[:, :, :, : w // 2] += 0.5 * torch.randn(b, c, h, w // 2, generator=g)  # half moves
    frame[0, 1, 0, w - 1] = float("nan")  # in a static pixel: |NaN - old| > thr is false
    rows = torch.zeros(p + 1, c)
    rows[:p] = frame.permute(0, 2, 3, 1).reshape(p, c)
    want_buf = buf.clone()
    want = cpp.quant_commit(rows[:p].contiguous(), want_buf, e.long(), e, 0.0, 0.9, thr,
                            thr_mode, hw, True, gate)  # fmt: skip
    got_in, got_buf = torch.full((p + 1, c), 7.0), buf.clone()
    got_in[-1] = 0
    changed = torch.ops.deltasparse.frame_gate(frame, got_in, got_buf, 0.0, 0.9, thr, thr_mode,
                                               hw, True, gate)  # fmt: skip
    same = dict(rtol=0, atol=0, equal_nan=True)  # bit for bit, the NaN pixel included
    torch.testing.assert_close(got_in, rows, **same)  # the frame as rows, padding row zero
    torch.testing.assert_close(got_buf, want_buf, **same)
    assert torch.equal(changed, want.nonzero().squeeze(1))  # the changed pixels, sorted
    assert 0 < changed.numel() < p  # some pixels sent, some kept
    if gate == 2:
        assert w - 1 not in changed.tolist() and not got_buf[w - 1].isnan().any()  # NaN kept
    # without storing the rows (the engine's fused input gate): the same gate
    alone = buf.clone()
    again = torch.ops.deltasparse.frame_gate(frame, e, alone, 0.0, 0.9, thr, thr_mode, hw, True,
                                             gate)  # fmt: skip
    torch.testing.assert_close(alone, want_buf, **same)
    assert torch.equal(again, changed)
    first = torch.ops.deltasparse.frame_gate(frame, e, buf.clone(), 0.0, 0.9, thr, thr_mode, hw,
                                             False, gate)  # fmt: skip
    assert first.numel() == 0  # no comparison on a first frame: nothing listed


def test_engine_fuses_the_input_gate_on_cpp():
    """With the C++ backend the input gate runs on the NCHW frame itself (InputGateOp);
    outputs, the input's value and the counts equal the torch backend's on every frame."""
    from deltasparse.engine.kernels import CppBackend
    from deltasparse.engine.ops import InputGateOp

    if not CppBackend.available():
        pytest.skip("the C++ engine op is not available here")
    frames = list(synthetic_stream(10, (2, 3, 32, 32), noise=0.01, seed=4))
    gm = _model("pixel", "hysteresis", frames)
    xo = dict(CppBackend.crossover)  # the same row selection on both
    fused = ds.DeltaEngine(gm, backend="cpp", crossover=xo)
    plain = ds.DeltaEngine(gm, backend="torch", crossover=xo)
    with torch.no_grad():
        for f in frames:
            a, b = fused.step(f), plain.step(f)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            va, vb = fused.values(), plain.values()
            assert va.keys() == vb.keys()
            x = next(iter(gm.graph.nodes)).name
            assert torch.equal(va[x], f) and torch.equal(vb[x], f)
    ops = fused._runtime.ops
    assert isinstance(ops[0], InputGateOp) and not any(
        isinstance(o, InputGateOp) for o in plain._runtime.ops)
    sa, sb = fused.stats.to_dict(), plain.stats.to_dict()
    assert sa["effective_macs"] == sb["effective_macs"]
    ia, ib = (next(r for r in s["layers"] if r["kind"] == "pointwise") for s in (sa, sb))
    assert ia["output_density"] == ib["output_density"] > 0


@pytest.mark.parametrize("gate,mode", [("scalar", "grid"), ("pixel", "hysteresis")])
def test_cpp_sparse_and_dense_paths_store_the_same_state(gate, mode):
    """The C++ backend's sparse path (every op on its changed rows) and its dense path (every
    op on every row: oneDNN convs, the fused global pooling over all samples) hold the same
    state on every frame: the engine's output does not depend on the route. Bit for bit
    behind grid quantisers; a hysteresis gate sends its input unrounded, so there the two
    routes' float sums show: oneDNN's convolution and MKL's GEMM sum in the same order on
    Intel CPUs (equal), not on AMD EPYC (1 ulp apart, measured)."""
    from engine_helpers import ALWAYS_SPARSE, GlobalPoolNet, converted

    from deltasparse.engine.kernels import CppBackend

    if not CppBackend.available():
        pytest.skip("the C++ engine op is not available here")
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(3, 3, 12, 12, generator=g)
    gm = converted(GlobalPoolNet(), x0[:1], gate=gate, mode=mode, thr=0.05)
    dense_xo = {k: 0.0 for k in ALWAYS_SPARSE}
    sparse = ds.DeltaEngine(gm, backend="cpp", crossover=ALWAYS_SPARSE)
    dense = ds.DeltaEngine(gm, backend="cpp", crossover=dense_xo)
    f = x0
    for t in range(8):
        if t:
            f = f.clone()
            f[t % 3, :, 2:6, 3:7] += 0.2 * torch.rand(3, 4, 4, generator=g)  # one stream moves
        ys, yd = sparse.step(f), dense.step(f)
        vs, vd = sparse.values(), dense.values()
        assert vs.keys() == vd.keys()
        for k, (a, b) in {"output": (ys, yd), **{k: (vs[k], vd[k]) for k in vs}}.items():
            if mode == "grid":
                assert torch.equal(a, b), (t, k)
            else:  # float rounding of the values sent (1e-6 of the largest)
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * float(b.abs().max()) + 1e-12,
                                           msg=f"frame {t}, {k}")  # fmt: skip
    assert sparse.stats.effective_macs < dense.stats.effective_macs  # the sparse route skipped
