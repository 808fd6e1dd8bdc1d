"""``engine.stats``: strict-JSON ``to_dict()`` (no Infinity / NaN) with the right numbers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from deltasparse.data.streams import synthetic_stream
from deltasparse.engine import DeltaEngine, EngineStats


def _strict(d: dict) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(json.dumps(d, allow_nan=False), parse_constant=refuse)


def test_to_dict_is_strict_json_before_any_frame_and_after_reset():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    eng = DeltaEngine(net, "torch")
    d = _strict(eng.stats.to_dict())
    assert d["frames"] == 0 and d["dense_macs"] == 0
    assert d["ideal_speedup"] is None and d["density"] is None and d["delta_density"] is None
    assert eng.stats.ideal_speedup == float("inf")  # the property itself stays a float
    frames = list(synthetic_stream(3, (1, 3, 8, 8), seed=0))
    for f in frames:
        eng.step(f)
    d = _strict(eng.stats.to_dict())
    macs = 64 * (27 * 4 + 4 * 2)  # per frame: 3x3x3 -> 4 and 1x1 4 -> 2 at every pixel
    assert d["dense_macs"] == 3 * macs
    assert d["ideal_speedup"] == pytest.approx(3 * macs / d["effective_macs"])
    assert d["density"] == pytest.approx(d["effective_macs"] / (3 * macs))
    eng.reset()
    d = _strict(eng.stats.to_dict())
    assert d["frames"] == 0 and d["ideal_speedup"] is None and d["layers"] == []


def test_to_dict_of_hand_made_stats_with_zero_work():
    st = EngineStats(frames=2, dense_macs=10, effective_macs=0, delta_macs=0.0, time_s=0.0,
                     state_bytes=0, table_bytes=0, dense_activation_bytes=0, backend="torch")  # fmt: skip
    d = _strict(st.to_dict())
    assert d["ideal_speedup"] is None and d["density"] == 0.0 and d["fallbacks"] == []
    assert torch.isinf(torch.tensor(st.ideal_speedup))
