"""GPU tests of the ``triton`` backend and the CUDA-graph step (DESIGN.md §4).

The same equivalence checks as the CPU engine tests, on a CUDA device: every Triton kernel
against the ``reference`` backend over dtype x shape (fresh random inputs, outputs poisoned
before the run), and whole streams frame by frame against the dense model. Skipped cleanly
without CUDA or triton; triton is never imported at module level.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltasparse as ds
from deltasparse.engine import DeltaEngine
from deltasparse.engine.kernels import ReferenceBackend, has_triton
from deltasparse.engine.kernels.geometry import WindowGeom, out_size
from deltasparse.engine.kernels.specs import ConvSpec, LinearSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not has_triton(), reason="needs a CUDA device and triton"),
]

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN convolutions default to TF32 on CUDA (~1e-3 relative error): the dense model and
    the reference backend must run in true float32 to be references."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
# Kernel tolerance: float32 sums in another order than cuBLAS / cuDNN.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _close(a: torch.Tensor, b: torch.Tensor, dtype) -> None:
    assert torch.isfinite(a).all(), "output has unwritten (NaN-poisoned) entries"
    err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    assert err < TOL[dtype], err


def _rows_buffer(p: int, c: int, dtype) -> torch.Tensor:
    x = torch.randn(p + 1, c, dtype=dtype, device="cuda")
    x[-1] = 0
    return x


def _subset(p: int, frac: float) -> torch.Tensor:
    n = max(1, int(p * frac))
    return torch.randperm(p, device="cuda")[:n].sort().values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(70, 24, 40, True), (300, 64, 128, False), (5, 1024, 10, True)])
@pytest.mark.parametrize("frac", [0.05, 0.5, 1.0])
def test_linear_rows_matches_reference(dtype, shape, frac):
    from deltasparse.engine.kernels.triton_gpu import TritonBackend, launch_rows_gemm

    p, k, n, bias = shape
    x = _rows_buffer(p, k, dtype)
    spec = LinearSpec(torch.randn(k, n, dtype=dtype, device="cuda"),
                      torch.randn(n, dtype=dtype, device="cuda") if bias else None)  # fmt: skip
    rows = _subset(p, frac)
    want = ReferenceBackend("cuda").linear(x, spec, rows)
    y = torch.full((rows.numel(), n), float("nan"), dtype=dtype, device="cuda")
    launch_rows_gemm(x, spec.wt, spec.bias, rows, y, n_rows=rows.numel())
    _close(y, want, dtype)
    _close(TritonBackend("cuda").linear(x, spec, rows), want, dtype)


CONVS = [  # (c_in, c_out, groups, k, stride, pad, dilation, H, W)
    (3, 32, 1, 3, 2, 1, 1, 17, 23),  # MobileNet's first conv
    (8, 12, 1, 3, 1, 2, 2, 9, 11),
    (16, 24, 1, 1, 2, 0, 1, 10, 10),  # strided 1x1 (not an identity window)
    (32, 32, 32, 3, 1, 1, 1, 12, 15),  # depthwise, stride 1
    (64, 64, 64, 3, 2, 1, 1, 13, 16),  # depthwise, stride 2
    (20, 20, 20, 5, 2, 2, 1, 9, 11),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("frac", [0.1, 1.0])
def test_conv_rows_matches_reference(dtype, conv, frac):
    from deltasparse.engine.kernels.triton_gpu import (
        TritonBackend,
        launch_depthwise,
        launch_taps_gemm,
    )

    c_in, c_out, groups, k, s, p, d, h, w = conv
    batch = 2
    ho, wo = out_size(h, k, s, p, d), out_size(w, k, s, p, d)
    geom = WindowGeom(batch, (h, w), (ho, wo), (k, k), (s, s), (p, p), (d, d),
                      device=torch.device("cuda"))  # fmt: skip
    weight = torch.randn(c_out, c_in // groups, k, k, dtype=dtype, device="cuda")
    spec = ConvSpec.from_weight(geom, weight, torch.randn(c_out, dtype=dtype, device="cuda"),
                                groups)  # fmt: skip
    x = _rows_buffer(geom.p_in, c_in, dtype)
    rows = _subset(geom.p_out, frac)
    want = ReferenceBackend("cuda").conv(x, spec, rows)
    y = torch.full((rows.numel(), c_out), float("nan"), dtype=dtype, device="cuda")
    backend = TritonBackend("cuda")
    if spec.depthwise:
        launch_depthwise(x, spec, rows, y, n_rows=rows.numel())
        got = backend.depthwise(x, spec, rows)
    else:
        launch_taps_gemm(x, spec, rows, y, n_rows=rows.numel())
        got = backend.conv(x, spec, rows)
    _close(y, want, dtype)
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_taps_gemm_flat_loop_sums_as_the_per_tap_loop(dtype):
    """The flattened reduction loop (C % BK == 0) is a speed change only: bit for bit the
    per-tap loop's sums (the same tl.dot sequence)."""
    from deltasparse.engine.kernels import triton_gpu as tg

    geom = WindowGeom(2, (13, 17), (13, 17), (3, 3), (1, 1), (1, 1), (1, 1),
                      device=torch.device("cuda"))  # fmt: skip
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(48, 64, 3, 3, dtype=dtype, device="cuda", generator=gen)
    spec = ConvSpec.from_weight(geom, weight, None, 1)
    x = _rows_buffer(geom.p_in, 64, dtype)
    rows = _subset(geom.p_out, 0.5)
    ys = []
    try:
        for flat in (False, True):
            tg.TUNE["flat"] = flat
            y = torch.full((rows.numel(), 48), float("nan"), dtype=dtype, device="cuda")
            tg.launch_taps_gemm(x, spec, rows, y, n_rows=rows.numel())
            ys.append(y)
    finally:
        tg.TUNE.pop("flat", None)
    assert not ys[0].isnan().any()
    assert torch.equal(ys[0], ys[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_reductions_match_float64(dtype):
    """A GEMM whose reduction runs in parts (a float32 workspace, the parts added in order):
    rows (1x1 / Linear) and taps (k x k) against float64 sums, as close as unsplit."""
    from deltasparse.engine.kernels import triton_gpu as tg

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(90, 2048, dtype=dtype, device="cuda", generator=gen)
    wt = torch.randn(2048, 96, dtype=dtype, device="cuda", generator=gen) / 45
    rows = _subset(89, 0.4).to(torch.int32)
    want = x[rows.long()].double() @ wt.double()
    geom = WindowGeom(1, (9, 11), (9, 11), (3, 3), (1, 1), (1, 1), (1, 1),
                      device=torch.device("cuda"))  # fmt: skip
    wc = torch.randn(80, 256, 3, 3, dtype=dtype, device="cuda", generator=gen) / 48
    spec = ConvSpec.from_weight(geom, wc, None, 1)
    xi = _rows_buffer(geom.p_in, 256, dtype)
    dense = F.conv2d(xi[:-1].double().view(1, 9, 11, 256).permute(0, 3, 1, 2), wc.double(),
                     padding=1).permute(0, 2, 3, 1).reshape(-1, 80)  # fmt: skip
    trows = _subset(geom.p_out, 0.5).to(torch.int32)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for split in (1, 2, 4):
        ws = None if split == 1 else torch.empty(split, rows.numel(), 96, device="cuda")
        y = torch.full((rows.numel(), 96), float("nan"), dtype=dtype, device="cuda")
        tg.launch_rows_gemm(x, wt, None, rows, y, n_rows=rows.numel(), ws=ws)
        assert float((y.double() - want).abs().max()) <= tol * float(want.abs().max()), split
        ws = None if split == 1 else torch.empty(split, trows.numel(), 80, device="cuda")
        y = torch.full((trows.numel(), 80), float("nan"), dtype=dtype, device="cuda")
        tg.launch_taps_gemm(xi, spec, trows, y, n_rows=trows.numel(), ws=ws)
        ref = dense[trows.long()]
        assert float((y.double() - ref).abs().max()) <= tol * float(ref.abs().max()), split


def test_backend_validation():
    from deltasparse.engine.kernels.triton_gpu import TritonBackend

    with pytest.raises(RuntimeError, match="CUDA device"):
        TritonBackend("cpu")
    with pytest.raises(ValueError, match="precision"):
        TritonBackend("cuda", precision="tf32")


# -- whole streams ------------------------------------------------------------------------
def _calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Batch-norm statistics from one batch, so deep activations neither vanish nor saturate
    (a fresh MobileNet's activations shrink layer after layer and quantise to zero)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.5)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


class _Chains(nn.Module):
    """Chains that are not conv+BN: an unfolded BN after the quantiser (affine step), layer and
    neuron granularity thresholds, a grouped-1 5x5 conv with bias, a strided 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 5, 1, 2, bias=True)
        self.r1 = nn.ReLU()
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, 2, 1, groups=16, bias=True)
        self.r2 = nn.ReLU6()
        self.pw = nn.Conv2d(16, 24, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(24)
        self.r3 = nn.ReLU()
        self.s1 = nn.Conv2d(24, 8, 1, 2, 0, bias=True)
        self.r4 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.bn1(self.r1(self.c1(x)))
        x = self.r2(self.dw(x))
        x = self.r3(self.bn3(self.pw(x)))
        x = self.r4(self.s1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _model(name: str, dtype, res):
    if name == "mobilenet":
        m = ds.models.mobilenet_v1(num_classes=10, width_mult=0.25)
        cfg = ds.DeltaConfig(threshold_init=0.05)
    else:
        m = _Chains()
        cfg = ds.DeltaConfig(threshold_init=0.05, overrides={
            "r1": {"granularity": "neuron"}, "r2": {"granularity": "layer"}})  # fmt: skip
    x = torch.randn(2, 3, *res)
    m = _calibrate(m, x).to(device="cuda", dtype=dtype)
    gm = ds.convert(m, cfg, example_input=x.to(device="cuda", dtype=dtype))
    return gm.eval()


def _stream(n: int, res, dtype, area: float):
    """Frames that change in a random patch of ``area`` of the image (sometimes not at all)."""
    h, w = res
    f = torch.randn(2, 3, h, w, dtype=dtype, device="cuda")
    out = [f]
    ph, pw = max(1, int(h * area**0.5)), max(1, int(w * area**0.5))
    for t in range(1, n):
        f = f.clone()
        if t % 4 != 3:  # every 4th frame repeats the last one: an empty step
            y0 = int(torch.randint(0, h - ph + 1, ()))
            x0 = int(torch.randint(0, w - pw + 1, ()))
            b = t % 2
            f[b, :, y0 : y0 + ph, x0 : x0 + pw] = torch.randn(3, ph, pw, dtype=dtype,
                                                              device="cuda")  # fmt: skip
        out.append(f)
    return out


# Every frame, float32: max |engine - reference| <= REL * max |reference| (measured on an
# H200: 6e-8 to 4e-7 of the largest logit). Only where the two sides' summation orders put a
# value on different sides of a quantiser's rounding boundary (a flip, counted by
# _differing) may a logit move by up to about one step: FLIP_REL (measured: 1.3e-3 for 13
# flips of 90666 values, the "chains" model's fine neuron thresholds on random frames).
REL = 1e-4
FLIP_REL = 1e-2


def _differing(a: DeltaEngine, b: DeltaEngine) -> tuple[int, int]:
    """``(values of a's state that differ from b's beyond float rounding, all values)``."""
    va, vb = a.values(), b.values()
    assert va.keys() == vb.keys()
    n = total = 0
    for k, want in vb.items():
        scale = float(want.abs().max()) or 1.0
        n += int(((va[k] - want).abs() > 1e-5 * scale).sum())
        total += want.numel()
    return n, total


def _check_frame(got, want, dtype, what, *, dense: bool = False, flips: int = 0):
    """float64: equal to float rounding (against the dense model 1e-6: the model quantises in
    float32, the engine in the model's dtype). float32: within ``REL`` of the largest output,
    or ``FLIP_REL`` where ``flips`` values of the state differ (rounding-boundary flips)."""
    assert torch.isfinite(got).all(), (what, "non-finite output")
    if dtype == torch.float64:
        tol = 1e-6 if dense else 1e-9
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=what)
    else:
        err = (got - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= (REL if flips == 0 else FLIP_REL) * scale, (what, err, scale, flips)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["mobilenet", "chains"])
def test_stream_matches_dense(dtype, name):
    res = (32, 48)
    gm = _model(name, dtype, res)
    frames = _stream(10, res, dtype, area=0.08)
    eager = DeltaEngine(gm, backend="triton", cuda_graph=False)
    graphed = DeltaEngine(gm, backend="triton", cuda_graph=False)
    ref = DeltaEngine(gm, backend="reference")
    assert eager.backend.name == "triton"
    gs = None
    for i, f in enumerate(frames):
        with torch.no_grad():
            dense = gm(f)
        want = ref.step(f)
        _check_frame(want, dense, dtype, f"reference engine, frame {i}", dense=True)
        got_eager = eager.step(f)
        if i == 0:
            got_graph = graphed.step(f)
            gs = graphed.backend.graph_step(graphed._runtime)
            assert gs is not None
        else:
            got_graph = gs.step(f)
        for got, eng, what in ((got_eager, eager, "eager triton"), (got_graph, graphed, "graph")):
            n, total = _differing(eng, ref)
            # flips are rare, and each changes a few values downstream of it, never many
            assert n <= 2e-2 * total, (what, i, n, total)
            _check_frame(got, want, dtype, f"{what}, frame {i}", flips=n)
        if name == "mobilenet":  # measured: no flips at all on this model
            assert _differing(eager, ref)[0] == 0
    gs.flush_stats()
    st = graphed.stats
    assert all(layer["frames"] == len(frames) for layer in st.layers)
    assert 0 < st.effective_macs < st.dense_macs


@pytest.mark.parametrize("dtype", DTYPES)
def test_graph_step_empty_and_full_steps(dtype):
    """A repeated frame changes nothing; a fully new frame recomputes every row."""
    res = (32, 48)
    gm = _model("mobilenet", dtype, res)
    eng = DeltaEngine(gm, backend="triton", cuda_graph=False)
    f0 = torch.randn(2, 3, *res, dtype=dtype, device="cuda")
    eng.step(f0)
    gs = eng.backend.graph_step(eng._runtime)
    ref = DeltaEngine(gm, backend="reference")
    ref.step(f0)
    out = gs.step(f0)
    _check_frame(out, ref.step(f0), dtype, "empty step")
    gs.flush_stats()
    assert 2 * eng.stats.effective_macs == eng.stats.dense_macs  # frame 0 dense, frame 1 idle
    f1 = torch.randn_like(f0)
    _check_frame(gs.step(f1), ref.step(f1), dtype, "full step")
    for _ in range(3):  # graph replays, alternating frames
        for f in (f0, f1):
            _check_frame(gs.step(f), ref.step(f), dtype, "replay")


def test_graph_step_long_stream_no_drift():
    """Hundreds of graph replays stay equal to the dense model (no accumulated error)."""
    dtype, res = torch.float32, (32, 48)
    gm = _model("mobilenet", dtype, res)
    eng = DeltaEngine(gm, backend="triton", cuda_graph=False)
    frames = _stream(8, res, dtype, area=0.05)
    eng.step(frames[0])
    gs = eng.backend.graph_step(eng._runtime)
    for t in range(1, 400):  # every frame, not just the last one
        f = frames[t % len(frames)]
        out = gs.step(f)
        with torch.no_grad():
            want = gm(f)
        _check_frame(out, want, dtype, f"graph replay, frame {t}", dense=True)


# -- the CPU engine tests' equivalence checks, on the GPU ----------------------------------
class _Graphed:
    """An engine whose non-first steps run through the CUDA-graph step (``compare()`` API)."""

    def __init__(self, engine: DeltaEngine) -> None:
        self.engine, self.gs = engine, None

    def step(self, frame):
        if self.gs is None:
            out = self.engine.step(frame)
            self.gs = self.engine.backend.graph_step(self.engine._runtime)
            assert self.gs is not None
            return out
        return self.gs.step(frame)

    def values(self, names=None):
        return self.engine.values(names)


@pytest.mark.parametrize("granularity", ["layer", "channel", "neuron"])
def test_all_ops_match_dense_on_gpu(granularity, crossover):
    from engine_helpers import AllOps, DenseRecorder, compare_rel, converted

    from deltasparse.data.streams import synthetic_stream

    frames = [f.cuda() for f in synthetic_stream(20, (2, 3, 28, 44), noise=0.02, seed=1)]
    gm = converted(AllOps(), frames[0].cpu(), granularity=granularity, thr=0.15).cuda()
    eng = DeltaEngine(gm, backend="triton", crossover=crossover, cuda_graph=False)
    rec = DenseRecorder(gm)
    diffs = total = 0
    for t, f in enumerate(frames):
        rel, d, n = compare_rel(eng, rec, f)
        assert rel <= REL, (t, rel)
        diffs, total = diffs + d, total + n
    assert diffs <= 1e-4 * total
    assert 0 < eng.stats.effective_macs < eng.stats.dense_macs
    # every op of AllOps has a device-side step (the flatten of a 2x2 map included): the
    # whole-step graph, primed on the last frame, equals the per-op driver there
    want = eng._runtime.output.as_tensor().clone()  # (priming the graph rewrites the state)
    gs = eng.backend.graph_step(eng._runtime)
    assert gs is not None, eng.backend.graph_declined
    y = gs.step(frames[-1])
    assert float((y - want).abs().max()) <= 2 * REL * float(want.abs().max())


@pytest.mark.parametrize("graphed", [False, True])
def test_mobilenet_v1_stream_matches_dense_on_gpu(graphed):
    from engine_helpers import DenseRecorder, compare_rel, converted

    from deltasparse.data.streams import synthetic_stream

    m = ds.models.mobilenet_v1(num_classes=7, width_mult=0.25)
    frames = [f.cuda() for f in synthetic_stream(12, (1, 3, 64, 96), seed=3)]
    gm = converted(m, frames[0].cpu(), thr=0.1).cuda()
    eng = DeltaEngine(gm, backend="triton", cuda_graph=False)
    runner = _Graphed(eng) if graphed else eng
    rec = DenseRecorder(gm)
    for t, f in enumerate(frames):
        rel, d, total = compare_rel(runner, rec, f)
        assert rel <= REL and d <= 1e-4 * total, (t, rel, d)
    if graphed:
        runner.gs.flush_stats()
    assert eng.stats.ideal_speedup > 1.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_step_uses_cuda_graph_by_default(dtype):
    """DeltaEngine.step itself switches to the captured graph after the dense first frame."""
    res = (32, 48)
    gm = _model("mobilenet", dtype, res)
    eng = DeltaEngine(gm, backend="triton")
    ref = DeltaEngine(gm, backend="reference")
    frames = _stream(8, res, dtype, area=0.08)
    for i, f in enumerate(frames):
        _check_frame(eng.step(f), ref.step(f), dtype, f"engine.step with graph, frame {i}")
        if i == 0:
            assert eng._graph is not None
    st = eng.stats
    assert st.frames == len(frames)
    assert 0 < st.effective_macs < st.dense_macs
    eng.reset()
    assert eng._graph is None
    _check_frame(eng.step(frames[0]), ref.step(frames[0]), dtype, "after reset")


@pytest.mark.parametrize("area", [0.05, 0.6])
def test_measure_predicts_the_cuda_graph_step(area):
    """measure() on a GPU predicts the MACs of the engine's default CUDA-graph step, which
    computes exactly the selected rows (no crossover to the dense path): at 60% of the image
    changing, the per-op rules would predict dense layers the graph does not run."""
    res = (32, 48)
    gm = _model("chains", torch.float64, res)
    frames = _stream(9, res, torch.float64, area=area)
    eng = DeltaEngine(gm, backend="triton")
    with torch.no_grad():
        eng.step(frames[0])
        first = eng.stats
        for f in frames[1:]:
            eng.step(f)
    assert eng._graph is not None
    st = eng.stats
    executed = (st.effective_macs - first.effective_macs) / (st.dense_macs - first.dense_macs)
    clips = torch.stack(frames, 1)  # (B, T, C, H, W)
    report = ds.measure(ds.VideoModel(gm).eval(), [clips], engine="triton")
    assert report.executed_error is None
    assert report.executed_fraction == pytest.approx(executed, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_engine_on_cuda_equals_the_dense_streaming_model(dtype):
    """The token runtime on CUDA: every frame within 1e-4 (float32; bf16: its rounding) of the
    dense streaming model of the gated ViT, the same top-1, and work skipped."""
    from deltasparse.data.streams import synthetic_stream

    torch.manual_seed(0)
    vit = ds.models.create("vit_tiny", num_classes=5, img_size=64, depth=4)
    gm = ds.convert(vit, ds.DeltaConfig(kind="token", threshold_init=0.05)).eval()
    gm = gm.to("cuda", dtype)
    eng = DeltaEngine(gm)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    with torch.no_grad(), ds.streaming(gm):
        for t, f in enumerate(synthetic_stream(20, (4, 3, 64, 64), noise=0.01, seed=1)):
            f = f.to("cuda", dtype)
            want, got = gm(f).float(), eng.step(f).float()
            assert float((want - got).abs().max()) <= tol * float(want.abs().max()), t
            assert torch.equal(want.argmax(1), got.argmax(1)), t
    assert eng.stats.density < 1
