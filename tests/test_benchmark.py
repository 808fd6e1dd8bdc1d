"""run_bench on a tiny configuration and the tables that print it."""

from __future__ import annotations

import json

import pytest
import torch

import deltasparse as ds
from deltasparse.benchmark import run_bench
from deltasparse.data.streams import synthetic_stream
from deltasparse.printing import StreamProgress, bench_table, stats_table


def test_run_bench_tiny_and_tables():
    res = run_bench(resolutions=((32, 48),), threads=(1,), densities=(0.5, 1.0), frames=2)
    assert len(res["rows"]) == 2
    for r in res["rows"]:
        assert r["dense_ms"] > 0 and r["delta_ms"] > 0
        assert r["ideal_speedup"] >= 1.0 and 0 < r["density"] <= 1.0
        assert r["ratio"] == pytest.approx(r["achieved_speedup"] / r["ideal_speedup"])
    json.dumps(res)
    assert bench_table(res).row_count == 2
    eng = ds.DeltaEngine(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.ReLU()).eval())
    for f in synthetic_stream(3, (1, 3, 8, 8)):
        eng.step(f)
    assert stats_table(eng.stats).row_count == len(eng.stats.layers)
    assert stats_table(eng.stats.to_dict(), top=2).row_count == 2
    with StreamProgress(total=1) as p:
        p({"time_ms": 1.0, "density": 0.5})
