"""The command line: every expected error is one line and a non-zero exit; train and eval say
which data they read, refuse checkpoints of other classes and never clobber a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import deltasparse.train as train_mod
from deltasparse.cli import main
from deltasparse.data import SyntheticActions, write_ucf101_layout
from deltasparse.engine import UnsupportedOpError

# 3 synthetic classes (MoveRight, MoveLeft, MoveDown), tiny and fast.
TRAIN = ["--synthetic-videos", "16", "--synthetic-classes", "3", "--synthetic-frames", "6",
         "--resolution", "32", "--width", "0.25", "--clip-len", "3", "--batch-size", "8",
         "--epochs", "2", "--no-progress", "--device", "cpu"]  # fmt: skip


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message on stderr"
    assert err[-1].startswith(f"deltasparse {command}: error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture(scope="module")
def run3(tmp_path_factory) -> Path:
    """A finished baseline run on 3 synthetic classes."""
    out = tmp_path_factory.mktemp("run3") / "baseline"
    assert main(["train", *TRAIN, "--out", str(out)]) == 0
    return out


def _ucf(root: Path, classes: int) -> Path:
    # 5 groups of one video per class: group 1 is UCF's test set, group 5 the plain folders'
    ds = SyntheticActions(num_videos=5 * classes, num_classes=classes, frames=6, size=(32, 32))
    write_ucf101_layout(ds, root, fmt="mp4", splits=(1,), groups=5)
    return root


@pytest.fixture(scope="module")
def ucf4(tmp_path_factory) -> Path:
    return _ucf(tmp_path_factory.mktemp("ucf4"), 4)


@pytest.fixture(scope="module")
def ucf3(tmp_path_factory) -> Path:
    return _ucf(tmp_path_factory.mktemp("ucf3"), 3)


# -- classes of the checkpoint against those of the data -----------------------------
def test_eval_refuses_a_checkpoint_of_another_number_of_classes(run3, ucf4, capsys):
    rc = main(["eval", "--checkpoint", str(run3 / "model.pt"), "--data", str(ucf4),
               "--device", "cpu"])
    assert rc == 2
    line = _error_line(capsys, "eval")
    assert "was trained on 3 classes (MoveRight, MoveLeft, MoveDown)" in line
    assert f"but {ucf4} has 4 (MoveRight, MoveLeft, MoveDown, MoveUp)" in line
    assert "video accuracy" not in capsys.readouterr().err


def test_eval_refuses_classes_in_another_order(run3, ucf3, tmp_path, capsys):
    plain = tmp_path / "plain"  # sorted folder names: movedown, moveleft, moveright
    for video in ucf3.rglob("*.mp4"):
        (plain / video.parent.name.lower()).mkdir(parents=True, exist_ok=True)
        shutil.copy(video, plain / video.parent.name.lower() / video.name)
    rc = main(["eval", "--checkpoint", str(run3 / "model.pt"), "--data", str(plain),
               "--device", "cpu", "--clip-len", "3"])
    assert rc == 2
    assert "label 0 is 'MoveRight' in the checkpoint but 'movedown' in the data" in (
        _error_line(capsys, "eval"))


def test_eval_on_the_same_classes_prints_the_data_and_scores(run3, ucf3, tmp_path, capsys):
    out = tmp_path / "ev.json"
    rc = main(["eval", "--checkpoint", str(run3 / "model.pt"), "--data", str(ucf3),
               "--device", "cpu", "--clip-len", "3", "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "UCF101 official split 1: trainlist01.txt / testlist01.txt" in err
    test_videos = len((ucf3 / "ucfTrainTestlist" / "testlist01.txt").read_text().split())
    assert json.loads(out.read_text())["num_videos"] == test_videos
    rows = {line.split()[0]: line.split()[1:] for line in err.splitlines() if line.strip()}
    assert rows["total"] == [str(test_videos)]
    assert {"MoveRight", "MoveLeft", "MoveDown"} <= set(rows)


def test_old_checkpoint_without_class_names_still_loads(run3, ucf4, tmp_path, capsys):
    ckpt = torch.load(run3 / "model.pt", weights_only=False)
    del ckpt["class_names"]
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    assert main(["eval", "--checkpoint", str(old), "--device", "cpu",
                 "--out", str(tmp_path / "ev.json")]) == 0
    assert main(["eval", "--checkpoint", str(old), "--data", str(ucf4), "--device", "cpu"]) == 2
    assert "was trained on 3 classes but" in _error_line(capsys, "eval")


def test_eval_clip_longer_than_every_video_is_refused(run3, ucf3, capsys):
    rc = main(["eval", "--checkpoint", str(run3 / "model.pt"), "--data", str(ucf3),
               "--device", "cpu", "--clip-len", "32"])
    assert rc == 2
    line = _error_line(capsys, "eval")
    assert "clips of 32 frames" in line and "longest has 6 frames" in line
    assert "pass --clip-len 6 or less" in line


# -- resume and finished runs ---------------------------------------------------------
def _kill_after_first_checkpoint(monkeypatch):
    real_save = train_mod.save_atomic

    def save_then_die(obj, path):
        real_save(obj, path)
        if Path(path).name == "checkpoint.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_atomic", save_then_die)
    return lambda: monkeypatch.setattr(train_mod, "save_atomic", real_save)


def test_interrupted_train_then_resume_with_the_saved_settings(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    restore = _kill_after_first_checkpoint(monkeypatch)
    assert main(["train", *TRAIN, "--out", str(out)]) == 130
    assert "interrupted; continue with --resume" in capsys.readouterr().err
    restore()
    assert main(["train", *TRAIN, "--out", str(out)]) == 2  # neither --resume nor --force
    assert "pass --resume to continue it" in _error_line(capsys, "train")
    # Options left out keep their saved values: no need to repeat them.
    assert main(["train", "--out", str(out), "--resume", "--no-progress", "--workers", "0"]) == 0
    stdout = capsys.readouterr().out
    assert f"resumed {out / 'checkpoint.pt'} after epoch 1 of 2: continuing with epoch 2" in (
        stdout)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["synthetic_classes"] == 3 and cfg["resolution"] == 32


@pytest.mark.parametrize("option, value, saved", [("--resolution", "48", "32"),
                                                  ("--lr", "0.01", "0.002"),
                                                  ("--epochs", "5", "2")])
def test_resume_with_changed_settings_is_refused(tmp_path, monkeypatch, capsys, option, value,
                                                 saved):
    out = tmp_path / "run"
    restore = _kill_after_first_checkpoint(monkeypatch)
    main(["train", *TRAIN, "--out", str(out)])
    restore()
    config = (out / "config.json").read_bytes()
    capsys.readouterr()
    rc = main(["train", *TRAIN, "--out", str(out), "--resume", option, value])
    assert rc == 2
    field = option[2:]
    assert f"{field}: saved {saved}, given {value}" in _error_line(capsys, "train")
    assert (out / "config.json").read_bytes() == config


def test_resume_without_checkpoint_is_an_error_naming_the_fix(tmp_path, capsys):
    assert main(["train", *TRAIN, "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "no checkpoint at" in _error_line(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_rerun_into_a_finished_run_needs_force(run3, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run3, out)
    before = (out / "model.pt").read_bytes()
    assert main(["train", *TRAIN, "--out", str(out)]) == 2
    assert "already holds a finished run" in _error_line(capsys, "train")
    assert (out / "model.pt").read_bytes() == before
    assert main(["train", *TRAIN, "--out", str(out), "--epochs", "1", "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["epochs"] == 1
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 1


# -- arguments and data checked before anything is written --------------------
@pytest.mark.parametrize("args, expected, seen", [
    (["--resolution", "0"], "resolution (--resolution) must be an integer >= 8", "got 0;"),
    (["--resolution", "-5"], "resolution (--resolution) must be an integer >= 8", "got -5;"),
    (["--epochs", "0"], "epochs (--epochs) must be an integer >= 1", "got 0;"),
    (["--clip-len", "0"], "clip_len (--clip-len) must be an integer >= 1", "got 0;"),
    (["--batch-size", "0"], "batch_size (--batch-size) must be an integer >= 1", "got 0;"),
    (["--lr", "-1"], "lr (--lr) must be a finite number > 0", "got -1.0;"),
    (["--workers", "-2"], "workers (--workers) must be an integer >= 0", "got -2;"),
    (["--split", "9"], "split (--split) must be an integer in 1..5", "got 9;"),
])
def test_bad_arguments_are_one_line_errors_and_write_nothing(tmp_path, capsys, args, expected,
                                                             seen):
    out = tmp_path / "run"
    assert main(["train", *TRAIN, "--out", str(out), *args]) == 2
    line = _error_line(capsys, "train")
    assert expected in line and seen in line and f"pass e.g. {args[0]} " in line, line
    assert "delta training" not in line and "decode" not in line
    assert not out.exists()


def test_bad_resolution_on_a_video_folder_blames_the_option(ucf3, tmp_path, capsys):
    rc = main(["train", *TRAIN, "--data", str(ucf3), "--resolution", "0",
               "--out", str(tmp_path / "run")])
    assert rc == 2
    line = _error_line(capsys, "train")
    assert "--resolution" in line and "failed to decode" not in line


def test_empty_data_folder_does_not_touch_an_existing_run(run3, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run3, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "empty").mkdir()
    rc = main(["train", *TRAIN, "--data", str(tmp_path / "empty"), "--out", str(out),
               "--force"])
    assert rc == 2
    assert "has no class sub-folders" in _error_line(capsys, "train")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# -- expected errors are one line, bugs say how to see the traceback -----------------
def _stream(tmp_path, *extra):
    return main([*extra, "stream", "--checkpoint", str(tmp_path / "m.pt"),
                 "--video", str(tmp_path / "v.mp4"), "--out", str(tmp_path / "s.json")])


def test_unsupported_op_error_is_one_line(tmp_path, monkeypatch, capsys):
    import deltasparse.stream

    def unsupported(*args, **kwargs):
        raise UnsupportedOpError("DeltaEngine: module 'act' (GELU) has no delta kernel;\n"
                                 "convert with fallback='dense'")

    monkeypatch.setattr(deltasparse.stream, "run_stream", unsupported)
    assert _stream(tmp_path) == 2
    line = _error_line(capsys, "stream")
    assert line.endswith("(GELU) has no delta kernel; convert with fallback='dense'")
    with pytest.raises(UnsupportedOpError):  # -v keeps the traceback for debugging
        _stream(tmp_path, "-v")


def test_unexpected_error_is_one_line_with_a_pointer_to_verbose(tmp_path, monkeypatch, capsys):
    import deltasparse.stream

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(deltasparse.stream, "run_stream", bug)
    assert _stream(tmp_path) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["deltasparse stream: unexpected error ZeroDivisionError: division by zero "
                   "(run with -v for the traceback)"]
    with pytest.raises(ZeroDivisionError):
        _stream(tmp_path, "-v")


def test_unknown_model_is_one_line(tmp_path, capsys):
    assert main(["train", *TRAIN, "--model", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "model (--model) must be one of convnet" in _error_line(capsys, "train")


# -- the data set-up is shown; layout and split options ----------------------
def test_train_prints_the_split_rule_and_counts_per_class(tmp_path, capsys):
    assert main(["train", *TRAIN, "--out", str(tmp_path / "r"), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "data synthetic: synthetic videos (seed 0, 6 frames): 16 train and 4 test" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["MoveRight"] == ["6", "2"] and rows["MoveDown"] == ["5", "1"]


def test_layout_and_splits_dir_options(ucf3, tmp_path, capsys, caplog):
    data = tmp_path / "ucf"
    shutil.copytree(ucf3, data)
    lists = tmp_path / "lists"
    shutil.move(data / "ucfTrainTestlist", lists)
    args = [*TRAIN, "--data", str(data), "--epochs", "1"]
    # auto: UCF101 file names but no classInd.txt -> plain folders, with a warning
    assert main(["train", *args, "--out", str(tmp_path / "auto")]) == 0
    cap = capsys.readouterr()
    assert "warning:" in cap.out and "looks like UCF101" in cap.out and "--splits-dir" in cap.out
    assert any(r.levelname == "WARNING" and "looks like UCF101" in r.getMessage()
               for r in caplog.records)  # logging.warning as well
    # --splits-dir: the official lists
    assert main(["train", *args, "--splits-dir", str(lists), "--out", str(tmp_path / "s")]) == 0
    assert "UCF101 official split 1" in capsys.readouterr().out
    test_videos = len((lists / "testlist01.txt").read_text().split())
    assert json.loads((tmp_path / "s" / "eval.json").read_text())["num_videos"] == test_videos
    # --layout ucf101 without the lists: the error names both options
    assert main(["train", *args, "--layout", "ucf101", "--out", str(tmp_path / "u")]) == 2
    line = _error_line(capsys, "train")
    assert "--splits-dir" in line and "--layout folder" in line


def test_split_range_follows_the_layout(ucf3, tmp_path, capsys):
    rc = main(["train", *TRAIN, "--data", str(ucf3), "--split", "4", "--out",
               str(tmp_path / "u")])
    assert rc == 2
    assert "official splits are 1, 2 and 3" in _error_line(capsys, "train")
    rc = main(["train", *TRAIN, "--data", str(ucf3), "--split", "4", "--layout", "folder",
               "--epochs", "1", "--out", str(tmp_path / "f")])
    assert rc == 0
    assert "split 4 of 1..5" in capsys.readouterr().out


def test_out_of_memory_is_one_line_with_the_fix(tmp_path, monkeypatch, capsys):
    import deltasparse.stream

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(deltasparse.stream, "run_stream", oom)
    assert _stream(tmp_path) == 2
    line = _error_line(capsys, "stream")
    assert "Tried to allocate 2.00 GiB more); lower --batch-size" in line


def test_failed_stream_verification_is_an_expected_error(tmp_path, monkeypatch, capsys):
    import deltasparse.stream

    def off(*args, **kwargs):
        raise deltasparse.stream.StreamVerificationError(
            "stream: the engine is off the dense model (max relative error 0.1 > rtol 1e-4)", {})

    monkeypatch.setattr(deltasparse.stream, "run_stream", off)
    assert _stream(tmp_path) == 2
    assert "off the dense model" in _error_line(capsys, "stream")
