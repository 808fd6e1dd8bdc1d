"""What DeltaEngine accepts and refuses: eval mode, frame sizes, float64 models."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import AllOps, DenseRecorder, converted
from torch import nn

import deltasparse as ds
from deltasparse.data.streams import synthetic_stream
from deltasparse.engine import DeltaEngine
from deltasparse.engine.plan import trace_model


def _nested() -> nn.Module:
    """Containers around the leaves: fx makes new container modules when it traces this."""
    return nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), nn.Flatten())


@pytest.mark.parametrize("make", [
    lambda: ds.models.mobilenet_v1(num_classes=5, width_mult=0.25),
    _nested,
], ids=["mobilenet_v1", "nested_sequential"])  # fmt: skip
def test_eval_model_that_convert_did_not_produce_runs(make):
    model = make().eval()
    eng = DeltaEngine(model, "torch")
    for f in synthetic_stream(4, (1, 3, 32, 32), seed=0):
        with torch.no_grad():
            want = model(f)
        torch.testing.assert_close(eng.step(f), want, rtol=1e-5, atol=1e-5)
    assert eng.stats.frames == 4


def test_training_mode_is_still_refused_whole_or_in_part():
    with pytest.raises(ValueError, match=r"eval mode.*'<root>'.*model\.eval\(\)"):
        DeltaEngine(_nested().train())
    m = ds.models.mobilenet_v1(num_classes=5, width_mult=0.25).eval()
    m.features[2].train()  # one block left in training mode
    with pytest.raises(ValueError, match=r"'features\.2'.* is training"):
        DeltaEngine(m)
    m.features[2].eval()
    m.features[5][1][1].train()  # one batch norm, deep down
    with pytest.raises(ValueError, match=r"'features\.5\.1\.1' is training"):
        DeltaEngine(m)
    video = ds.VideoModel(ds.models.mobilenet_v1(num_classes=5, width_mult=0.25))
    with pytest.raises(ValueError, match="is training"):
        DeltaEngine(video)


def test_trace_gives_fx_containers_the_users_modes():
    m = ds.models.mobilenet_v1(num_classes=5, width_mult=0.25)
    gm = trace_model(m.eval())
    assert not any(mod.training for mod in gm.modules())
    m.features[3].train()
    modes = {n: mod.training for n, mod in trace_model(m).named_modules()}
    assert modes["features.3"] and modes["features.3.0.1"] and not modes["features.2"]
    assert not modes["features"] and not modes[""]


def test_frames_too_small_for_the_model_are_refused_like_the_dense_model():
    m = ds.models.convnet(num_classes=5, width_mult=0.25)
    gm = converted(m, torch.randn(1, 3, 32, 32))
    small = torch.randn(1, 3, 8, 8)  # four 2x2 max pools: 8 -> 4 -> 2 -> 1 -> 0
    with pytest.raises(RuntimeError, match="too small"):
        gm(small)  # the dense model refuses it ...
    eng = DeltaEngine(gm, "torch")
    with pytest.raises(ValueError, match=r"8x8 are too small.*maxpool 'features\.15'.*\(1, 48, 0, 0\)"):
        eng.step(small)  # ... and so does the engine (it used to return NaN)
    # a refused frame leaves the engine usable
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(eng.step(x), gm(x), rtol=0, atol=1e-4)
    assert eng.stats.frames == 1


def test_frames_that_give_negative_sizes_are_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.Conv2d(4, 4, 5)).eval()
    eng = DeltaEngine(net, "torch")
    with pytest.raises(ValueError, match=r"6x6 are too small.*conv '2'"):
        eng.step(torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match=r"3x3 are too small.*conv '0'"):
        eng.step(torch.randn(1, 3, 3, 3))
    assert eng.step(torch.randn(1, 3, 9, 9)).shape == (1, 4, 1, 1)


def test_float64_model_matches_dense_frame_by_frame(backend):
    frames = [f.double() for f in synthetic_stream(20, (2, 3, 28, 44), seed=1)]
    gm = converted(AllOps(), frames[0].float(), thr=0.15).double()
    eng = DeltaEngine(gm, backend)
    assert eng.dtype == torch.float64
    rec = DenseRecorder(gm)
    for f in frames:
        y = eng.step(f)
        yd, acts = rec(f)
        assert y.dtype == torch.float64
        assert float((y - yd).abs().max()) <= 1e-9 * float(yd.abs().max())
        vals = eng.values(set(acts))
        # the dense layers quantise in float32: values agree to float32 rounding, no level flips
        for k, v in acts.items():
            assert float((vals[k] - v).abs().max()) <= 1e-6, k
    st = eng.stats
    assert 0 < st.effective_macs < st.dense_macs
    with pytest.raises(TypeError, match="dtype"):
        eng.step(frames[0].float())
