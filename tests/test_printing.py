"""The CLI's tables and lines (printing.py): 80 columns, layer names that stay apart, the
stream verdict, one fps figure."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from torch import nn

import deltasparse as ds
from deltasparse.data.streams import synthetic_stream
from deltasparse.printing import (
    StreamProgress,
    print_stream,
    short_name,
    stats_table,
    stream_summary,
)
from deltasparse.stream import verify_summary


def _render(renderable, width: int = 80) -> str:
    console = Console(width=width, record=True)
    console.print(renderable)
    return console.export_text()


def test_short_name_keeps_the_tail():
    assert short_name("features.1.0", 15) == "features.1.0"
    assert short_name("features.12.1.0", 12) == "…12.1.0"
    assert short_name("backbone.layer4.1.conv2", 16) == "…layer4.1.conv2"
    assert short_name("a_very_long_single_name", 8) == "…le_name"
    for name, width in [("features.12.1.0", 12), ("x" * 40, 10), ("a.b" * 9, 9)]:
        assert len(short_name(name, width)) <= width


def test_stats_table_fits_80_columns_and_names_every_layer():
    m = ds.models.mobilenet_v1(num_classes=5, width_mult=0.25)
    gm = ds.convert(m, example_input=torch.randn(1, 3, 32, 32)).eval()
    eng = ds.DeltaEngine(gm)
    for f in synthetic_stream(3, (1, 3, 32, 32)):
        eng.step(f)
    for stats in (eng.stats, eng.stats.to_dict()):
        text = _render(stats_table(stats))
        assert max(len(line) for line in text.splitlines()) <= 80
        for layer in eng.stats.layers:  # full names (<= 24 characters) are printed whole
            assert f" {layer['name']} " in text
    assert _render(stats_table(eng.stats, top=2)).count("features.") == 2
    eng.reset()
    assert "ideal speedup -x" in _render(stats_table(eng.stats.to_dict()))  # no inf


def test_stats_table_shows_fallbacks():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus()).eval()
    with pytest.warns(ds.engine.stats.FallbackWarning):
        eng = ds.DeltaEngine(net, "torch", fallback="dense")
    eng.step(torch.randn(1, 3, 8, 8))
    assert "fallback: module '1' (Softplus)" in _render(stats_table(eng.stats.to_dict()), 200)


def test_stream_progress_shows_the_results_fps():
    times = [5.0] * 20 + [45.0] * 5  # the bar used to show the last 20 frames only
    with StreamProgress(total=len(times), console=Console(width=80, record=True)) as bar:
        for t in times:
            bar({"time_ms": t, "density": 0.5})
    assert bar.fps == pytest.approx(1e3 * 25 / 325)


def _result(passed: bool) -> dict:
    checks = [{"frame": 0, "rel_err": 2e-7, "max_abs_err": 1e-6, "top1_match": True},
              {"frame": 4, "rel_err": 3e-7 if passed else 3e-3, "max_abs_err": 2e-6,
               "top1_match": passed}]  # fmt: skip
    eng = ds.DeltaEngine(nn.Sequential(nn.Conv2d(3, 2, 1)).eval())
    eng.step(torch.randn(1, 3, 4, 4))
    return {
        "frames": 8, "height": 4, "width": 4, "device": "cpu", "backend": "torch",
        "engine_fps": 123.4, "density": 0.25, "stats": eng.stats.to_dict(),
        "per_frame": [{"pred": 1, "label": "walk"}] * 6 + [{"pred": 0, "label": "run"}] * 2,
        "verify": verify_summary(checks, 4, 1e-4),
    }  # fmt: skip


def test_stream_summary_gives_the_verdict():
    ok = stream_summary(_result(True))
    assert ok[0].startswith("8 frames 4x4 on cpu (torch): 123.4 engine fps")
    assert ok[1] == "predicted: walk (6 frames), run (2 frames)"
    assert ok[2] == ("verify PASS: max relative error 3.00e-07 <= tolerance 1e-04 (frame 4; 2 "
                     "frames checked, every 4); top-1 agreement 100.0% (2/2)")  # fmt: skip
    bad = stream_summary(_result(False))[2]
    assert bad.startswith("verify FAIL: max relative error 3.00e-03 > tolerance 1e-04")
    assert "1 of 2 frames over" in bad and "top-1 agreement 50.0% (1/2)" in bad
    console = Console(width=200, record=True)
    print_stream(_result(False), console=console)
    out = console.export_text().rstrip().splitlines()
    assert "DeltaEngine stats" in out[0] and out[-1] == bad  # the verdict comes last
