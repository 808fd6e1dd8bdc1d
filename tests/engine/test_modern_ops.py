"""Today's CNN blocks in the engine: the registry's activations, squeeze-excitation, LayerNorm
over channels (NCHW and channels-last after a permute), layer scales, stochastic depth,
upsampling and concat. Each against the dense model frame by frame, on every CPU backend and
in float32 / float64, with history independence and the executed-MAC prediction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import (
    DenseRecorder,
    LayerNorm2d,
    ModernOps,
    assert_streams_like_dense,
    compare_rel,
    converted,
)
from torch import nn

import deltasparse as ds
from deltasparse._opset import ACTIVATIONS
from deltasparse.data.streams import synthetic_stream
from deltasparse.engine import DeltaEngine, UnsupportedOpError
from deltasparse.engine.kernels.geometry import upsample_size, upsample_sources
from deltasparse.metrics.macs import consumer_macs

SHAPE = (2, 3, 28, 44)
AFTER = ("SiLU", "Hardswish", "Sigmoid", "Hardsigmoid", "GELU", "LeakyReLU", "PReLU", "ReLU")


def _frames(n: int, seed: int, noise: float = 0.01, shape=SHAPE):
    return list(synthetic_stream(n, shape, noise=noise, seed=seed, objects=1, object_size=0.25))


def _modern(frames, granularity="channel", thr=0.15):
    return converted(ModernOps(), frames[0], thr=thr, granularity=granularity, after=AFTER)


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_modern_ops_match_dense(granularity, backend):
    frames = _frames(30, seed=1)
    gm = _modern(frames, granularity)
    eng = DeltaEngine(gm, backend)
    assert_streams_like_dense(eng, DenseRecorder(gm), frames, 1e-5, relative=True)
    st = eng.stats
    assert 0 < st.effective_macs < st.dense_macs  # it skipped work
    kinds = {layer["kind"] for layer in st.layers}
    assert {"mul", "upsample", "permute", "linear", "global_avgpool", "cat", "add",
            "depthwise"} <= kinds  # fmt: skip


def test_modern_ops_float64():
    frames = [f.double() for f in _frames(12, seed=2)]
    gm = converted(ModernOps(), frames[0].float(), thr=0.15, after=AFTER).double()
    eng = DeltaEngine(gm, "torch")
    for f in frames:
        with torch.no_grad():
            y, yd = eng.step(f), gm(f)
        assert y.dtype == torch.float64
        # the dense gates quantise in float32 (test_checks): agreement to that rounding
        assert float((y - yd).abs().max()) <= 1e-8 * float(yd.abs().max())


def test_modern_ops_history_independent(backend):
    """After a long stream, a fresh engine on the last frame holds the same state."""
    frames = _frames(120, seed=3, noise=0.02)
    gm = _modern(frames)
    long_run = DeltaEngine(gm, backend)
    for f in frames:
        long_run.step(f)
    fresh = DeltaEngine(gm, backend)
    fresh.step(frames[-1])
    a, b = long_run.values(), fresh.values()
    assert set(a) == set(b)
    for name, v in a.items():
        scale = max(float(b[name].abs().max()), 1.0)
        assert float((v - b[name]).abs().max()) <= 1e-6 * scale, name


def test_modern_ops_predicted_equals_executed(backend):
    frames = _frames(8, seed=4, noise=0.005)
    clips = torch.stack(frames, 1)  # (B, T, C, H, W)
    gm = _modern(frames, thr=0.2)
    report = ds.measure(ds.VideoModel(gm).eval(), [clips], engine=backend)
    assert report.executed_error is None
    ds.reset_state(gm)
    eng = DeltaEngine(gm, backend)
    eng.step(frames[0])
    first = eng.stats
    for f in frames[1:]:
        eng.step(f)
    st = eng.stats
    executed = (st.effective_macs - first.effective_macs) / (st.dense_macs - first.dense_macs)
    assert report.executed_fraction == pytest.approx(executed, rel=0.01)
    assert 0 < report.executed_fraction < 1


class _Act(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.conv, self.act, self.out = nn.Conv2d(3, 6, 3, padding=1), act, nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.out(self.act(self.conv(x)))


_FUNCTIONAL = [
    lambda x: F.silu(x), lambda x: x.sigmoid(), lambda x: torch.tanh(x),
    lambda x: F.gelu(x, approximate="tanh"), lambda x: F.leaky_relu(x, 0.3),
    lambda x: F.hardswish(x), lambda x: F.elu(x, 0.7), lambda x: F.mish(x),
]  # fmt: skip


class _Fn(nn.Module):
    def __init__(self, i: int) -> None:
        super().__init__()
        self.i = i
        self.conv, self.out = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.out(_FUNCTIONAL[self.i](self.conv(x)))


def _modules_of_registry():
    out = []
    for a in ACTIVATIONS:
        cls = a.modules[0]
        out.append(cls(6) if cls is nn.PReLU else cls())
    return out


@pytest.mark.parametrize("net", [_Act(m) for m in _modules_of_registry()]
                         + [_Fn(i) for i in range(len(_FUNCTIONAL))],
                         ids=lambda n: type(n.act).__name__ if isinstance(n, _Act) else f"fn{n.i}")
def test_every_activation_streams_exactly(net, backend):
    net = net.eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    eng = DeltaEngine(net, backend)
    for f in _frames(6, seed=5, noise=0.0, shape=(2, 3, 10, 12)):
        torch.testing.assert_close(eng.step(f), net(f), rtol=0, atol=1e-5)
    assert eng.stats.effective_macs < eng.stats.dense_macs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,ac", [("nearest", False), ("nearest-exact", False),
                                     ("bilinear", False), ("bilinear", True)])
@pytest.mark.parametrize("kw", [dict(scale_factor=2), dict(scale_factor=1.5), dict(size=(13, 9)),
                                dict(scale_factor=(3, 0.7)), dict(scale_factor=1 / 3),
                                dict(scale_factor=2.3, recompute_scale_factor=True)],
                         ids=str)  # fmt: skip
def test_upsample_sources_are_pytorchs(mode, ac, kw, dtype):
    """The engine's source rows and weights reproduce F.interpolate (its CPU kernels' index and
    weight arithmetic), for shrinking and growing, sizes and scale factors."""
    for h, w in [(5, 7), (8, 8), (3, 11)]:
        x = torch.randn(2, 3, h, w, dtype=dtype)
        extra = {} if mode.startswith("nearest") else {"align_corners": ac}
        y = F.interpolate(x, mode=mode, **kw, **extra)
        ho, wo = y.shape[2:]
        rec = kw.get("recompute_scale_factor")
        if not rec:
            assert upsample_size((h, w), kw.get("size"), kw.get("scale_factor")) == (ho, wo)
        scales = None if ("size" in kw or rec) else kw["scale_factor"]
        idx, wt = upsample_sources(2, (h, w), (ho, wo), mode, ac, scales, dtype)
        rows = x.permute(0, 2, 3, 1).reshape(-1, 3)
        z = (rows[idx] * wt.to(dtype)[..., None]).sum(1)
        ref = y.permute(0, 2, 3, 1).reshape(-1, 3)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(z, ref, rtol=0, atol=tol)


def test_fan_out_and_exact_macs_through_upsample_and_products():
    class Neck(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.SiLU()
            self.se = nn.Conv2d(4, 4, 1)
            self.head = nn.Conv2d(4, 5, 3, padding=1)

        def forward(self, x):
            a = self.act(self.conv(x))
            s = torch.sigmoid(self.se(F.adaptive_avg_pool2d(a, 1)))
            u = F.interpolate(a * s, scale_factor=2, mode="bilinear")
            return self.head(u)

    x = torch.randn(2, 3, 6, 8)
    gm = ds.convert(Neck().eval(), ds.DeltaConfig(after=("SiLU",)), example_input=x)
    layer = gm.get_submodule("act_delta")
    assert layer.fan_out == 4 + 9 * 5  # se (1x1, 4 out) + head (3x3, 5 out) through mul/upsample
    from deltasparse._graph import find_consumers

    node = next(n for n in gm.graph.nodes if n.target == "act_delta")
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(x)
    modules = dict(gm.named_modules())
    (se, head) = sorted(find_consumers(gm, node), key=lambda c: c.name)[::-1]
    assert head.name == "head"
    binary = (torch.rand(2, 4, 6, 8) < 0.1).float()
    reach = (F.interpolate(binary, scale_factor=2, mode="bilinear") > 0).float()
    brute = int(F.conv2d(reach, torch.ones(5, 4, 3, 3), padding=1).sum())
    assert consumer_macs(head, binary, modules) == brute


def test_clear_errors_for_what_the_new_ops_do_not_cover():
    class PixelOnNhwc(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4, 4)
            self.act = nn.GELU()

        def forward(self, x):
            return self.fc(self.act(self.conv(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)

    x = torch.randn(1, 3, 6, 6)
    gm = ds.convert(PixelOnNhwc().eval(), ds.DeltaConfig(after=("GELU",), gate="pixel"),
                    example_input=x).eval()  # fmt: skip
    with pytest.raises(UnsupportedOpError, match="pixel gate .* channels-last"):
        DeltaEngine(gm, "torch").step(x)

    class NormOverWidth(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 4, 1), nn.LayerNorm(6)

        def forward(self, x):
            return self.norm(self.conv(x))

    with pytest.raises(UnsupportedOpError, match="LayerNorm 'norm' over the last dim"):
        DeltaEngine(NormOverWidth().eval(), "torch").step(x)

    class OddPermute(nn.Module):
        def forward(self, x):
            return x.permute(0, 1, 3, 2).relu()

    with pytest.raises(UnsupportedOpError, match=r"permute .* \(0, 1, 3, 2\)"):
        DeltaEngine(OddPermute().eval(), "torch").step(x)

    class SpatialScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.scale = nn.Parameter(torch.rand(4, 6, 1))

        def forward(self, x):
            return self.scale * self.conv(x)

    with pytest.raises(UnsupportedOpError, match=r"constant of shape \(4, 6, 1\)"):
        DeltaEngine(SpatialScale().eval(), "torch").step(x)

    class RowScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return y * y.mean((2, 3), keepdim=True)[:, :, :1, :1].flatten(1)[:, None, None, :1]

    with pytest.raises(UnsupportedOpError):
        DeltaEngine(RowScale().eval(), "torch").step(x)


def test_layernorm2d_is_recognised_by_running_it():
    from deltasparse._opset import layernorm_axis

    assert layernorm_axis(nn.LayerNorm(8)) == "last"
    assert layernorm_axis(LayerNorm2d(8)) == "channels"

    class Weird(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    assert layernorm_axis(Weird(8)) is None
    m = LayerNorm2d(8)
    w = m.weight.detach().clone()
    layernorm_axis(m)  # the probe runs on a copy: the module keeps its dtype and values
    assert m.weight.dtype == torch.float32 and torch.equal(m.weight, w)


def test_yolo_style_neck_streams_exactly(backend):
    """Upsampling + concat (a PAN neck), SPPF max pools, CSP residuals, SiLU gates."""
    frames = _frames(10, seed=6, noise=0.0, shape=(1, 3, 64, 96))
    gm = converted(ds.models.YoloNeck(classes=2, width=8), frames[0], thr=0.1, after=("SiLU",))
    eng = DeltaEngine(gm, backend)
    rec = DenseRecorder(gm)
    for f in frames:
        err, d, total = compare_rel(eng, rec, f)
        assert err <= 1e-5 and d <= 1e-4 * total
    st = eng.stats
    assert st.effective_macs < 0.9 * st.dense_macs  # a moving object on a still scene
    kinds = [layer["kind"] for layer in st.layers]
    assert kinds.count("upsample") == 2 and "cat" in kinds and "maxpool" in kinds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_modern_ops_on_the_gpu_match_dense_every_frame():
    """The GPU backend (per-op driver: the CUDA-graph step has no kernels for these ops yet, and
    says so) against the dense model on every frame."""
    import warnings

    from deltasparse.engine.stats import FallbackWarning

    frames = [f.cuda() for f in _frames(20, seed=7)]
    gm = converted(ModernOps(), frames[0].cpu(), thr=0.15, after=AFTER).cuda()
    # the reference in float32 proper (cuDNN's convs default to TF32; the engine does not)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FallbackWarning)
        eng = DeltaEngine(gm, dense_step=None)  # the per-op driver (noise: dense steps else)
        assert_streams_like_dense(eng, DenseRecorder(gm), frames, 1e-4, relative=True)
    torch.backends.cudnn.allow_tf32 = tf32
    assert eng.stats.effective_macs < eng.stats.dense_macs
    if eng.backend.name == "triton":
        assert any("CUDA-graph" in r for r in eng.stats.fallbacks)
        assert any(w.category is FallbackWarning for w in caught)


def _switching_stream(n: int, seed: int, shape=SHAPE):
    """A still scene with a small moving object, and every third frame fresh noise: steps that
    are sparse and steps where every pixel changed (the noise frame and the one after it)."""
    frames = _frames(n, seed=seed, noise=0.0, shape=shape)
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(f.shape, generator=g) if i % 3 == 2 else f for i, f in enumerate(frames)]


@pytest.mark.parametrize("model", ["modern", "yolo"])
def test_dense_step_changes_speed_never_results(model, backend):
    """dense_step: steps where most rows changed run the dense pass instead; outputs and states
    equal those of the delta steps, the stats count those steps dense, and the prediction
    (ExecutedPredictor, the rule measure() applies) equals the engine's executed MACs."""
    from deltasparse.engine.predict import ExecutedPredictor, changed_rows

    frames = _switching_stream(12, seed=8, shape=SHAPE if model == "modern" else (1, 3, 64, 96))
    net = ModernOps() if model == "modern" else ds.models.YoloNeck(classes=2, width=8)
    gm = converted(net, frames[0], thr=0.15, after=AFTER if model == "modern" else ("SiLU",))
    delta = DeltaEngine(gm, backend, dense_step=None)
    mixed = DeltaEngine(gm, backend, dense_step=0.5)
    pred = ExecutedPredictor(gm, frames[0].shape, backend=backend, dense_step=0.5)
    prev = None
    for f in frames:
        a, b = delta.step(f), mixed.step(f)
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        # the dense outputs of every stored value, for the prediction
        vals = mixed.values()
        pred.step_changes(None if prev is None else {
            name: changed_rows(vals[name], prev[name], v.layout) for name, v in pred._values})
        prev = vals
    # the noise frames (2, 5, 8, 11) and the frames after them (3, 6, 9)
    assert mixed._dense is not None and mixed._dense.steps == 7
    va, vb = delta.values(), mixed.values()
    for name in va:
        assert torch.equal(va[name], vb[name]), name
    sd, sm = delta.stats, mixed.stats
    assert sm.frames == sd.frames == len(frames)
    assert sm.dense_macs == sd.dense_macs
    assert sd.effective_macs <= sm.effective_macs < sm.dense_macs
    assert pred.stats.effective_macs == sm.effective_macs
    for la, lb in zip(sd.layers, sm.layers, strict=True):
        assert la["frames"] == lb["frames"] == len(frames), la["name"]


def test_dense_step_argument_is_checked():
    with pytest.raises(ValueError, match=r"dense_step=\.\.\.\) is a fraction in \[0, 1\]"):
        DeltaEngine(ModernOps().eval(), "torch", dense_step=2.0)


def test_outputs_and_values_are_copies_for_1x1_maps():
    """A (B, C, 1, 1) output (or value) is a copy: the next step does not change it (its
    channels-last view is contiguous already, so it used to be handed out live)."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)).eval()
    eng = DeltaEngine(net, "torch")
    f0, f1 = _frames(2, seed=9, noise=0.05, shape=(2, 3, 8, 8))
    y0 = eng.step(f0)
    v0 = eng.values()
    keep = y0.clone(), {k: v.clone() for k, v in v0.items()}
    y1 = eng.step(f1)
    assert not torch.equal(y1, keep[0])
    assert torch.equal(y0, keep[0]) and all(torch.equal(v0[k], keep[1][k]) for k in v0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dense_step_cuda_graph_equals_delta_steps():
    frames = [f.cuda() for f in _switching_stream(12, seed=10)]
    gm = converted(ModernOps(), frames[0].cpu(), thr=0.15, after=AFTER).cuda()
    # the per-op driver (ModernOps runs in the whole-step graph otherwise, which has no
    # dense step)
    delta = DeltaEngine(gm, dense_step=None, cuda_graph=False)
    mixed = DeltaEngine(gm, dense_step=0.5, cuda_graph=False)
    for f in frames:
        a, b = delta.step(f), mixed.step(f)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    assert mixed._dense is not None and mixed._dense.graph is not None
    assert mixed._dense.steps == 7
    sd, sm = delta.stats, mixed.stats
    assert sm.dense_macs == sd.dense_macs and sm.frames == len(frames)


def test_values_of_a_gate_followed_by_a_fused_dropout():
    """mobilenet_v3's classifier: Linear -> Hardswish -> gate -> Dropout -> Linear; the gate's
    value is found though the plan fused the dropout after it."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 6), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(6, 3))
    frames = _frames(4, seed=11, shape=(2, 3, 8, 8))
    gm = converted(net, frames[0], thr=0.05, after=("Hardswish",))
    rec = DenseRecorder(gm)
    eng = DeltaEngine(gm, "torch")
    for f in frames:
        y = eng.step(f)
        dense, acts = rec(f)
        vals = eng.values(set(acts))
        assert set(vals) == set(acts) == {"_4_delta"}
        torch.testing.assert_close(vals["_4_delta"], acts["_4_delta"], rtol=0, atol=1e-6)
        torch.testing.assert_close(y, dense, rtol=0, atol=1e-5)
    assert "3" not in eng.values({"3"})  # the Linear's own output is not held: not listed


# -- review findings -------------------------------------------------------------------------


def test_numbers_and_layer_scales_are_one_factor_per_channel():
    """The device kernels read C factors: a number is expanded to every channel."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)
            self.gamma = nn.Parameter(torch.rand(5, 1, 1) + 0.5)

        def forward(self, x):
            return F.relu(self.gamma * (self.conv(x) * 0.5))

    x = torch.randn(2, 3, 6, 6)
    eng = DeltaEngine(Scaled().eval(), "torch")
    torch.testing.assert_close(eng.step(x), Scaled.forward(eng.model, x), rtol=0, atol=1e-6)
    (op,) = [o for o in eng._runtime.ops if o.name == "conv"]
    affine = [s for s in op.chain.steps if s[0] == "affine"]
    assert len(affine) == 2 and all(s[1].shape == (5,) and s[2].shape == (5,) for s in affine)


def test_constants_are_reread_at_reset_and_never_live():
    """Layer scales, LayerNorm and PReLU weights are copied when the runtime is built (at the
    first frame after a reset), like batch norm: an update between resets is not half-applied."""
    frames = _frames(3, seed=12, shape=(1, 3, 28, 44))
    net = ModernOps().eval()
    eng = DeltaEngine(net, "torch")
    eng.step(frames[0])
    with torch.no_grad():
        net.block.layer_scale.mul_(2.0)  # in place: a live view would see it mid-stream
        net.prelu.weight.data = net.prelu.weight.data + 0.3  # replaced: a view would not
        net.down[0].weight.add_(0.5)
    stale = eng.step(frames[1])
    eng.reset()
    fresh = eng.step(frames[1])
    with torch.no_grad():
        torch.testing.assert_close(fresh, net(frames[1]), rtol=0, atol=1e-5)
        assert float((stale - net(frames[1])).abs().max()) > 1e-3  # the old parameters held


def test_training_mode_dropout_and_drop_path_are_refused_or_followed():
    class DropPath(nn.Module):  # timm's name: kept as a leaf, identity in eval
        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, x):
            if not self.training:
                return x
            return x * (torch.rand(x.shape[0], 1, 1, 1) >= self.p) / (1 - self.p)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.dp = nn.Conv2d(3, 4, 3, padding=1), DropPath(0.2)

        def forward(self, x):
            return F.relu(self.conv(x) + self.dp(self.conv(x)))

    net = Net()
    x = torch.randn(1, 3, 6, 6)
    gm = ds.convert(net, ds.DeltaConfig(), example_input=x)  # in training mode, as train does
    assert any(n.op == "call_module" and n.target == "dp" for n in gm.graph.nodes)
    gm.eval()
    eng = DeltaEngine(gm, "torch")
    torch.testing.assert_close(eng.step(x), gm(x), rtol=0, atol=1e-6)

    class FnDropout(nn.Module):
        def forward(self, x):
            return F.dropout(x.relu(), 0.5)  # training=True: always active

    with pytest.raises(UnsupportedOpError, match="training=True"):
        DeltaEngine(FnDropout().eval(), "torch")


def test_channels_last_batch_norm_prelu_and_antialias_are_refused():
    class OnNhwc(nn.Module):  # ``layer`` on a channels-last tensor: it acts on dim 1 (H)
        def __init__(self, layer):
            super().__init__()
            self.conv, self.layer = nn.Conv2d(3, 6, 1), layer

        def forward(self, x):
            return self.layer(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(UnsupportedOpError, match="batch norm .* channels-last"):
        DeltaEngine(OnNhwc(nn.BatchNorm2d(6)).eval(), "torch").step(x)
    with pytest.raises(UnsupportedOpError, match="channels-last tensor they run along H"):
        DeltaEngine(OnNhwc(nn.PReLU(6)).eval(), "torch").step(x)

    class Aa(nn.Module):
        def forward(self, x):
            return F.interpolate(x.relu(), scale_factor=0.5, mode="bilinear", antialias=True)

    with pytest.raises(UnsupportedOpError, match="antialiased"):
        DeltaEngine(Aa().eval(), "torch")


def test_exact_macs_through_a_functional_layer_norm():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 8, 1), nn.ReLU()
            self.w, self.b = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            y = self.act(self.conv(x)).permute(0, 2, 3, 1)
            return self.fc(F.layer_norm(y, (8,), self.w, self.b)).permute(0, 3, 1, 2)

    from torch.fx.passes.shape_prop import ShapeProp

    from deltasparse._graph import find_consumers

    x = torch.randn(1, 3, 4, 4)
    gm = ds.convert(Block().eval(), ds.DeltaConfig(), example_input=x)
    ShapeProp(gm).propagate(x)
    node = next(n for n in gm.graph.nodes if n.target == "act_delta")
    (fc,) = find_consumers(gm, node)
    one = torch.zeros(1, 8, 4, 4)
    one[0, 3, 1, 2] = 1  # one changed element: its whole pixel is normalised again
    assert consumer_macs(fc, one, dict(gm.named_modules())) == 8 * 5


def test_repeated_inputs_of_add_mul_cat():
    class Rep(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = F.relu(self.conv(x))
            return torch.cat([y, y * y, y + y], dim=1)

    net = Rep().eval()
    eng = DeltaEngine(net, "torch")
    for f in _frames(3, seed=13, shape=(1, 3, 6, 6)):
        torch.testing.assert_close(eng.step(f), net(f), rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dense_step_then_delta_steps_on_the_gpu():
    """A delta step right after the dense step's capture compares with the frame the capture
    step stored (InputOp.prev written in place), and a number after a conv in the whole-step
    graph scales every channel."""
    frames = [f.cuda() for f in _frames(8, seed=14, noise=0.0)]
    g = torch.Generator(device="cuda").manual_seed(0)
    frames[2] = torch.rand(frames[2].shape, generator=g, device="cuda")
    gm = converted(ModernOps(), frames[0].cpu(), thr=0.15, after=AFTER).cuda()
    delta = DeltaEngine(gm, dense_step=None, cuda_graph=False)  # the per-op driver
    mixed = DeltaEngine(gm, dense_step=0.5, cuda_graph=False)
    for f in frames:
        a, b = delta.step(f), mixed.step(f)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    assert mixed._dense.steps == 2  # the noise frame and the one after it

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x) * 0.5))

    net = Scaled().eval().cuda()
    eng = DeltaEngine(net)
    with torch.no_grad():
        for f in frames:
            torch.testing.assert_close(eng.step(f), net(f), rtol=1e-4, atol=1e-4)
