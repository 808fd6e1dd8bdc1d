"""run_stream over a generated .mp4: the engine against the dense model, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from engine_helpers import converted

import deltasparse as ds
from deltasparse.stream import iter_video, run_stream, to_tensor


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


def test_stream_over_mp4_matches_dense(tmp_path):
    video = tmp_path / "clip.mp4"
    _write_mp4(video)
    frames = list(iter_video(video))
    assert len(frames) == 24 and frames[0].shape == (48, 64, 3)
    x0 = to_tensor(frames[0], "cpu")
    gm = converted(ds.models.mobilenet_v1(num_classes=5, width_mult=0.25), x0, thr=0.1)
    seen = []
    out = tmp_path / "stream.json"
    res = run_stream(video, model=ds.VideoModel(gm), verify_every=1, out=out,
                     on_frame=seen.append)  # fmt: skip
    assert res["frames"] == 24 and len(seen) == 24
    assert res["max_abs_err"] <= 1e-4
    assert all(0 <= f["pred"] < 5 for f in res["per_frame"])
    assert res["per_frame"][0]["density"] == 1.0
    assert res["stats"]["effective_macs"] < res["stats"]["dense_macs"]
    assert json.loads(out.read_text())["frames"] == 24
    # the frames the engine saw are exactly what the dense model sees, frame by frame
    for rgb, info in zip(frames[:3], res["per_frame"], strict=False):
        assert int(gm(to_tensor(rgb, "cpu")).argmax()) == info["pred"]


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
