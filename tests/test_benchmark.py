"""run_bench: the achieved density is the calibrated one and near the target where the stream
can reach it; the headline speedup is against the fused dense baseline."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from rich.console import Console

from deltasparse.benchmark import _calibrate, build_bench_model, run_bench
from deltasparse.printing import bench_markdown, bench_table


def _render(table, width: int = 80) -> str:
    console = Console(width=width, record=True)
    console.print(table)
    return console.export_text()


@pytest.fixture(scope="module")
def bench():
    caplog_records = []
    handler = logging.Handler()
    handler.emit = caplog_records.append
    logging.getLogger("deltasparse.benchmark").addHandler(handler)
    try:
        res = run_bench(models=("convnet", "mobilenet_v1"), resolutions=((96, 128),),
                        threads=(1,), densities=(0.1, 0.3, 1.0), frames=3)  # fmt: skip
    finally:
        logging.getLogger("deltasparse.benchmark").removeHandler(handler)
    return res, [r.getMessage() for r in caplog_records]


def test_achieved_density_is_the_calibrated_one_and_tracks_the_target(bench):
    res, _ = bench
    rows = {(r["model"], r["target_density"]): r for r in res["rows"]}
    assert len(rows) == 6
    for (_, target), r in rows.items():
        if target < 1.0:
            # measured on the very frames that are timed: equal, not just close
            assert r["density"] == r["calibrated_density"]
        assert r["dense_ms"] > 0 and r["delta_ms"] > 0 and r["fused_dense_ms"] > 0
        assert r["frames_timed"] == 3 and r["top1_agreement"] == 1.0
    # the small convnet can reach both targets at 96x128
    for target in (0.1, 0.3):
        assert rows["convnet", target]["density"] == pytest.approx(target, rel=0.15)
    assert rows["convnet", 1.0]["density"] > 0.97
    assert rows["convnet", 0.1]["object_size"] < rows["convnet", 0.3]["object_size"]


def test_out_of_reach_targets_are_reported(bench):
    res, messages = bench
    low = [r for r in res["rows"] if r["model"] == "mobilenet_v1" and r["target_density"] < 1]
    # at 96x128 one moving object reaches most of MobileNet's deep layers: >= ~50% density
    assert all(r["density"] > 0.4 for r in low)
    assert any("mobilenet_v1 at 96x128: density target 10% is out of reach" in m
               for m in messages)  # fmt: skip
    assert not any("convnet" in m for m in messages)


def test_calibration_bisects_towards_the_target():
    model = build_bench_model("convnet")
    size_lo, d_lo = _calibrate(model, (96, 128), 0.1, frames=3, batch=1, seed=2)
    size_hi, d_hi = _calibrate(model, (96, 128), 0.3, frames=3, batch=1, seed=2)
    assert size_lo < size_hi and d_lo < d_hi
    assert d_lo == pytest.approx(0.1, rel=0.15) and d_hi == pytest.approx(0.3, rel=0.15)
    # a target below what the smallest objects give returns that end at once
    assert _calibrate(model, (96, 128), 1e-4, frames=3, batch=1, seed=2)[0] == pytest.approx(0.004)


def test_table_headline_is_against_the_fused_dense_baseline(bench):
    res, _ = bench
    json.dumps(res, allow_nan=False)
    text = _render(bench_table(res))
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    lines = [ln for ln in text.splitlines() if ln.strip().startswith(("convnet", "mobilenet"))]
    assert len(lines) == 6
    for line, r in zip(lines, res["rows"], strict=True):
        cells = line.split()
        assert cells[:3] == [r["model"], "96x128", "1"]
        assert cells[3] == f"{r['target_density']:.0%}"  # target next to achieved
        assert cells[7] == f"{r['speedup_vs_fused_dense']:.2f}x"  # the headline column
        assert cells[8] == f"{r['achieved_speedup']:.1f}x"  # vs the eager model: secondary
    header = text.splitlines()[1] + text.splitlines()[2]
    assert "speedup" in header and "fused" in header and "eager" in header
    md = bench_markdown(res).splitlines()
    assert "| speedup vs fused dense |" in md[0] and len(md) == 2 + 6
    r = res["rows"][0]
    assert f"| {r['speedup_vs_fused_dense']:.2f}x |" in md[2]


def test_timed_returns_the_output_and_the_host_time_on_cpu():
    from deltasparse.benchmark import _timed

    x = torch.arange(6.0)
    y, t = _timed(lambda f: f * 2, x, x.device)
    assert torch.equal(y, x * 2) and 0 < t < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_timed_waits_for_the_gpu():
    """A kernel that spins ~20 ms on the GPU returns at once on the host; the CUDA-event
    time sees it (a host timer around the launch would report microseconds)."""
    from deltasparse.benchmark import _timed

    x = torch.ones(4, device="cuda")
    rate = torch.cuda.get_device_properties(0).clock_rate * 1e3  # kHz -> Hz
    _, t = _timed(lambda f: torch.cuda._sleep(int(0.02 * rate)) or f, x, x.device)
    assert t > 0.01


def test_gpu_dense_baselines_refuse_cpu_frames():
    from deltasparse.benchmark import gpu_dense_baselines

    with pytest.raises(ValueError, match="CUDA"):
        gpu_dense_baselines(build_bench_model("convnet"), [torch.rand(1, 3, 32, 32)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bench_rows_carry_the_strongest_dense_baselines():
    """On a GPU each row times the gate-free, BN-folded model in 8 variants (fp32 / bf16,
    NCHW / channels-last, eager / CUDA graph) and names the fastest per dtype."""
    res = run_bench(models=("mobilenet_v1",), resolutions=((128, 160),), threads=(1,),
                    densities=(0.3, 1.0), frames=4, device="cuda")  # fmt: skip
    for row in res["rows"]:
        base = row["dense_baselines_ms"]
        assert len(base) == 10 and all(v > 0 for v in base.values())  # 8 + 2 ieee32 graphs
        assert row["best_dense_bf16_ms"] == min(v for k, v in base.items() if "bfloat16" in k)
        assert row["speedup_vs_best_dense_fp32"] == pytest.approx(
            row["best_dense_fp32_ms"] / row["delta_ms"])


def test_bench_runs_the_half_precision_engine():
    """--dtype bfloat16: the model, the frames and the engine in bfloat16, timed against the
    dense bfloat16 model; the rows say so."""
    from deltasparse.cli import build_parser

    res = run_bench(models=("convnet",), resolutions=((64, 96),), threads=(1,),
                    densities=(0.3, 1.0), frames=2, dtype="bfloat16")  # fmt: skip
    assert res["dtype"] == "bfloat16"
    for r in res["rows"]:
        assert r["dtype"] == "bfloat16" and r["delta_ms"] > 0 and r["fused_dense_ms"] > 0
        assert 0 < r["density"] <= 1.0
        assert r["top1_agreement"] == 1.0
    assert build_parser().parse_args(["bench", "--dtype", "float16"]).dtype == "float16"
    with pytest.raises(ValueError, match="dtype"):
        run_bench(models=("convnet",), dtype="int8")
