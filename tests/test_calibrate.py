"""Calibration without training: the search meets its target, records itself, and a calibrated
run folder is a run like the others (load_model, eval, engine)."""

from __future__ import annotations

import json

import pytest
import torch

import deltasparse as ds
from deltasparse.calibrate import calibrate, parse_target
from deltasparse.checkpoint import load_model
from deltasparse.cli import main
from deltasparse.data import SyntheticActions


@pytest.fixture(scope="module")
def clips_and_model():
    torch.manual_seed(0)
    data = SyntheticActions(num_videos=12, num_classes=4, frames=6, size=32, clip_len=6,
                            split="test")  # fmt: skip
    clips = torch.stack([data[i][0] for i in range(12)])
    m = ds.models.create("convnet", num_classes=4, width_mult=0.5)
    for mod in m.modules():  # realistic activation scales for random weights
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        m(clips.flatten(0, 1))
    return [clips[:6], clips[6:]], m.eval()


@pytest.mark.parametrize("target", ["agreement=0.9", "executed_density=0.7",
                                    "max_logit_error=0.3"])
def test_calibration_meets_its_target(clips_and_model, target):
    batches, model = clips_and_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    res = calibrate(model, batches, target=target, refine=False, iterations=6,
                    progress=seen.append)  # fmt: skip
    name, goal = parse_target(target)
    assert res.met
    v = res.achieved[name]
    assert v >= goal if name == "agreement" else v <= goal
    assert len(seen) == len(res.history) >= 7 and all(h["meets"] in (True, False) for h in seen)
    # the search moved towards the edge of the target: the step found is not the trivial one
    assert res.alpha > 1e-3 if name != "executed_density" else res.alpha < 8.0
    # the user's model is untouched; the calibrated copy holds the steps of the record
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    layers = dict(ds.layers.sparsity_layers(res.model))
    assert set(res.thresholds) == set(layers)
    for n, m in layers.items():
        assert m.gate == "pixel" and m.mode == "hysteresis"
        assert m.threshold.tolist() == pytest.approx(res.thresholds[n])
    json.loads(res.to_json())  # strict JSON (no NaN / Infinity)


def test_refinement_keeps_the_target_and_does_not_lose(clips_and_model):
    batches, model = clips_and_model
    plain = calibrate(model, batches, target="agreement=0.9", refine=False, iterations=6)
    refined = calibrate(model, batches, target="agreement=0.9", refine=True, iterations=6)
    assert refined.met and refined.achieved["agreement"] >= 0.9
    assert refined.achieved["executed_density"] <= plain.achieved["executed_density"] + 1e-12


def test_unreachable_target_is_reported_not_hidden(clips_and_model):
    batches, model = clips_and_model
    res = calibrate(model, batches, target="max_logit_error=1e-12", refine=False,
                    iterations=3)  # fmt: skip
    assert not res.met and res.achieved["max_logit_error"] > 1e-12
    assert len(res.history) == 1  # the smallest steps already miss: no search


@pytest.mark.parametrize("bad", ["agreement", "speed=2", "agreement=1.5", "max_logit_error=-1",
                                 "agreement=x"])
def test_bad_targets_are_clear_errors(bad):
    with pytest.raises(ValueError, match="target"):
        parse_target(bad)


def test_a_model_with_delta_layers_is_refused(clips_and_model):
    batches, model = clips_and_model
    gm = ds.convert(model, ds.DeltaConfig(), example_input=batches[0][:, 0])
    with pytest.raises(ValueError, match="already has delta layers"):
        calibrate(gm, batches)


def test_calibrate_cli_makes_a_run_folder(tmp_path):
    from deltasparse.train import TrainConfig, train

    base = dict(data="synthetic", synthetic_videos=24, synthetic_classes=3, synthetic_frames=6,
                resolution=32, model="convnet", width=0.5, batch_size=8, clip_len=3,
                eval_clip_len=3, progress=False, seed=0)  # fmt: skip
    train(TrainConfig(phase="baseline", out=str(tmp_path / "base"), epochs=1, **base))
    out = tmp_path / "cal"
    rc = main(["calibrate", "--checkpoint", str(tmp_path / "base" / "model.pt"), "--out",
               str(out), "--target", "agreement=0.8", "--clips", "12"])
    assert rc in (0, 3)  # 3: target not met (said so, not hidden)
    record = json.loads((out / "calibration.json").read_text())
    assert (rc == 0) == record["met"]
    model, cfg, _ = load_model(out / "model.pt")
    assert cfg.phase == "calibrated" and cfg.gate == "pixel" and cfg.input_gate
    thr = {n.split(".", 1)[1]: m.threshold.tolist()  # "frame_model.<name>"
           for n, m in ds.layers.sparsity_layers(model)}
    assert set(thr) == set(record["thresholds"])
    for n in thr:
        assert thr[n] == pytest.approx(record["thresholds"][n])
    ev = json.loads((out / "eval.json").read_text())
    assert 0 <= ev["accuracy"] <= 1 and ev["calibration"]["target"] == {"agreement": 0.8}
    # a calibrated run is not trained, and its folder is not overwritten without --force
    with pytest.raises(ValueError, match="made by `deltasparse calibrate`"):
        train(TrainConfig(phase="calibrated", out=str(tmp_path / "x"), epochs=1, **base))
    assert main(["calibrate", "--checkpoint", str(tmp_path / "base" / "model.pt"), "--out",
                 str(out)]) == 2
    # the baseline's own folder is never the calibrated run's, even with --force
    assert main(["calibrate", "--checkpoint", str(tmp_path / "base" / "model.pt"), "--out",
                 str(tmp_path / "base"), "--force"]) == 2
    assert load_model(tmp_path / "base" / "model.pt")[1].phase == "baseline"
    # --force replaces the run whole: no file of the old one survives next to the new model
    (out / "engine.json").write_text("{}")
    (out / "checkpoint.pt").write_bytes(b"stale")
    assert main(["calibrate", "--checkpoint", str(tmp_path / "base" / "model.pt"), "--out",
                 str(out), "--target", "agreement=0.8", "--clips", "12", "--force"]) in (0, 3)
    assert not (out / "engine.json").exists() and not (out / "checkpoint.pt").exists()
    assert (out / "model.pt").exists() and (out / "calibration.json").exists()


def test_refinement_cost_keeps_a_real_zero():
    from deltasparse.calibrate import _cost

    assert _cost({"executed_density": 0.0, "op_fraction": 0.3}) == 0.0
    assert _cost({"executed_density": None, "op_fraction": 0.3}) == 0.3
