"""SyntheticActions: determinism, labels, shapes, normalisation, temporal redundancy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltasparse.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MOTIONS,
    SyntheticActions,
    normalize,
    render_video,
)

SMALL = dict(num_videos=12, num_classes=4, frames=8, size=(32, 32))


def test_deterministic_by_seed_and_split():
    a, b = SyntheticActions(**SMALL, seed=3), SyntheticActions(**SMALL, seed=3)
    for i in (0, 5, 11):
        assert np.array_equal(a.render(i), b.render(i))
        assert np.array_equal(a.render(i), a.render(i))
    assert not np.array_equal(a.render(0), SyntheticActions(**SMALL, seed=4).render(0))
    test = SyntheticActions(**SMALL, seed=3, split="test")
    assert not np.array_equal(a.render(0), test.render(0))
    video, label = render_video(5, num_classes=4, frames=8, size=(32, 32), seed=3)
    assert np.array_equal(video, a.render(5)) and label == 1


def test_items_labels_and_normalisation():
    ds = SyntheticActions(**SMALL, split="test", clip_len=4, clip_stride=2)
    assert len(ds) == 12 and ds.class_names == list(MOTIONS[:4])
    assert ds.labels == [i % 4 for i in range(12)]
    clip, label = ds[6]
    assert clip.shape == (4, 3, 32, 32) and clip.dtype == torch.float32 and label == 2
    video = ds.render(6)  # test split: the centre clip, start (8 - 7) // 2 = 0
    raw = torch.from_numpy(video[[0, 2, 4, 6]]).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(clip, (raw - mean) / std)


def test_train_clips_are_random_windows():
    ds = SyntheticActions(num_videos=2, frames=16, size=16, clip_len=4, num_classes=2)
    video = normalize(torch.from_numpy(ds.render(0)).permute(0, 3, 1, 2))
    torch.manual_seed(0)
    starts = set()
    for _ in range(20):
        clip, label = ds[0]
        match = [s for s in range(13) if torch.allclose(clip, video[s:s + 4], atol=1e-5)]
        assert match and label == 0
        starts.add(match[0])
    assert len(starts) > 3


def test_video_statistics_look_like_footage():
    ds = SyntheticActions(num_videos=10, frames=16, size=(48, 64))
    video = ds.render(3).astype(np.int16)
    assert video.shape == (16, 48, 64, 3) and ds.render(3).dtype == np.uint8
    change = np.abs(np.diff(video, axis=0)).max(axis=-1)
    assert (change > 20).mean() < 0.1  # most pixels change little between frames
    assert (change > 20).any()  # but something moves
    assert 20 < video.mean() < 235


def test_appearance_varies_within_a_class():
    ds = SyntheticActions(num_videos=40, num_classes=10, frames=2, size=32)
    means = np.array([ds.render(i).mean(axis=(0, 1, 2)) for i in range(0, 40, 10)])  # class 0
    assert np.ptp(means, axis=0).max() > 10


@pytest.mark.parametrize("bad", [dict(num_classes=13), dict(split="val"), dict(size=4),
                                 dict(shape_noise=2.0), dict(clip_stride=0)])
def test_bad_arguments_say_what_is_wrong(bad):
    with pytest.raises(ValueError):
        SyntheticActions(**{**SMALL, **bad})


def test_render_speed_budget():
    """A guard against an accidental slow path (the demo renders 2,800 videos), not a
    benchmark: ~40 ms a video with compression on one core, the bound is 10x that."""
    import time

    ds = SyntheticActions(num_videos=10, frames=16, size=64)
    t = time.perf_counter()
    for i in range(10):
        ds.render(i)
    assert (time.perf_counter() - t) / 10 < 0.4
