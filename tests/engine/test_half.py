"""Half-precision engines (bfloat16, float16): DESIGN.md §4, kernels/base.py ``HALF``.

The state is stored in the model's dtype; every product is accumulated in float32; a MAC
kernel's sum is rounded to the dtype, then its bias and each pointwise step are computed in
float32 and each rounded. Checked on the CPU backends (torch, C++, reference) against:

* exact numbers on a tiny net, computed here by hand with those rules;
* the engine's own dense pass in the same dtype (the ``reference`` backend computes every
  frame densely): every frame, the history-independence bound of the issue (1e-3 relative);
* the dense model in the same dtype: the half engine is as close to the float32 model as the
  dense half-precision model is (the engine folds batch norm and rounds once per op; the
  dense model rounds after every op, so the two differ by rounding, not by more).

The Triton kernels and the CUDA-graph step in half precision are checked on the GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from engine_helpers import (
    AllOps,
    ConvNeXtLite,
    GlobalPoolNet,
    GraphOps,
    GroupedNet,
    ModernOps,
    TinyResNet,
    UpsampleCat,
    WideNet,
    converted,
)
from torch import nn

import deltasparse as ds
from deltasparse.engine import DeltaEngine
from deltasparse.engine.kernels import has_triton

HALVES = [torch.bfloat16, torch.float16]
# History independence (issue 9): every frame's output within 1e-3 of the largest output of
# the engine's own dense pass, every stored value within 1e-3 in relative norm. Measured on
# the CPU backends: outputs equal; a value before a gate may differ by a few ulps where the
# sparse rows are summed in another order than the dense convolution.
HIST = 1e-3

MODELS = {
    "allops": (AllOps, (2, 3, 32, 32)),
    "resnet": (TinyResNet, (2, 3, 32, 32)),
    "gpool": (GlobalPoolNet, (2, 3, 16, 16)),
    "modern": (ModernOps, (2, 3, 32, 32)),
    "mobilenet": (lambda: ds.models.mobilenet_v1(num_classes=6, width_mult=0.25), (1, 3, 64, 64)),
    "graphops": (GraphOps, (2, 3, 20, 20)),
    "upsample": (UpsampleCat, (2, 3, 16, 20)),
    "grouped": (GroupedNet, (2, 3, 16, 20)),
    "convnext": (ConvNeXtLite, (2, 3, 32, 32)),
    "wide": (WideNet, (2, 3, 12, 12)),
}


def _frames(n: int, shape, seed: int, area: float = 0.1) -> list[torch.Tensor]:
    """float32 frames where ``area`` of the pixels change each step (every 4th: none)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(shape, generator=g)
    out = [f]
    for t in range(1, n):
        f = f.clone()
        if t % 4 != 3:
            m = torch.rand(shape[0], 1, *shape[2:], generator=g) < area
            f = torch.where(m, torch.rand(shape, generator=g), f)
        out.append(f)
    return out


def _model(name: str, seed: int = 0):
    make, shape = MODELS[name]
    gm = converted(make(), torch.rand(shape, generator=torch.Generator().manual_seed(seed)),
                   thr=0.05, seed=seed)  # fmt: skip
    return gm, shape


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("name", list(MODELS))
def test_half_stream_matches_its_own_dense_pass(name, dtype, backend, crossover):
    gm32, shape = _model(name)
    gm = copy.deepcopy(gm32).to(dtype)
    eng = DeltaEngine(gm, backend=backend, crossover=crossover)
    ref = DeltaEngine(gm, backend="reference")  # the dense pass, every frame
    for t, f in enumerate(_frames(10, shape, seed=1)):
        f = f.to(dtype)
        y, want = eng.step(f), ref.step(f)
        assert y.dtype == dtype and torch.isfinite(y).all()
        err = float((y.float() - want.float()).abs().max())
        assert err <= HIST * float(want.float().abs().max()), (t, err)
        for k, v in ref.values().items():  # and every stored value (relative norm: a value
            got, v = eng.values([k])[k].float(), v.float()  # before a gate differs by ulps)
            assert float((got - v).norm()) <= HIST * (float(v.norm()) or 1.0), (t, k)
        assert all(v.dtype == dtype for v in eng.values().values())
    st = eng.stats
    assert 0 < st.effective_macs < st.dense_macs  # work was skipped


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("name", list(MODELS))
def test_half_engine_is_as_close_to_float32_as_the_half_model(name, dtype):
    gm32, shape = _model(name)
    gm = copy.deepcopy(gm32).to(dtype)
    eng = DeltaEngine(gm, backend="torch")
    e_eng = e_model = 0.0
    agree = total = 0
    for f in _frames(10, shape, seed=2):
        with torch.no_grad():
            y32 = gm32(f)
            yh = gm(f.to(dtype)).float()
        y = eng.step(f.to(dtype)).float()
        scale = float(y32.norm())
        e_eng += float((y - y32).norm()) / scale
        e_model += float((yh - y32).norm()) / scale
        agree += int((y.argmax(1) == yh.argmax(1)).sum())
        total += y.shape[0]
    # the engine rounds once per op where the model rounds after each: about as accurate
    assert e_eng <= 2.0 * e_model + 1e-3 * 10, (e_eng, e_model)
    assert agree >= 0.9 * total


@pytest.mark.parametrize("dtype", HALVES)
def test_half_rounding_rules_exactly_on_a_tiny_net(dtype, backend):
    """1x1 conv with bias -> ReLU -> quantiser -> batch norm (an affine chain step, not folded)
    -> ReLU -> quantiser, by hand: the sum rounded, + bias rounded, relu, each quantiser in
    float32 rounded, the affine step rounded."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 1, bias=True)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.1, 0.1)
    net = nn.Sequential(conv, nn.ReLU(), bn, nn.ReLU()).eval()
    x = torch.randn(1, 2, 4, 5)
    gm = ds.convert(net, ds.DeltaConfig(threshold_init=0.07), example_input=x).eval().to(dtype)
    eng = DeltaEngine(gm, backend=backend)
    xs = [x.to(dtype), (x + 0.3 * (torch.rand_like(x) < 0.3)).to(dtype)]
    thr1, thr2 = (m.threshold.float().reshape(-1, 1, 1) for m in gm.modules()
                  if isinstance(m, ds.DeltaActivation))  # fmt: skip
    for xt in xs:
        y = eng.step(xt)

        def r(t):  # one rounding to the dtype
            return t.to(dtype).float()

        w = gm.get_submodule("0").weight.float().reshape(3, 2)
        b = gm.get_submodule("0").bias.float()
        z = r(torch.einsum("bchw,oc->bohw", xt.float(), w))
        z = r(z + b[:, None, None]).clamp_min(0)
        z = r(torch.round(z / thr1) * thr1)
        m = gm.get_submodule("2")
        inv = 1.0 / torch.sqrt(m.running_var.float() + m.eps)
        alpha = inv * m.weight.float()
        beta = m.bias.float() - m.running_mean.float() * alpha
        z = r(z * alpha[:, None, None] + beta[:, None, None]).clamp_min(0)
        want = r(torch.round(z / thr2) * thr2)
        assert torch.equal(y.float(), want), (y.float() - want).abs().max()


def test_half_engine_state_and_errors():
    gm, shape = _model("gpool")
    eng = DeltaEngine(gm.to(torch.bfloat16))
    assert eng.dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"\.to\(torch.bfloat16\)"):
        eng.step(torch.rand(shape))  # a float32 frame for a bfloat16 engine
    eng.step(torch.rand(shape, dtype=torch.bfloat16))
    assert all(v.dtype == torch.bfloat16 for v in eng.values().values())
    with pytest.raises(TypeError, match="float32, float64, bfloat16 or float16"):
        DeltaEngine(nn.Sequential(nn.Conv2d(3, 4, 1)).eval().to(torch.float8_e4m3fn))


def test_executed_predictor_follows_a_half_engine():
    """measure()'s replay on a bfloat16 model predicts what the bfloat16 engine executes."""
    gm, shape = _model("resnet")
    gm = gm.to(torch.bfloat16)
    frames = [f.to(torch.bfloat16) for f in _frames(6, shape, seed=3)]
    eng = DeltaEngine(gm, backend="torch")
    eng.step(frames[0])
    first = eng.stats  # the dense first frame is not part of the prediction
    for f in frames[1:]:
        eng.step(f)
    st = eng.stats
    executed = (st.effective_macs - first.effective_macs) / (st.dense_macs - first.dense_macs)
    report = ds.measure(ds.VideoModel(gm).eval(), [torch.stack(frames, 1)], engine="torch")
    assert report.executed_error is None
    assert report.executed_fraction == pytest.approx(executed, rel=1e-9)


def test_cpp_half_engine_takes_the_torch_crossovers():
    """The C++ backend's fused kernels run float32 only (its crossovers are measured on them);
    a half engine on it runs the torch paths, with the torch backend's crossovers."""
    from deltasparse.engine.kernels import CppBackend, TorchBackend

    if not CppBackend.available():
        pytest.skip("the C++ engine op is not available here")
    gm, _ = _model("gpool")
    assert DeltaEngine(gm, backend="cpp").crossover == CppBackend.crossover
    half = DeltaEngine(copy.deepcopy(gm).to(torch.bfloat16), backend="cpp")
    assert half.crossover == TorchBackend.crossover != CppBackend.crossover


# -- GPU: the Triton kernels and the CUDA-graph step in half precision ---------------------
gpu = pytest.mark.skipif(not has_triton(), reason="needs a CUDA device and triton")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("name", ["mobilenet", "gpool"])
def test_half_graph_step_matches_the_dense_pass_on_gpu(name, dtype):
    """The whole-step CUDA graph (and the eager Triton kernels) in half precision, every frame
    against the reference backend's dense pass in the same dtype on the same device."""
    gm32, shape = _model(name)
    gm = copy.deepcopy(gm32).to(device="cuda", dtype=dtype)
    graphed = DeltaEngine(gm, backend="triton")
    eager = DeltaEngine(gm, backend="triton", cuda_graph=False, dense_step=None)
    ref = DeltaEngine(gm, backend="reference")
    for t, f in enumerate(_frames(12, shape, seed=4)):
        f = f.to(device="cuda", dtype=dtype)
        want = ref.step(f).float()
        scale = float(want.abs().max())
        for eng, what in ((graphed, "graph"), (eager, "eager")):
            y = eng.step(f)
            assert y.dtype == dtype
            err = float((y.float() - want).abs().max())
            assert err <= HIST * scale, (what, t, err, scale)
        if t == 0 and name == "mobilenet":
            assert graphed._graph is not None, graphed.stats.fallbacks
    st = graphed.stats
    assert 0 < st.effective_macs < st.dense_macs


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_step_is_history_independent_bit_for_bit(dtype):
    """After any stream, the CUDA-graph step holds exactly what a fresh engine computes from
    the last frame alone (its first frame is recomputed by the graph's own kernels)."""
    gm32, shape = _model("mobilenet")
    gm = copy.deepcopy(gm32).to(device="cuda", dtype=dtype)
    eng = DeltaEngine(gm, backend="triton")
    frames = [f.to(device="cuda", dtype=dtype) for f in _frames(10, shape, seed=6)]
    for t, f in enumerate(frames):
        y = eng.step(f)
        fresh = DeltaEngine(gm, backend="triton")
        want = fresh.step(f)
        assert eng._graph is not None and fresh._graph is not None
        assert torch.equal(y, want), (t, float((y.float() - want.float()).abs().max()))
        va, vb = eng.values(), fresh.values()
        assert all(torch.equal(va[k], vb[k]) for k in vb), t


class _PaddedPointwise(nn.Module):
    """A 1x1 conv with padding 1: its border rows have windows all in padding (constants no
    step recomputes), which the graph step's first recompute must leave to the dense pass."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.pad = nn.Conv2d(16, 16, 1, 1, 1)
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False)
        self.b2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.pad(x))
        x = torch.relu(self.b2(self.dw(x)))
        return self.fc(x.mean((2, 3)))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graph_step_keeps_rows_no_input_reaches(dtype):
    shape = (2, 3, 16, 16)
    gm = converted(_PaddedPointwise(), torch.rand(shape), thr=0.05)
    gm = gm.to(device="cuda", dtype=dtype)
    eng = DeltaEngine(gm, backend="triton")
    for t, f in enumerate(_frames(6, shape, seed=7)):
        f = f.to(device="cuda", dtype=dtype)
        y = eng.step(f)
        assert eng._graph is not None, eng.stats.fallbacks
        assert torch.isfinite(y).all()
        want = DeltaEngine(gm, backend="triton").step(f)
        assert torch.equal(y, want), t


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["resnet", "gpool", "graphops", "upsample", "grouped",
                                  "convnext", "wide", "allops", "modern"])  # fmt: skip
def test_graph_step_runs_pooling_adds_products_and_activations(name, dtype):
    """ResNet blocks (max pooling, residual adds), concatenations, grouped convs, LayerNorm,
    split reductions, squeeze-excitation
    products, average pooling and every activation of the chain run in the whole-step graph:
    every frame close to the reference pass, equal to a fresh engine's."""
    gm32, shape = _model(name)
    gm = copy.deepcopy(gm32).to(device="cuda", dtype=dtype)
    eng = DeltaEngine(gm, backend="triton")
    ref = DeltaEngine(gm, backend="reference")
    tol = HIST if dtype != torch.float32 else 1e-4
    for t, f in enumerate(_frames(8, shape, seed=8)):
        f = f.to(device="cuda", dtype=dtype)
        y, want = eng.step(f), ref.step(f)
        assert eng._graph is not None, eng.stats.fallbacks
        assert float((y.float() - want.float()).abs().max()) <= tol * float(want.abs().max())
        assert torch.equal(y, DeltaEngine(gm, backend="triton").step(f)), t
    assert 0 < eng.stats.effective_macs < eng.stats.dense_macs
