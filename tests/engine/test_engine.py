"""Streaming equivalence of DeltaEngine with the dense quantised model, frame by frame."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import (
    AllOps,
    DenseRecorder,
    GlobalPoolNet,
    assert_streams_like_dense,
    compare,
    converted,
)
from torch import nn

import deltasparse as ds
from deltasparse.data.streams import synthetic_stream
from deltasparse.engine import DeltaEngine, UnsupportedOpError
from deltasparse.engine.stats import FallbackWarning

SHAPE = (2, 3, 28, 44)  # odd sizes on the way down exercise padding and ceil_mode


@pytest.mark.parametrize("granularity", ["layer", "channel", "neuron"])
def test_all_ops_match_dense(granularity, crossover, backend):
    frames = list(synthetic_stream(40, SHAPE, noise=0.02, seed=1))
    gm = converted(AllOps(), frames[0], granularity=granularity, thr=0.15)
    eng = DeltaEngine(gm, backend, crossover=crossover)
    assert_streams_like_dense(eng, DenseRecorder(gm), frames, 1e-4)
    st = eng.stats
    assert 0 < st.effective_macs < st.dense_macs  # it skipped work
    kinds = {layer["kind"] for layer in st.layers}
    assert {"conv", "depthwise", "conv1x1", "linear", "maxpool", "avgpool", "add",
            "cat", "flatten"} <= kinds  # fmt: skip


def test_global_pool_net_and_activation_options(crossover, backend):
    frames = list(synthetic_stream(30, (3, 3, 20, 20), seed=2))
    gm = converted(GlobalPoolNet(), frames[0], thr=0.2, activation="relu", on_input=True)
    eng = DeltaEngine(ds.VideoModel(gm), backend, crossover=crossover)
    rec = DenseRecorder(gm)
    for f in frames:
        err, d, _ = compare(eng, rec, f)
        assert err <= 1e-4 and d == 0
    assert eng.stats.effective_macs < eng.stats.dense_macs


def test_mobilenet_v1_stream_matches_dense():
    m = ds.models.mobilenet_v1(num_classes=7, width_mult=0.25)
    frames = list(synthetic_stream(12, (1, 3, 64, 96), seed=3))
    gm = converted(m, frames[0], thr=0.1)
    eng = DeltaEngine(gm)
    rec = DenseRecorder(gm)
    for f in frames:
        err, d, total = compare(eng, rec, f)
        assert err <= 1e-4 and d <= 1e-4 * total
    assert eng.stats.ideal_speedup > 1.5


def test_reference_backend_is_dense_and_equal():
    frames = list(synthetic_stream(6, SHAPE, seed=4))
    gm = converted(AllOps(), frames[0])
    ref, fast = DeltaEngine(gm, backend="reference"), DeltaEngine(gm, backend="torch")
    engines = [ref, fast]
    if ds.engine.get_backend("auto").name == "cpp":
        engines.append(DeltaEngine(gm, backend="cpp"))
    for f in frames:
        outs = [e.step(f) for e in engines]
        for y in outs:
            torch.testing.assert_close(y, gm(f), rtol=0, atol=1e-4)
        if len(outs) == 3:  # fused C++ epilogue: the same float ops, bias added after the GEMM
            torch.testing.assert_close(outs[1], outs[2], rtol=0, atol=1e-5)
    assert ref.stats.effective_macs == ref.stats.dense_macs
    assert fast.stats.effective_macs < fast.stats.dense_macs


def test_stats_add_up():
    frames = list(synthetic_stream(10, SHAPE, seed=5))
    gm = converted(AllOps(), frames[0])
    eng = DeltaEngine(gm)
    eng.step(frames[0])
    s = eng.stats
    assert s.frames == 1 and s.effective_macs == s.dense_macs > 0 and s.ideal_speedup == 1.0
    per_frame = s.dense_macs
    for f in frames[1:]:
        eng.step(f)
    s = eng.stats
    assert s.dense_macs == per_frame * len(frames)
    assert s.effective_macs <= s.dense_macs
    assert s.effective_macs == sum(layer["effective_macs"] for layer in s.layers)
    assert s.dense_macs == sum(layer["dense_macs"] for layer in s.layers)
    assert s.ideal_speedup == pytest.approx(s.dense_macs / s.effective_macs)
    assert s.state_bytes > 0 and s.dense_activation_bytes > 0 and s.time_s > 0
    for layer in s.layers:
        for k in ("input_density", "computed_density", "output_density"):
            assert layer[k] is None or 0.0 <= layer[k] <= 1.0
    d = s.to_dict()
    assert d["ideal_speedup"] == s.ideal_speedup and len(d["layers"]) == len(s.layers)


def test_exact_macs_of_a_tiny_net():
    """One changed pixel through a 1x1 conv then a 3x3 conv: MACs counted exactly."""
    net = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.ReLU(),
                        nn.Conv2d(4, 3, 3, padding=1, bias=False)).eval()  # fmt: skip
    x = torch.rand(1, 2, 6, 6) + 1.0
    gm = converted(net, x, thr=1e-3)
    eng = DeltaEngine(gm, crossover={"linear": 1.0, "conv": 1.0})
    eng.step(x)
    assert eng.stats.dense_macs == 36 * 2 * 4 + 36 * 9 * 4 * 3
    x2 = x.clone()
    x2[0, :, 2, 3] += 0.5  # one interior pixel
    eng.step(x2)
    # 1x1: 1 row x 2 x 4; 3x3: the 9 reachable outputs x 9 taps x 4 x 3.
    first = 36 * 2 * 4 + 36 * 9 * 4 * 3
    assert eng.stats.effective_macs == first + 1 * 2 * 4 + 9 * 9 * 4 * 3
    torch.testing.assert_close(eng.step(x2), gm(x2))


def test_reset_semantics():
    frames = list(synthetic_stream(8, SHAPE, seed=6))
    gm = converted(AllOps(), frames[0])
    eng = DeltaEngine(gm)
    for f in frames[:4]:
        eng.step(f)
    eng.reset()
    assert eng.stats.frames == 0 and eng.stats.dense_macs == 0
    y = eng.step(frames[6])  # the first frame after reset is dense and exact
    torch.testing.assert_close(y, gm(frames[6]), rtol=0, atol=1e-4)
    assert eng.stats.effective_macs == eng.stats.dense_macs
    with pytest.raises(ValueError, match="reset"):
        eng.step(frames[0][:1])
    eng.reset()
    torch.testing.assert_close(eng.step(frames[0][:1]), gm(frames[0][:1]), rtol=0, atol=1e-4)
    # reset() re-reads the parameters
    for m in gm.modules():
        if isinstance(m, ds.DeltaActivation):
            m.theta.data.mul_(2.0)
    eng.reset()
    torch.testing.assert_close(eng.step(frames[1][:1]), gm(frames[1][:1]), rtol=0, atol=1e-4)


def test_batch_streams_are_independent():
    frames = list(synthetic_stream(10, SHAPE, seed=7))
    gm = converted(AllOps(), frames[0])
    both = DeltaEngine(gm)
    single = DeltaEngine(gm)
    for f in frames:
        y = both.step(f)
        torch.testing.assert_close(y[1:], single.step(f[1:].clone()), rtol=0, atol=1e-5)


def test_model_not_modified():
    frames = list(synthetic_stream(4, SHAPE, seed=8))
    gm = converted(AllOps(), frames[0])
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    eng = DeltaEngine(gm)
    for f in frames:
        eng.step(f)
    after = gm.state_dict()
    assert gm.code == code
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_unsupported_op_error_and_dense_fallback():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.Softplus()
            self.fc = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.fc(torch.sin(self.act(self.conv(x))))

    net = Net().eval()
    with pytest.raises(UnsupportedOpError, match=r"module 'act' \(Softplus\)"):
        DeltaEngine(net)
    with pytest.warns(FallbackWarning) as warned:
        eng = DeltaEngine(net, fallback="dense")
    messages = [str(w.message) for w in warned]  # one warning per op run densely
    assert len(messages) == 2 and "(Softplus)" in messages[0] and "'sin'" in messages[1]
    frames = list(synthetic_stream(5, (1, 3, 12, 12), seed=9))
    for f in frames:
        torch.testing.assert_close(eng.step(f), net(f), rtol=0, atol=1e-5)
    kinds = [layer["kind"] for layer in eng.stats.layers]
    assert kinds.count("fallback") == 2 and len(eng.stats.fallbacks) == 2

    class Bad(nn.Module):
        def forward(self, x):
            return x / 2

    with pytest.raises(UnsupportedOpError, match="truediv"):
        DeltaEngine(Bad().eval())


def test_bad_inputs_give_clear_errors():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="eval"):
        DeltaEngine(net)
    eng = DeltaEngine(net.eval())
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        eng.step(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="dtype"):
        eng.step(torch.zeros(1, 3, 8, 8, dtype=torch.float16))
    with pytest.raises(UnsupportedOpError, match="Conv2d"):
        eng.step(torch.zeros(1, 5, 8, 8))
    with pytest.raises(ValueError, match="backend"):
        DeltaEngine(net.eval(), backend="nope")
    layer = ds.DeltaActivation(num_channels=4)  # clip layout
    with pytest.raises(ValueError, match="clip"):
        DeltaEngine(nn.Sequential(nn.Conv2d(3, 4, 1), layer).eval())


def test_triton_backend_errors_without_cuda():
    if ds.engine.has_triton():
        pytest.skip("triton and CUDA are available here")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with pytest.raises(RuntimeError, match="triton"):
        DeltaEngine(net, backend="triton")
    assert DeltaEngine(net, backend="auto").backend.name in ("cpp", "torch")


def test_resnet_shaped_model_matches_dense(backend):
    from engine_helpers import TinyResNet

    frames = list(synthetic_stream(25, (2, 3, 40, 56), seed=13))
    gm = converted(TinyResNet(), frames[0], thr=0.1)
    eng = DeltaEngine(gm, backend)
    rec = DenseRecorder(gm)
    for f in frames:
        err, d, total = compare(eng, rec, f)
        assert err <= 1e-4 and d <= 1e-4 * total
    kinds = {layer["kind"] for layer in eng.stats.layers}
    assert {"conv", "maxpool", "add", "global_avgpool", "linear"} <= kinds
    assert eng.stats.effective_macs < eng.stats.dense_macs
