"""measure(): exact effective/dense MACs on tiny nets counted by hand, op_fraction, densities,
plain models, batch formats, hook hygiene and the report's outputs."""

import json

import pytest
import torch
from rich.console import Console
from torch import nn

import deltasparse as ds
from deltasparse.layers import sparsity_layers

# A 1-channel 4x4 delta map with nonzeros at a corner, an edge, the interior and a corner.
POSITIONS = [(0, 0), (0, 1), (1, 1), (3, 3)]


def _clip_with_delta_map():
    """(B=1, T=2, C=1, 4, 4): frame 0 zero, frame 1 ones at POSITIONS (exact multiples of 1)."""
    x = torch.zeros(1, 2, 1, 4, 4)
    for i, j in POSITIONS:
        x[0, 1, 0, i, j] = 1.0
    return x


def _converted(*consumer):
    model = nn.Sequential(nn.ReLU(), *consumer)
    return ds.convert(model, ds.DeltaConfig(granularity="layer", threshold_init=1.0))


# 3x3 conv, stride 1, padding 1, C_out=2 on 4x4: an input pixel is seen by the outputs within
# one step of it, 2 along an edge row/col and 3 inside: coverage per axis [2, 3, 3, 2].
#   (0,0): 2*2  (0,1): 2*3  (1,1): 3*3  (3,3): 2*2  -> (4+6+9+4) * 2 = 46
#   dense: (2+3+3+2)^2 * 2 = 200
# 3x3 conv, stride 2, padding 1, C_out=3: outputs 0,1 cover rows {0,1} and {1,2,3}:
#   coverage per axis [1, 2, 1, 1] -> (1*1 + 1*2 + 2*2 + 1*1) * 3 = 24; dense 5^2 * 3 = 75
# flatten -> Linear(16, 5): 4 nonzeros * 5 = 20; dense 16 * 5 = 80
CASES = [
    ("conv_s1", lambda: (nn.Conv2d(1, 2, 3, padding=1, bias=False),), 46, 200, 18.0),
    ("conv_s2", lambda: (nn.Conv2d(1, 3, 3, stride=2, padding=1),), 24, 75, 6.75),
    ("linear", lambda: (nn.Flatten(), nn.Linear(16, 5)), 20, 80, 5.0),
]


@pytest.mark.parametrize("name,consumer,eff,dense,fan_out", CASES, ids=[c[0] for c in CASES])
def test_exact_macs_of_one_delta_map(name, consumer, eff, dense, fan_out):
    gm = _converted(*consumer())
    report = ds.measure(gm, [_clip_with_delta_map()])
    assert report.mode == "temporal"
    (row,) = report.layers
    assert row.kind == "delta" and row.fan_out == fan_out
    assert row.frames == 1  # B * (T - 1) delta frames
    assert row.effective_macs == eff and row.dense_macs == dense
    assert report.effective_macs_per_frame == eff and report.dense_macs_per_frame == dense
    assert report.mac_fraction == pytest.approx(eff / dense)
    assert (row.nonzero, row.total) == (4, 16)
    assert row.temporal_density == 0.25
    assert row.spatial_density == 4 / 32  # q over both frames
    assert report.op_fraction == 0.25 and report.op_reduction == 4.0
    assert row.shape == [1, 4, 4]
    assert row.threshold["mean"] == 1.0


def test_exact_macs_accumulate_over_batches_and_clips():
    gm = _converted(nn.Conv2d(1, 2, 3, padding=1, bias=False))
    clip = _clip_with_delta_map()
    clip3 = torch.cat([clip, torch.zeros(1, 1, 1, 4, 4)], dim=1)  # T=3: the map turns off again
    report = ds.measure(gm, [clip, torch.cat([clip3, clip3])])
    (row,) = report.layers
    assert row.frames == 1 + 2 * 2
    assert row.effective_macs == 46 + 2 * (46 + 46)
    assert row.dense_macs == 200 * 5
    assert (row.nonzero, row.total) == (4 + 2 * 8, 16 * 5)


def test_op_fraction_over_two_layers():
    model = nn.Sequential(
        nn.ReLU(), nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)
    )
    gm = ds.convert(model, ds.DeltaConfig(threshold_init=0.3))
    clips = torch.randn(2, 4, 1, 4, 4)
    report = ds.measure(gm, [clips])
    a, b = report.layers
    assert (a.fan_out, b.fan_out) == (18.0, 3.0)
    # independent counts from the layers' own stats of a separate forward
    ds.VideoModel(gm)(clips)
    layers = dict(sparsity_layers(gm))
    assert a.nonzero == layers[a.name].stats.nonzero and a.total == layers[a.name].stats.total
    assert b.nonzero == layers[b.name].stats.nonzero and b.total == 2 * 3 * 32
    want = (18 * a.nonzero + 3 * b.nonzero) / (18 * a.total + 3 * b.total)
    assert report.op_fraction == pytest.approx(want)
    assert 0 < report.op_fraction < 1
    assert report.effective_macs_per_frame == pytest.approx(
        a.effective_macs / a.frames + b.effective_macs / b.frames
    )
    assert b.effective_macs == 3 * b.nonzero  # linear: out_features per nonzero


def test_delta_output_layer_is_counted_from_its_deltas():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(1, 2, 3, padding=1, bias=False))
    gm = ds.convert(model, ds.DeltaConfig(threshold_init=1.0, delta_output=True))
    (row,) = ds.measure(gm, [_clip_with_delta_map()]).layers
    assert (row.nonzero, row.total, row.effective_macs) == (4, 16, 46)


def test_plain_model_is_measured_spatially_on_frames_and_clips():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(1, 2, 3, padding=1, bias=False))
    frame = -torch.ones(1, 1, 4, 4)
    for i, j in POSITIONS:
        frame[0, 0, i, j] = 2.0
    report = ds.measure(model, [frame])
    assert report.mode == "spatial"
    (row,) = report.layers
    assert row.kind == "activation" and row.temporal_density is None
    assert (row.nonzero, row.total, row.spatial_density) == (4, 16, 0.25)
    assert (row.effective_macs, row.dense_macs, row.frames) == (46, 200, 1)
    assert not any(isinstance(m, ds.layers.SparsityLayer) for m in model.modules())

    clips = frame.expand(3, 2, 1, 4, 4).clone()  # (B=3, T=2): six frames
    (row,) = ds.measure(model, [clips]).layers
    assert (row.frames, row.nonzero, row.total, row.effective_macs) == (6, 24, 96, 6 * 46)
    video = ds.VideoModel(model)
    (row,) = ds.measure(video, [clips]).layers
    assert (row.frames, row.nonzero, row.effective_macs) == (6, 24, 6 * 46)


def test_l1_layers_count_activations():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(1, 2, 3, padding=1, bias=False))
    gm = ds.convert(model, ds.DeltaConfig(kind="l1"))
    report = ds.measure(gm, [_clip_with_delta_map()])
    (row,) = report.layers
    assert report.mode == "spatial" and row.kind == "l1"
    assert (row.nonzero, row.total, row.frames, row.effective_macs) == (4, 32, 2, 46)


def test_pairs_max_batches_hooks_and_mode():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    video = ds.convert(ds.VideoModel(model))
    video.train()
    clips = [torch.randn(2, 3, 1, 4, 4) for _ in range(3)]
    plain = ds.measure(video, clips[:2])
    pairs = ds.measure(video, [(c, torch.tensor([0, 1])) for c in clips], max_batches=2)
    assert pairs.to_dict() == plain.to_dict()
    assert pairs.layers[0].frames == 2 * 2 * 2
    assert video.training and all(m.training for m in video.modules())
    for m in video.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    with pytest.raises(TypeError, match="batch 0 is a str"):
        ds.measure(video, [("oops", 1)])


def test_measure_errors_on_a_model_without_activations():
    with pytest.raises(ValueError, match="no activation modules"):
        ds.measure(nn.Linear(3, 2), [torch.randn(2, 3)])


def test_report_dict_json_and_table(tmp_path):
    gm = _converted(nn.Conv2d(1, 2, 3, padding=1, bias=False))
    report = ds.measure(gm, [_clip_with_delta_map()])
    d = report.to_dict()
    assert set(d) == {
        "mode", "op_fraction", "op_reduction", "effective_macs_per_frame",
        "dense_macs_per_frame", "mac_fraction", "layers", "executed_fraction", "executed",
        "executed_error",
    }  # fmt: skip
    assert set(d["layers"][0]) == {
        "name", "kind", "shape", "fan_out", "nonzero", "total", "temporal_density",
        "spatial_density", "effective_macs", "dense_macs", "frames", "threshold", "density",
    }  # fmt: skip
    path = tmp_path / "r.json"
    text = report.to_json(path)
    assert json.loads(path.read_text()) == json.loads(text) == json.loads(json.dumps(d))
    assert json.loads(text)["layers"][0]["effective_macs"] == 46

    console = Console(record=True, width=160)
    console.print(report.table())
    out = console.export_text()
    assert "0_delta" in out and "1×4×4" in out and "12.5%" in out
    assert "25.0%" in out and "op_fraction 25.00%" in out and "46" in out
    report.print(console)
    assert "Sparsity report (temporal)" in console.export_text()


class Mixed(nn.Module):
    """The net of test_convert.py: functional relu, residual add, concat, pools, BN, dropout."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_a, self.act1 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.conv_b, self.act2 = nn.Conv2d(4, 6, 1), nn.ReLU6()
        self.conv_c, self.bn1, self.act3 = nn.Conv2d(4, 2, 3, 2, 1), nn.BatchNorm2d(2), nn.ReLU()
        self.pool, self.avg, self.drop = nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Dropout(0.1)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        h = torch.relu(self.bn0(self.conv0(x)))
        r = self.act1(self.conv_a(h))
        u = self.act2(self.conv_b(h + r))
        w = self.act3(self.bn1(self.conv_c(h)))
        c = self.avg(torch.cat([self.pool(u), w], dim=1))
        return self.fc(self.drop(torch.flatten(c, 1)))


def test_dense_macs_through_residual_concat_and_pools():
    gm = ds.convert(Mixed().eval())
    static = torch.randn(1, 1, 3, 8, 8).expand(2, 3, 3, 8, 8).clone()
    report = ds.measure(gm, [static])
    # per delta frame, by hand (8x8 maps, padding 1):
    #   relu: conv_a 3x3 s1 4->4: 22^2*4*4 = 7744; (+) conv_b 1x1 4->6: 64*4*6 = 1536;
    #         conv_c 3x3 s2 4->2: rows covered [1,2,1,2,1,2,1,1] -> 11^2*4*2 = 968
    #   act1: (+) conv_b = 1536;  act2: maxpool, cat, avgpool -> 6*2*2 inputs * 5 = 120
    #   act3: cat, avgpool -> 2*2*2 * 5 = 40
    dense = {r.name: r.dense_macs / r.frames for r in report.layers}
    assert dense == {"relu_delta": 10248, "act1_delta": 1536, "act2_delta": 120, "act3_delta": 40}
    assert all(r.effective_macs == 0 and r.nonzero == 0 for r in report.layers)  # static clips
    moving = ds.measure(gm, [torch.randn(2, 3, 3, 8, 8)])
    for r in moving.layers:
        assert 0 < r.effective_macs <= r.dense_macs  # pooling may saturate
