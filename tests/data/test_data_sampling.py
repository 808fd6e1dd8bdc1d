"""Clip sampling and clip transforms (property-based where it helps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deltasparse.data import (
    center_crop,
    clip_indices,
    even_starts,
    hflip,
    normalize,
    random_crop,
    random_start,
    resize,
)
from deltasparse.data.sampling import clip_span

frames_st = st.integers(1, 200)
len_st = st.integers(1, 20)
stride_st = st.integers(1, 5)


@given(frames_st, len_st, stride_st, st.integers(0, 2**32 - 1))
def test_random_start_in_bounds(num, clip_len, stride, seed):
    start = random_start(num, clip_len, stride, np.random.default_rng(seed))
    idx = clip_indices(num, clip_len, stride, start)
    assert len(idx) == clip_len and idx.min() >= 0 and idx.max() <= num - 1
    if clip_span(clip_len, stride) <= num:  # fits: no padding, exact stride
        assert np.all(np.diff(idx) == stride)
    else:
        assert start == 0


@given(frames_st, len_st, stride_st, st.integers(1, 10))
def test_even_starts_cover_the_video(num, clip_len, stride, n):
    starts = even_starts(num, clip_len, stride, n)
    last = max(num - clip_span(clip_len, stride), 0)
    assert len(starts) == n and all(0 <= s <= last for s in starts)
    assert starts == sorted(starts)
    if n > 1:
        assert starts[0] == 0 and starts[-1] == last


def test_padding_repeats_last_frame():
    assert clip_indices(5, 4, 2, 0).tolist() == [0, 2, 4, 4]
    with pytest.raises(ValueError):
        clip_indices(0, 4, 1, 0)
    with pytest.raises(ValueError):
        even_starts(10, 2, 1, 0)


def test_transforms():
    clip = torch.randint(0, 256, (3, 3, 20, 30), dtype=torch.uint8)
    assert resize(clip, 10).shape == (3, 3, 10, 15) and resize(clip, 10).dtype == torch.uint8
    assert resize(clip.float(), (8, 9)).shape == (3, 3, 8, 9)
    assert torch.equal(center_crop(clip, (10, 10)), clip[..., 5:15, 10:20])
    c = random_crop(clip, (10, 10), np.random.default_rng(0))
    assert c.shape == (3, 3, 10, 10)
    assert torch.equal(hflip(clip)[..., 0], clip[..., -1])
    n = normalize(clip, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    torch.testing.assert_close(n, clip.float() / 127.5 - 1)
    with pytest.raises(ValueError, match="larger than the frame"):
        center_crop(clip, (40, 10))
    with pytest.raises(ValueError, match="channels"):
        normalize(clip, (0.5,), (0.5,))
    with pytest.raises(ValueError, match=r"\(T, C, H, W\)"):
        resize(clip[0], 4)
