"""The README's main job, in its quick form (slow: CI runs it in the slow step)."""

from __future__ import annotations

import json

import pytest

from deltasparse.cli import main


def _op_fraction(eval_json: dict) -> float:
    """DESIGN §1's op_avg from the raw per-layer counts: sum fan_out * nonzero / sum fan_out *
    total (independent of how summary.json or eval.json computed their own figures)."""
    layers = eval_json["sparsity"]["layers"]
    num = sum(r["fan_out"] * r["nonzero"] for r in layers)
    den = sum(r["fan_out"] * r["total"] for r in layers)
    return num / den


@pytest.mark.slow
def test_demo_quick_writes_summary_and_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"baseline", "l1", "delta"}
    evals = {p: json.loads((out / p / "eval.json").read_text()) for p in summary["runs"]}
    for phase, run in summary["runs"].items():
        ev = evals[phase]
        # the summary reports what each phase's own evaluation measured ...
        assert run["accuracy"] == ev["accuracy"] and 0.0 <= run["accuracy"] <= 1.0
        # ... and that op fraction is the paper's formula over the layers' raw counts
        assert run["op_fraction"] == pytest.approx(_op_fraction(ev), rel=1e-9)
        assert 0.0 < run["op_fraction"] <= 1.0
        assert {r["kind"] for r in ev["sparsity"]["layers"]} == (
            {"activation"} if phase == "baseline" else {phase})  # fmt: skip
    v = summary["delta_vs_l1"]
    reduction = _op_fraction(evals["l1"]) / _op_fraction(evals["delta"])
    assert v["op_reduction_delta_vs_l1"] == pytest.approx(reduction, rel=1e-9)
    drop = 100 * (evals["l1"]["accuracy"] - evals["delta"]["accuracy"])
    assert v["accuracy_drop_points"] == pytest.approx(drop, abs=1e-9)
    assert v["meets_target"] == (reduction >= v["target_op_reduction"]
                                 and drop <= v["max_accuracy_drop_points"])  # fmt: skip
    report = (out / "report" / "report.html").read_text()
    assert all(phase in report for phase in summary["runs"])
    # the real loader read real .mp4 files with UCF101 split files
    assert (out / "data" / "ucfTrainTestlist" / "trainlist01.txt").is_file()
    assert any((out / "data").rglob("*.mp4"))
    # a second run resumes every phase instead of training again: nothing is rewritten
    stamps = {p: (out / p / "model.pt").stat().st_mtime_ns for p in summary["runs"]}
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert {p: (out / p / "model.pt").stat().st_mtime_ns for p in summary["runs"]} == stamps
    again = json.loads((out / "summary.json").read_text())
    assert again["runs"] == summary["runs"]
