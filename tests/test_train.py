"""Training phases, resume after a kill, DDP on CPU, and the eval CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
from pathlib import Path

import pytest
import torch

import deltasparse.train as train_mod
from deltasparse.cli import main
from deltasparse.layers import ActivationL1, DeltaActivation
from deltasparse.train import TrainConfig, build_teacher, distill_loss, load_model, train

TINY = dict(
    data="synthetic",
    synthetic_videos=16,
    synthetic_classes=4,
    synthetic_frames=6,
    resolution=32,
    width=0.25,
    clip_len=3,
    batch_size=8,
    epochs=2,
    progress=False,
)


def _cfg(tmp_path: Path, phase: str, **kw) -> TrainConfig:
    return TrainConfig(phase=phase, out=str(tmp_path / phase), **{**TINY, **kw})


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """baseline → l1 → delta, one short phase each."""
    root = tmp_path_factory.mktemp("recipe")
    results = {"baseline": train(_cfg(root, "baseline"))}
    results["l1"] = train(_cfg(root, "l1", init_from=str(root / "baseline" / "model.pt"),
                               epochs=1, sparsity_weight=1e-3))
    results["delta"] = train(_cfg(root, "delta", init_from=str(root / "l1" / "model.pt"),
                                  epochs=1, clip_len=2, eval_clip_len=4, sparsity_weight=1e-2))
    return root, results


def test_recipe_phases_write_runs(recipe):
    root, results = recipe
    for phase in results:
        run = root / phase
        for f in ("config.json", "metrics.json", "metrics.csv", "eval.json", "model.pt",
                  "checkpoint.pt"):
            assert (run / f).is_file(), f"{phase}: {f} missing"
        ev = json.loads((run / "eval.json").read_text())
        assert ev["phase"] == phase
        assert 0.0 <= ev["accuracy"] <= 1.0 and 0.0 <= ev["clip_accuracy"] <= 1.0
        assert 0.0 < ev["op_fraction"] <= 1.0
        assert ev["sparsity"]["layers"], "per-layer rows expected"
        hist = json.loads((run / "metrics.json").read_text())["epochs"]
        assert [h["epoch"] for h in hist] == list(range(len(hist)))
    # the delta run counts temporal deltas, the others activations
    assert results["delta"]["sparsity"]["mode"] == "temporal"
    assert results["l1"]["sparsity"]["mode"] == "spatial"
    assert results["delta"]["clip_len"] == 4


def test_phases_insert_the_right_layers_and_inherit_weights(recipe):
    root, _ = recipe
    base, _, _ = load_model(root / "baseline" / "model.pt")
    l1, _, _ = load_model(root / "l1" / "model.pt")
    delta, cfg, _ = load_model(root / "delta" / "model.pt")
    assert not any(isinstance(m, (ActivationL1, DeltaActivation)) for m in base.modules())
    assert sum(isinstance(m, ActivationL1) for m in l1.modules()) == 27
    deltas = [m for m in delta.modules() if isinstance(m, DeltaActivation)]
    assert len(deltas) == 27 and all(m.theta is not None for m in deltas)
    assert cfg.phase == "delta" and cfg.clip_len == 2


def test_resume_after_kill_gives_identical_weights(tmp_path, monkeypatch):
    full = _cfg(tmp_path / "a", "delta_scratch", epochs=3)
    train(full)
    ref = torch.load(tmp_path / "a" / "delta_scratch" / "model.pt", weights_only=False)["model"]

    killed = _cfg(tmp_path / "b", "delta_scratch", epochs=3)
    real_save = train_mod.save_atomic
    calls = {"n": 0}

    def save_then_die(obj, path):
        real_save(obj, path)
        if Path(path).name == "checkpoint.pt":
            calls["n"] += 1
            if calls["n"] == 2:  # killed right after the second epoch's checkpoint
                raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(killed)
    monkeypatch.setattr(train_mod, "save_atomic", real_save)
    ckpt = torch.load(tmp_path / "b" / "delta_scratch" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1
    train(killed, resume=True)
    got = torch.load(tmp_path / "b" / "delta_scratch" / "model.pt", weights_only=False)["model"]
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after resume"
    hist = json.loads((tmp_path / "b" / "delta_scratch" / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]


def test_init_from_mismatch_is_a_clear_error(recipe, tmp_path):
    root, _ = recipe
    cfg = _cfg(tmp_path, "l1", init_from=str(root / "baseline" / "model.pt"), width=0.5)
    with pytest.raises(ValueError, match="does not match this model"):
        train(cfg)


def test_bad_config_values():
    with pytest.raises(ValueError, match="phase"):
        TrainConfig(phase="nope")
    with pytest.raises(ValueError, match="clip_len >= 2"):
        TrainConfig(phase="delta", clip_len=1)


def test_eval_cli_writes_json(recipe, tmp_path, capsys):
    root, _ = recipe
    out = tmp_path / "ev.json"
    rc = main(["eval", "--checkpoint", str(root / "delta" / "model.pt"), "--clip-len", "4",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    ev = json.loads(out.read_text())
    for key in ("clip_accuracy", "video_accuracy", "op_fraction", "op_reduction", "sparsity",
                "effective_macs_per_frame", "dense_macs_per_frame"):
        assert key in ev
    assert ev["sparsity"]["mode"] == "temporal"
    assert len(ev["sparsity"]["layers"]) == 27


def test_eval_cli_missing_checkpoint(tmp_path, capsys):
    rc = main(["eval", "--checkpoint", str(tmp_path / "nope.pt")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = TrainConfig(phase="delta_scratch", out=out, device="cpu", **{**TINY, "epochs": 1})
    _, model = train(cfg, return_model=True)
    torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ev = json.loads((tmp_path / "ddp" / "eval.json").read_text())
    assert 0.0 < ev["op_fraction"] <= 1.0
    hist = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["epochs"]
    assert len(hist) == 1
    # DDP all-reduces the gradients: both ranks end with the same weights
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    for k in r0:
        if r0[k].is_floating_point() and "running" not in k:
            assert torch.allclose(r0[k], r1[k], atol=1e-6), k


def test_report_cli_on_recipe_runs(recipe, tmp_path):
    root, results = recipe
    out = tmp_path / "rep"
    rc = main(["report", str(root / "baseline"), str(root / "l1"), str(root / "delta"),
               "--out", str(out)])
    assert rc == 0
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html
    rep = json.loads((out / "report.json").read_text())
    rows = {r["phase"]: r for r in rep["runs"]}
    assert set(rows) == {"baseline", "l1", "delta"}
    for phase in rows:  # the report shows what each run's own evaluation measured
        assert rows[phase]["op_fraction"] == pytest.approx(results[phase]["op_fraction"],
                                                           rel=1e-12)
        assert rows[phase]["accuracy"] == pytest.approx(results[phase]["accuracy"], rel=1e-12)


def test_stream_cli_on_mp4_matches_dense(recipe, tmp_path):
    from deltasparse.data.encode import write_video
    from deltasparse.data.synthetic import SyntheticActions

    root, _ = recipe
    video = tmp_path / "clip.mp4"
    write_video(video, SyntheticActions(num_videos=1, frames=12, size=(32, 32)).render(0))
    out = tmp_path / "stream.json"
    rc = main(["stream", "--checkpoint", str(root / "delta" / "model.pt"), "--video", str(video),
               "--verify-every", "1", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert len(res["per_frame"]) == 12
    assert all("pred" in f for f in res["per_frame"])
    assert res["max_abs_err"] < 1e-4  # every frame checked against the dense model
    assert res["per_frame"][0]["density"] == 1.0  # the first frame is dense


def test_bench_cli_with_trained_checkpoint(recipe, tmp_path):
    root, _ = recipe
    out = tmp_path / "bench.json"
    rc = main(["bench", "--models", "mobilenet_v1", "--resolutions", "32x32", "--threads", "1",
               "--densities", "1.0", "--frames", "2", "--checkpoint",
               str(root / "delta" / "model.pt"), "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1
    r = rows[0]
    assert r["dense_ms"] > 0 and r["delta_ms"] > 0
    assert r["achieved_speedup"] == pytest.approx(r["dense_ms"] / r["delta_ms"], rel=1e-6)


# -- configuration checked up front ------------------------------------------------------------
@pytest.mark.parametrize("field, value, expected", [
    ("resolution", 0, "--resolution) must be an integer >= 8"),
    ("resolution", -5, "--resolution) must be an integer >= 8"),
    ("epochs", 0, "--epochs) must be an integer >= 1"),
    ("batch_size", 0, "--batch-size) must be an integer >= 1"),
    ("lr", 0.0, "--lr) must be a finite number > 0"),
    ("lr", float("nan"), "--lr) must be a finite number > 0"),
    ("frame_stride", 0, "--frame-stride) must be an integer >= 1"),
    ("workers", -1, "--workers) must be an integer >= 0"),
    ("split", 0, "--split) must be an integer in 1..5"),
    ("split", 6, "--split) must be an integer in 1..5"),
    ("clip_len", 0, "--clip-len) must be an integer >= 1, got 0"),
    ("eval_clips_per_video", 0, "--eval-clips-per-video) must be an integer >= 1"),
    ("resize", 16, "--resize) must be unset or an integer >= 32 (the resolution"),
    ("momentum", 1.0, "--momentum) must be a number in [0, 1)"),
    ("weight_decay", -1e-4, "--weight-decay) must be a number >= 0"),
    ("threshold_init", 0.0, "--threshold-init) must be a finite number > 0"),
    ("seed", -1, "--seed) must be an integer >= 0"),
    ("synthetic_classes", 13, "--synthetic-classes) must be an integer in 1..12"),
    ("synthetic_videos", 3, "--synthetic-videos) must be an integer >= 4 (synthetic_classes"),
    ("model", "nope", "--model) must be one of convnet, convnet_pw, convnext_tiny, dsconvnet"),
    ("resolution", 33, "--resolution) must be an even integer >= 8 (the embedded videos"),
    ("layout", "ucf", "--layout) must be one of auto, ucf101, folder"),
    ("device", "gpu", "--device) must be one of auto, cpu, cuda"),
    ("distill", 1.5, "--distill) must be a number in [0, 1]"),
    ("distill_temperature", 0.0, "--distill-temperature) must be a finite number > 0"),
])
def test_config_fields_are_validated_up_front(field, value, expected):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{**TINY, field: value})
    msg = str(err.value)
    assert expected in msg
    assert f"got {value!r}" in msg and "; pass " in msg  # the value seen and the fix
    assert "\n" not in msg


def test_baseline_clip_len_0_is_not_blamed_on_delta_training():
    with pytest.raises(ValueError) as err:
        TrainConfig(phase="baseline", clip_len=0)
    assert "delta" not in str(err.value)
    with pytest.raises(ValueError, match="delta training needs clip_len >= 2"):
        TrainConfig(phase="delta_scratch", eval_clip_len=1)


def test_clip_longer_than_every_video_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "baseline", eval_clip_len=7)  # synthetic videos have 6 frames
    with pytest.raises(ValueError, match="pass --eval-clip-len 6 or less"):
        train(cfg)
    assert not (tmp_path / "baseline").exists()


# -- run folders: nothing written before the checks pass, nothing finished overwritten -------
def _fingerprint(run: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def test_finished_run_is_not_overwritten_without_force(tmp_path):
    cfg = _cfg(tmp_path, "baseline", epochs=1)
    train(cfg)
    run = tmp_path / "baseline"
    before = _fingerprint(run)
    with pytest.raises(FileExistsError, match="already holds a finished run.*pass --force"):
        train(cfg)
    assert _fingerprint(run) == before
    train(dataclasses.replace(cfg, seed=1), force=True)
    assert json.loads((run / "config.json").read_text())["seed"] == 1
    assert torch.load(run / "model.pt", weights_only=False)["config"]["seed"] == 1


def test_failed_start_leaves_the_run_folder_alone(tmp_path):
    cfg = _cfg(tmp_path, "baseline", epochs=1)
    train(cfg)
    run = tmp_path / "baseline"
    before = _fingerprint(run)
    empty = tmp_path / "empty"
    empty.mkdir()
    from deltasparse.data import DatasetError

    with pytest.raises(DatasetError, match="no class sub-folders"):
        train(dataclasses.replace(cfg, data=str(empty)), force=True)
    assert _fingerprint(run) == before  # config.json of the old run not rewritten
    with pytest.raises(DatasetError):
        train(_cfg(tmp_path / "new", "baseline", data=str(empty)))
    assert not (tmp_path / "new").exists()


def _unfinished(tmp_path: Path, monkeypatch, phase: str = "baseline", **kw) -> TrainConfig:
    """A run killed right after the checkpoint of its first epoch (of 2)."""
    cfg = _cfg(tmp_path, phase, **kw)
    real_save = train_mod.save_atomic

    def save_then_die(obj, path):
        real_save(obj, path)
        if Path(path).name == "checkpoint.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(train_mod, "save_atomic", real_save)
    return cfg


def test_unfinished_run_needs_resume_or_force(tmp_path, monkeypatch):
    cfg = _unfinished(tmp_path, monkeypatch)
    with pytest.raises(FileExistsError, match=r"unfinished run \(1 of 2 epochs done\); pass "
                                              "--resume to continue it, --force"):
        train(cfg)
    with pytest.raises(ValueError, match="--resume and --force contradict"):
        train(cfg, resume=True, force=True)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    cfg = _cfg(tmp_path, "baseline")
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*drop --resume"):
        train(cfg, resume=True)
    assert not (tmp_path / "baseline").exists()


@pytest.mark.parametrize("field, value", [("resolution", 48), ("lr", 1e-3), ("epochs", 3)])
def test_resume_refuses_changed_settings(tmp_path, monkeypatch, field, value):
    cfg = _unfinished(tmp_path, monkeypatch)
    config = (tmp_path / "baseline" / "config.json").read_bytes()
    with pytest.raises(ValueError) as err:
        train(dataclasses.replace(cfg, **{field: value}), resume=True)
    assert f"{field}: saved {getattr(cfg, field)!r}, given {value!r}" in str(err.value)
    assert (tmp_path / "baseline" / "config.json").read_bytes() == config


def test_resume_says_where_it_continues_and_allows_execution_settings(tmp_path, monkeypatch,
                                                                      caplog):
    from rich.console import Console

    cfg = _unfinished(tmp_path, monkeypatch)
    console = Console(file=io.StringIO(), width=200)
    with caplog.at_level("INFO", logger="deltasparse.train"):
        result = train(dataclasses.replace(cfg, workers=1, device="cpu"), resume=True,
                       console=console)
    line = "resumed " + str(tmp_path / "baseline" / "checkpoint.pt") + (
        " after epoch 1 of 2: continuing with epoch 2")
    assert line in console.file.getvalue()
    assert line in caplog.text
    assert 0.0 <= result["accuracy"] <= 1.0
    hist = json.loads((tmp_path / "baseline" / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in hist] == [0, 1]


# -- classes -----------------------------------------------------------------------------------
def test_checkpoints_store_the_class_names(recipe):
    root, _ = recipe
    want = ["MoveRight", "MoveLeft", "MoveDown", "MoveUp"]
    for name in ("model.pt", "checkpoint.pt"):
        ckpt = torch.load(root / "baseline" / name, weights_only=False)
        assert ckpt["class_names"] == want and ckpt["num_classes"] == 4


def test_init_from_a_model_of_other_classes_is_refused(recipe, tmp_path):
    root, _ = recipe
    cfg = _cfg(tmp_path, "l1", init_from=str(root / "baseline" / "model.pt"),
               synthetic_classes=3)
    with pytest.raises(ValueError, match=r"was trained on 4 classes \(MoveRight, .*but the "
                                         r"synthetic data has 3"):
        train(cfg)
    assert not (tmp_path / "l1").exists()


def test_data_summary_counts_videos_per_class(tmp_path):
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    train(_cfg(tmp_path, "baseline", epochs=1, synthetic_classes=3), console=console)
    text = console.file.getvalue()
    assert "synthetic videos (seed 0, 6 frames): 16 train and 4 test videos" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    assert rows["MoveRight"] == ["6", "2"] and rows["MoveLeft"] == ["5", "1"]
    assert rows["total"] == ["16", "4"]


def test_run_files_are_strict_json(tmp_path):
    """eval.json / summary.json are read by strict parsers: NaN and infinities (an op_reduction
    of a model that sends nothing) are written as null."""
    from deltasparse.checkpoint import write_json_atomic

    write_json_atomic({"op_reduction": float("inf"), "x": [float("nan"), 1.0]}, tmp_path / "a")
    text = (tmp_path / "a").read_text()
    assert json.loads(text) == {"op_reduction": None, "x": [None, 1.0]}
    assert "Infinity" not in text and "NaN" not in text


def test_distill_loss_is_the_soft_target_term():
    """T²·KL(teacher_T ‖ student_T), checked on a hand-sized case."""
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 1.0, 0.0]])
    T = 2.0
    p_t, p_s = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    kl = (p_t * (p_t.log() - p_s.log())).sum() * T * T
    torch.testing.assert_close(distill_loss(s, t, T), kl)
    torch.testing.assert_close(distill_loss(t, t, T), torch.tensor(0.0))


def test_distill_needs_a_teacher():
    with pytest.raises(ValueError, match=r"--distill\) 0.5 needs a teacher: the --init-from"):
        TrainConfig(**{**TINY, "phase": "delta", "distill": 0.5})


def test_distillation_trains_from_the_init_from_model(recipe, tmp_path):
    """The teacher is the --init-from model, frozen; it changes what is learned (pure soft
    targets give other weights than pure labels), its term is logged apart from the
    cross-entropy, and the teacher file is left as it was."""
    root, _ = recipe
    init = root / "l1" / "model.pt"
    before = init.read_bytes()
    kw = dict(init_from=str(init), epochs=1, clip_len=2, eval_clip_len=4, sparsity_weight=1e-2)
    teacher = build_teacher(_cfg(tmp_path, "delta", distill=0.5, **kw),
                            load_model(init)[2]["class_names"], torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert sum(isinstance(m, ActivationL1) for m in teacher.modules()) == 27  # the l1 phase's
    runs = {}
    for w in (0.0, 1.0):
        cfg = _cfg(tmp_path / str(w), "delta", distill=w, distill_temperature=3.0, **kw)
        train(cfg)
        hist = json.loads((Path(cfg.out) / "metrics.json").read_text())["epochs"]
        runs[w] = (load_model(Path(cfg.out) / "model.pt")[0].state_dict(), hist[0])
    assert runs[0.0][1]["train_distill_loss"] is None
    assert runs[1.0][1]["train_distill_loss"] > 0 and runs[1.0][1]["train_task_loss"] > 0
    weights0, weights1 = runs[0.0][0], runs[1.0][0]
    assert any(not torch.equal(weights0[k], weights1[k]) for k in weights0)
    assert init.read_bytes() == before


def test_resume_refuses_another_teacher(recipe, tmp_path, monkeypatch):
    """A distilled run resumed after its --init-from file changed would go on distilling
    from another teacher: refused, naming the fix."""
    import shutil

    root, _ = recipe
    init = tmp_path / "teacher.pt"
    shutil.copy(root / "l1" / "model.pt", init)
    cfg = _unfinished(tmp_path, monkeypatch, phase="delta", init_from=str(init), clip_len=2,
                      distill=0.5)
    shutil.copy(root / "baseline" / "model.pt", init)  # the teacher's file redone
    with pytest.raises(ValueError, match="not the file this run started to distil from"):
        train(cfg, resume=True)
