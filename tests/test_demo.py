"""The README's main job, in its quick form (slow: CI runs it in the slow step)."""

from __future__ import annotations

import json

import pytest

from deltasparse.cli import main


@pytest.mark.slow
def test_demo_quick_writes_summary_and_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"baseline", "l1", "delta"}
    for run in summary["runs"].values():
        assert 0.0 <= run["accuracy"] <= 1.0
        assert 0.0 < run["op_fraction"] <= 1.0
    v = summary["delta_vs_l1"]
    assert v["op_reduction_delta_vs_l1"] == pytest.approx(
        summary["runs"]["l1"]["op_fraction"] / summary["runs"]["delta"]["op_fraction"])
    assert (out / "report" / "report.html").is_file()
    # the real loader read real .mp4 files with UCF101 split files
    assert (out / "data" / "ucfTrainTestlist" / "trainlist01.txt").is_file()
    assert any((out / "data").rglob("*.mp4"))
    # a second run resumes every phase instead of training again
    assert main(["demo", "--quick", "--out", str(out)]) == 0
