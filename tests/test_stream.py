"""run_stream over a generated .mp4: the engine against the dense model, the verify verdict,
class names from a checkpoint, one fps figure, errors."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from engine_helpers import converted

import deltasparse as ds
from deltasparse.stream import (
    StreamVerificationError,
    _class_names,
    engine_fps,
    iter_video,
    run_stream,
    to_tensor,
)


def _write_mp4(path, frames: int = 24, h: int = 48, w: int = 64) -> None:
    import av

    rng = np.random.default_rng(0)
    bg = (rng.random((h, w, 3)) * 200).astype(np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for t in range(frames):
            img = bg.copy()
            img[10:22, 5 + 2 * t : 17 + 2 * t] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _strict_json(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "clip.mp4"
    _write_mp4(path)
    return path


def _mobilenet(video):
    x0 = to_tensor(next(iter_video(video)), "cpu")
    return converted(ds.models.mobilenet_v1(num_classes=5, width_mult=0.25), x0, thr=0.1)


def test_stream_over_mp4_matches_dense(video, tmp_path):
    frames = list(iter_video(video))
    assert len(frames) == 24 and frames[0].shape == (48, 64, 3)
    gm = _mobilenet(video)
    seen = []
    out = tmp_path / "stream.json"
    names = ["a", "b", "c", "d", "e"]
    res = run_stream(video, model=ds.VideoModel(gm), verify_every=1, out=out, labels=names,
                     on_frame=seen.append)  # fmt: skip
    assert res["frames"] == 24 and len(seen) == 24 and seen == res["per_frame"]
    # every frame against the dense model, computed here independently of run_stream
    with torch.no_grad():
        dense = [gm(to_tensor(rgb, "cpu")) for rgb in frames]
    for y, info in zip(dense, res["per_frame"], strict=True):
        prob = y.softmax(-1)[0]
        assert info["pred"] == int(prob.argmax()) and info["label"] == names[info["pred"]]
        assert info["score"] == pytest.approx(float(prob.max()), abs=1e-5)
        assert info["rel_err"] <= 1e-4 and info["top1_match"] is True
    v = res["verify"]
    assert v["passed"] is True and v["tolerance"] == 1e-4 and v["frames"] == 24
    assert v["top1_agreement"] == 1.0 and v["failed_frames"] == []
    assert v["max_rel_err"] == max(f["rel_err"] for f in res["per_frame"])
    assert res["per_frame"][0]["density"] == 1.0
    per_frame_macs = ds.DeltaEngine(gm)
    per_frame_macs.step(to_tensor(frames[0], "cpu"))
    assert res["stats"]["dense_macs"] == 24 * per_frame_macs.stats.dense_macs
    assert res["stats"]["effective_macs"] < res["stats"]["dense_macs"]
    # one fps figure: frames / the sum of the step times, in the result and in the bar
    times = [f["time_ms"] for f in res["per_frame"]]
    assert res["engine_fps"] == pytest.approx(24e3 / sum(times))
    written = _strict_json(out.read_text())  # strict JSON: no NaN / Infinity
    assert written["frames"] == 24 and written["verify"] == v


def test_verification_failure_is_a_verdict_and_an_error(video, tmp_path):
    gm = _mobilenet(video)
    # the dense forward (hooks run) drifts from what the engine runs (the graph): a mismatch
    gm.register_forward_hook(lambda m, i, o: o + 0.01 * o.abs().max())
    res = run_stream(video, model=gm, verify_every=5, max_frames=12, strict=False)
    v = res["verify"]
    assert v["passed"] is False and v["frames"] == 3 and v["every"] == 5
    assert v["failed_frames"] == [0, 5, 10] and v["max_rel_err"] > 1e-3
    assert [f["frame"] for f in res["per_frame"] if "rel_err" in f] == [0, 5, 10]
    out = tmp_path / "failed.json"
    with pytest.raises(StreamVerificationError, match=r"verify FAIL.*> tolerance 1e-04") as exc:
        run_stream(video, model=gm, verify_every=5, max_frames=12, out=out)
    assert exc.value.result["verify"]["passed"] is False
    assert _strict_json(out.read_text())["verify"]["failed_frames"] == [0, 5, 10]  # kept
    # a looser tolerance passes the same stream
    assert run_stream(video, model=gm, verify_every=5, max_frames=6, rtol=0.5)["verify"]["passed"]


def test_frames_too_small_for_the_model_are_an_error_not_nan(video):
    x0 = to_tensor(next(iter_video(video)), "cpu")
    gm = converted(ds.models.convnet(num_classes=3, width_mult=0.25), x0)
    with pytest.raises(ValueError, match="8x8 are too small"):
        run_stream(video, model=gm, size=(8, 8))
    res = run_stream(video, model=gm, size=(32, 32), max_frames=3)
    assert all(np.isfinite(f["score"]) for f in res["per_frame"])


def test_class_names_come_from_the_checkpoint(video, tmp_path):
    from deltasparse.checkpoint import save_atomic
    from deltasparse.data import MOTIONS
    from deltasparse.train import TrainConfig, build_model

    cfg = TrainConfig(phase="delta", model="convnet", width=0.25, resolution=32,
                      data="synthetic", synthetic_classes=4, out=str(tmp_path / "run"))  # fmt: skip
    model = build_model(cfg, 4)
    model(torch.randn(1, 2, 3, 32, 32))  # creates the thresholds
    ckpt = tmp_path / "model.pt"
    save_atomic({"model": model.state_dict(), "config": cfg.to_dict(), "num_classes": 4}, ckpt)
    res = run_stream(video, ckpt, max_frames=3)
    assert res["labels"] == list(MOTIONS[:4]) and (res["height"], res["width"]) == (32, 32)
    assert all(f["label"] == MOTIONS[f["pred"]] for f in res["per_frame"])
    assert run_stream(video, ckpt, max_frames=1, labels=list("wxyz"))["per_frame"][0][
        "label"] in "wxyz"  # fmt: skip


def test_class_names_of_folder_data(tmp_path):
    ucf = tmp_path / "ucf"
    (ucf / "ucfTrainTestlist").mkdir(parents=True)
    (ucf / "ucfTrainTestlist" / "classInd.txt").write_text("2 Bowling\n1 ApplyLipstick\n")
    cfg = types.SimpleNamespace(data=str(ucf))
    assert _class_names(cfg, {"num_classes": 2}) == ["ApplyLipstick", "Bowling"]
    plain = tmp_path / "plain"
    for c in ("walk", "run", ".hidden"):
        (plain / c).mkdir(parents=True)
    cfg = types.SimpleNamespace(data=str(plain))
    assert _class_names(cfg, {"num_classes": 2}) == ["run", "walk"]
    assert _class_names(cfg, {"num_classes": 3}) is None  # does not match the model: none
    assert _class_names(types.SimpleNamespace(data=str(tmp_path / "gone")), {"num_classes": 2}) \
        is None  # fmt: skip
    assert _class_names(cfg, {"num_classes": 2, "class_names": ["x", "y"]}) == ["x", "y"]


def test_engine_fps_definition():
    assert engine_fps([10.0, 30.0]) == pytest.approx(50.0)  # 2 frames in 40 ms
    assert engine_fps([]) is None and engine_fps([0.0]) is None


def test_stream_errors(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    m = ds.VideoModel(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1)).eval())
    with pytest.raises(ValueError, match="bad.mp4"):
        run_stream(bad, model=m)
    with pytest.raises(FileNotFoundError):
        run_stream(tmp_path / "missing.mp4", model=m)
    with pytest.raises(ValueError, match="exactly one"):
        run_stream(bad)
    with pytest.raises(ValueError, match="verify_every must be >= 0"):
        run_stream(bad, model=m, verify_every=-1)
    with pytest.raises(ValueError, match="rtol must be > 0"):
        run_stream(bad, model=m, rtol=0)


def test_stream_a_token_gated_vit_verifies_against_the_streaming_dense_model(video):
    """Token gates keep the last value sent: the dense reference streams too (every frame),
    and the engine equals it; the memory figure is relative to one frame's activations."""
    torch.manual_seed(0)
    vit = ds.models.create("vit_tiny", num_classes=4, img_size=32, depth=2)
    gm = ds.convert(vit, ds.DeltaConfig(kind="token", threshold_init=0.05)).eval()
    res = run_stream(video, model=gm, size=(32, 32), verify_every=3, max_frames=12)
    assert res["verify"]["passed"] and res["verify"]["max_rel_err"] <= 1e-5
    assert res["stats"]["density"] < 1
    assert 1.0 <= res["stats"]["memory_ratio"] < 5.0
