"""measure() predicts what DeltaEngine executes: the same MACs, from the engine's own rules,
on random models of every op kind, gate and mode, with several streams per batch."""

import pytest
import torch
from engine_helpers import AllOps, randomize
from torch import nn

import deltasparse as ds
from deltasparse.data.streams import synthetic_stream


def _clips(b: int, t: int, hw: int, seed: int, noise: float = 0.003) -> torch.Tensor:
    frames = list(synthetic_stream(t, (b, 3, hw, hw), noise=noise, seed=seed, speed=1.0))
    return torch.stack(frames, 1)  # (B, T, C, H, W)


def _engine_macs(gm, clips: torch.Tensor, backend: str) -> tuple[int, int]:
    """Steady-state (first frame excluded) effective and dense MACs of the engine on clips."""
    eff = dense = 0
    ds.reset_state(gm)
    eng = ds.DeltaEngine(gm, backend=backend)
    with torch.no_grad():
        eng.step(clips[:, 0])
        first = eng.stats
        for t in range(1, clips.shape[1]):
            eng.step(clips[:, t])
    st = eng.stats
    eff += st.effective_macs - first.effective_macs
    dense += st.dense_macs - first.dense_macs
    return eff, dense


@pytest.mark.parametrize("gate,mode", [("scalar", "grid"), ("pixel", "grid"),
                                       ("pixel", "hysteresis"), ("scalar", "hysteresis")])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_predicted_equals_engine_on_random_models(gate, mode, backend):
    from deltasparse.engine.kernels import CppBackend

    if backend == "cpp" and not CppBackend.available():
        pytest.skip("no C++ engine op here")
    torch.manual_seed(1)
    model = randomize(AllOps(), 1).eval()
    batches = [_clips(2, 6, 32, seed=s) for s in (1, 2)] + [_clips(3, 4, 32, seed=3)]
    cfg = ds.DeltaConfig(gate=gate, mode=mode, threshold_init=0.08, on_input=True)
    gm = ds.convert(model, cfg, example_input=batches[0][:, 0]).eval()
    report = ds.measure(ds.VideoModel(gm).eval(), batches, engine=backend)
    ex = report.executed
    assert report.executed_error is None and ex is not None
    eff = dense = 0
    for clips in batches:
        e, d = _engine_macs(gm, clips, backend)
        eff, dense = eff + e, dense + d
    frames = sum(c.shape[0] * (c.shape[1] - 1) for c in batches)
    assert ex["frames"] == frames and ex["streams"] == [2, 3]
    assert ex["dense_macs_per_frame"] * frames == pytest.approx(dense, rel=1e-9)
    assert ex["executed_macs_per_frame"] * frames == pytest.approx(eff, rel=0.01)
    assert ex["executed_fraction"] == pytest.approx(eff / dense, rel=0.01)
    assert 0 < ex["executed_fraction"] < 1
    names = [r["name"] for r in ex["layers"]]
    assert "conv1" in names and "fc2" in names


def test_executed_exceeds_counted_when_changes_scatter():
    """Scattered per-scalar changes: few scalars counted, nearly every pixel executed."""
    conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    gm = ds.convert(conv, ds.DeltaConfig(threshold_init=0.5))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 1, 16, 16, generator=g).expand(2, 5, 1, 16, 16).clone()
    x += 0.2 * torch.randn(x.shape, generator=g)
    gm(x[:, 0])  # thresholds
    report = ds.measure(ds.VideoModel(gm).eval(), [x], engine="torch")
    assert report.executed_fraction > 2 * report.op_fraction


def test_no_prediction_for_what_the_engine_cannot_run():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = nn.ReLU()
            self.fc = nn.Linear(4 * 36, 2)

        def forward(self, x):
            return self.fc(self.act(self.conv(torch.sin(x))).flatten(1))  # sin: no engine op

    gm = ds.convert(Odd(), ds.DeltaConfig())
    clips = torch.randn(1, 3, 3, 8, 8)
    gm(clips[:, 0])
    report = ds.measure(ds.VideoModel(gm), [clips])
    assert report.executed is None and "sin" in report.executed_error
    assert report.to_dict()["executed_fraction"] is None
