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
    assert set(summary["runs"]) == {"baseline", "l1", "delta", "calibrated"}
    evals = {p: json.loads((out / p / "eval.json").read_text()) for p in summary["runs"]}
    for phase, run in summary["runs"].items():
        ev = evals[phase]
        # the summary reports what each phase's own evaluation measured ...
        assert run["accuracy"] == ev["accuracy"] and 0.0 <= run["accuracy"] <= 1.0
        # ... and that op fraction is the paper's formula over the layers' raw counts
        assert run["op_fraction"] == pytest.approx(_op_fraction(ev), rel=1e-9)
        assert 0.0 < run["op_fraction"] <= 1.0
        kind = {"baseline": "activation", "calibrated": "delta"}.get(phase, phase)
        assert {r["kind"] for r in ev["sparsity"]["layers"]} == {kind}
    # the engine stage of every gated run: measured by the engine, predicted by measure()
    for phase in ("delta", "calibrated"):
        e = summary["runs"][phase]["engine"]
        full = json.loads((out / phase / "engine.json").read_text())
        assert e["executed_density"] == full["executed_density"]
        assert 0 < e["executed_density"] <= 1 and e["agreement"] >= 0.99
        assert e["prediction_error"] == pytest.approx(
            abs(e["predicted_density"] - e["executed_density"]) / e["executed_density"])
        assert e["prediction_error"] <= 0.05
        assert e["speedup"] == pytest.approx(e["dense_ms_per_frame"] / e["delta_ms_per_frame"])
        assert full["density_over_time"][0] == 1.0  # the first frame of a stream is dense
        # the engine's accuracy under eval's protocol: the gated model's own accuracy
        assert e["accuracy"] == pytest.approx(summary["runs"][phase]["accuracy"], abs=0.05)
    checks = summary["acceptance"]["checks"]
    assert checks["calibrated run present"] and summary["acceptance"]["all"] == all(
        checks.values())
    cal = evals["calibrated"]["calibration"]
    assert cal["target"] == {"agreement": 0.95} and len(cal["history"]) > 3
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


def _runs(prediction_error, calibrated_engine):
    engine = {"executed_density": 0.15, "speedup": 3.5, "agreement": 0.995,
              "prediction_error": prediction_error}  # fmt: skip
    runs = {"l1": {"op_fraction": 0.4, "accuracy": 0.80},
            "delta": {"op_fraction": 0.1, "accuracy": 0.79, "engine": engine}}  # fmt: skip
    if calibrated_engine is not None:
        runs["calibrated"] = {"op_fraction": 0.2, "accuracy": 0.78, "engine": calibrated_engine}
    return runs


def test_acceptance_checks_fail_on_missing_figures():
    """A check whose figure is missing did not hold (it passed before: no prediction counted
    as a perfect one, and the calibrated run always looked present)."""
    from deltasparse.demo import _verdict

    ok = _verdict(_runs(0.01, {"executed_density": 0.3}))["acceptance"]
    assert ok["all"]
    missing = _verdict(_runs(None, {"executed_density": None}))["acceptance"]["checks"]
    assert not missing["|predicted - executed| / executed <= 0.05"]
    assert not missing["calibrated run present"]
    assert not _verdict(_runs(0.01, None))["acceptance"]["checks"]["calibrated run present"]


@pytest.mark.slow
def test_vit_demo_quick_trains_token_gates_and_streams_them(tmp_path):
    """The transformer recipe: baseline -> delta with token gates, the delta model's held-out
    videos through the token engine; what measure() counted is what the engine executed."""
    out = tmp_path / "vit"
    assert main(["demo", "--quick", "--model", "vit_tiny", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "vit_tiny" and set(summary["runs"]) == {"baseline", "delta"}
    ev = json.loads((out / "delta" / "eval.json").read_text())
    assert {r["kind"] for r in ev["sparsity"]["layers"]} == {"token"}
    assert summary["runs"]["delta"]["op_fraction"] == pytest.approx(_op_fraction(ev), rel=1e-9)
    ops = ev["sparsity"]["executed"]["ops"]
    assert {"qkv", "qk", "av", "proj", "mlp", "patch_embed"} <= set(ops)
    e = summary["runs"]["delta"]["engine"]
    assert 0 < e["executed_density"] < 1 and e["prediction_error"] <= 0.05
    assert e["agreement"] >= 0.95
    v = summary["delta_vs_baseline"]
    assert v["executed_reduction"] == pytest.approx(1 / e["executed_density"])
    checks = summary["acceptance"]["checks"]
    assert summary["acceptance"]["all"] == all(checks.values())
    assert (out / "report" / "report.html").is_file()


def test_demo_refuses_a_model_without_a_recipe(capsys):
    with pytest.raises(SystemExit):  # argparse: the choices are the recipes
        main(["demo", "--quick", "--model", "mobilenet_v1", "--out", "x"])
    assert "vit_tiny" in capsys.readouterr().err
    from deltasparse.demo import run_demo

    with pytest.raises(ValueError, match="transformer recipe"):
        run_demo("x", quick=True, model="mobilenet_v1")
