"""The synthetic videos behave like camera footage: almost every pixel changes a little between
frames (shake, noise, compression), few change a lot; compression is real and reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from deltasparse.data import SyntheticActions, render_video
from deltasparse.data.encode import compress_video
from deltasparse.data.errors import DatasetError


def _changes(video: np.ndarray) -> tuple[float, float, float]:
    d = np.abs(np.diff(video.astype(np.int16), axis=0)).max(-1)
    return float((d > 0).mean()), float((d > 8).mean()), float((d > 24).mean())


def test_change_statistics_match_camera_footage_at_64px():
    # Decoded H.264 camera clips resized to 64x64 change in 65-79% of their pixels between
    # consecutive frames; the synthetic default lands in that range, clean rendering does not.
    ds = SyntheticActions(num_videos=12, frames=8, size=64)
    any_, big, huge = np.mean([_changes(ds.render(i)) for i in range(12)], axis=0)
    assert 0.6 < any_ < 0.85
    assert 0.02 < big < 0.3 and huge < big
    clean = SyntheticActions(num_videos=12, frames=8, size=64, noise_std=0, camera_shake=0,
                             flicker=0, crf=None)  # fmt: skip
    assert np.mean([_changes(clean.render(i))[0] for i in range(12)]) < 0.5


def test_compression_is_real_and_reproducible():
    raw, _ = render_video(3, frames=8, size=(32, 48), crf=None)
    a, b = compress_video(raw, crf=23), compress_video(raw, crf=23)
    assert np.array_equal(a, b)  # the same bitstream on every call
    assert a.shape == raw.shape and not np.array_equal(a, raw)
    err23 = np.abs(a.astype(int) - raw).mean()
    err40 = np.abs(compress_video(raw, crf=40).astype(int) - raw).mean()
    assert 0 < err23 < err40 < 40  # lossy, more so at a higher CRF
    video, _ = render_video(3, frames=8, size=(32, 48))
    assert np.array_equal(video, a)  # the default rendering is the compressed one


def test_photo_and_procedural_backgrounds_differ():
    photo, _ = render_video(0, frames=2, size=(32, 32), background="photo", crf=None)
    proc, _ = render_video(0, frames=2, size=(32, 32), background="procedural", crf=None)
    assert not np.array_equal(photo, proc)
    # photographs carry fine texture: larger local gradients than smooth colour fields
    assert np.abs(np.diff(photo[0].astype(int), axis=1)).mean() > 0


@pytest.mark.parametrize("bad", [dict(crf=60), dict(size=(33, 32)), dict(background="sky"),
                                 dict(camera_shake=-1.0)])
def test_bad_realism_arguments(bad):
    kw = dict(num_videos=4, num_classes=2, frames=4, size=32) | bad
    with pytest.raises(ValueError):
        SyntheticActions(**kw)


def test_compress_video_rejects_odd_sizes():
    with pytest.raises(DatasetError, match="even"):
        compress_video(np.zeros((2, 31, 32, 3), np.uint8))
