"""VideoFolder: clips from a folder of real video files (UCF101 layout or class folders).

The dataset behind the paper's experiments (Yousefzadeh & Sifalakis, arXiv 2107.07305:
MobileNet v1 on UCF101). See ``layout`` for how videos and splits are found and ``cache`` for
the on-disk frame cache.

**Items.** ``dataset[i] -> (clip, label)``; ``clip`` is float32 ``(clip_len, 3, H, W)``,
``(x / 255 - mean) / std``. Frames are taken every ``frame_stride`` decoded frames; short
videos are padded with their last frame.

* ``train=True``: one item per video; a uniformly random clip start, random crop and
  (if ``hflip``) random mirror -- leave ``hflip`` off for direction classes such as the
  synthetic set's MoveLeft/MoveRight. Randomness comes from torch's RNG (so
  ``torch.manual_seed`` and DataLoader worker seeding apply), or, with ``seed=int``, from
  ``(seed, epoch, i)`` with the epoch set by ``set_epoch`` -- reproducible whatever the
  worker layout.
* ``train=False``: ``clips_per_video`` items per video at evenly spaced starts, centre
  crop. ``dataset.clip_video[i]`` (or ``dataset.video_index(i)``) is the video of item ``i``
  (an index into ``dataset.videos``), so an evaluation can average logits per video.

**Resize and cache.** ``resize`` (short side, or ``(H, W)``) is applied by FFmpeg while
decoding. With ``cache_dir`` every video is decoded once, at that size and every
``temporal_step``-th frame, into ``cache_dir/<settings>/*.npy`` and memory-mapped from then
on; the cache key includes the file's size and mtime, so an edited video is decoded again.
Entries are raw uint8 frames, so budget the disk: UCF101 (about 2.5 M frames) takes about
160 GB at short side 128 and 80 GB at 128 with ``temporal_step=2``; (112, 112) with
``temporal_step=4`` takes about 23 GB.

**Bad files.** At construction every video is checked: decoded into the cache when there is
one, else probed cheaply (``probe=False`` skips this). A corrupt or truncated file, or one the
split lists but the disk lacks, is skipped with a ``CorruptVideoWarning`` and recorded in
``dataset.skipped`` (paths) and ``dataset.num_skipped``, for the training summary. A class
left without a readable video by this is an error naming its folder (a model trained or
evaluated without a class is wrong but plausible), as is a training split that lists no
video of a class. A file that only fails later, while training, is replaced by the next
readable video and recorded the same way (in that process: DataLoader workers keep their own
copy).

**Lengths.** The check also learns each video's frame count (``dataset.frame_counts``, after
``temporal_step``; 0 where unknown, e.g. with ``probe=False``). Videos shorter than a clip's
span are padded (see above) and logged as a warning; :attr:`longest_video` lets a caller
refuse a clip length that no video fits.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import decode as _decode
from .cache import FrameCache
from .errors import CorruptVideoWarning, DatasetError, VideoDecodeError
from .layout import (
    SplitIndex,
    VideoEntry,
    check_root,
    fallback_warning,
    find_splits_dir,
    folder_index,
    resolve_layout,
    split_rule,
    ucf101_index,
)
from .sampling import clip_indices, clip_span, even_starts, random_start
from .transforms import IMAGENET_MEAN, IMAGENET_STD, Size, crop_box, normalize_frames

logger = logging.getLogger(__name__)


def _cache_tag(resize: Size | None, step: int) -> str:
    if resize is None:
        size = "orig"
    elif isinstance(resize, int):
        size = f"short{resize}"
    else:
        size = f"{resize[0]}x{resize[1]}"
    return f"{size}-step{step}"


class VideoFolder(Dataset):
    """Clips of the videos under ``root``; see the module docstring for every option."""

    def __init__(self, root: str | Path, *, split: int = 1, train: bool = True,
                 layout: str = "auto", splits_dir: str | Path | None = None,
                 clip_len: int = 16, frame_stride: int = 1, clips_per_video: int = 1,
                 resize: Size | None = None, crop: int | tuple[int, int] | None = None,
                 hflip: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, temporal_step: int = 1,
                 cache_dir: str | Path | None = None, probe: bool = True,
                 scan_workers: int | None = None, seed: int | None = None,
                 test_every: int = 5,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if clip_len < 1 or frame_stride < 1 or clips_per_video < 1 or temporal_step < 1:
            raise ValueError("clip_len, frame_stride, clips_per_video and temporal_step must be "
                             f">= 1, got {clip_len}, {frame_stride}, {clips_per_video}, "
                             f"{temporal_step}")
        self.root = check_root(root)
        self.layout = resolve_layout(self.root, layout, splits_dir)
        #: why ``layout="auto"`` should not have fallen back to plain folders (or None)
        self.layout_warning: str | None = None
        if self.layout == "ucf101":
            index = ucf101_index(self.root, split, train, splits_dir)
            self.split_rule = split_rule("ucf101", split,
                                         splits_dir=find_splits_dir(self.root, splits_dir))
        else:
            index = folder_index(self.root, split, train, test_every)
            self.split_rule = split_rule("folder", split, test_every)
            self.layout_warning = fallback_warning(self.root, layout, splits_dir)
        self.class_names: list[str] = index.class_names
        self.split, self.train = split, train
        self.clip_len, self.frame_stride = clip_len, frame_stride
        self.clips_per_video = clips_per_video
        self.resize = resize
        self.crop = (crop, crop) if isinstance(crop, int) else crop
        self.hflip, self.mean, self.std = hflip, tuple(mean), tuple(std)
        self.temporal_step, self.seed, self.transform = temporal_step, seed, transform
        self.epoch = 0
        self.cache: FrameCache | None = None
        if cache_dir is not None:
            self.cache = FrameCache(cache_dir, _cache_tag(resize, temporal_step))
        self.skipped: list[Path] = []
        for path in index.missing:
            self._skip(path, "listed in the split file but not found on disk")
        scanned = self._scan(index.videos, probe, scan_workers)
        self.videos: list[VideoEntry] = [entry for entry, _ in scanned]
        self.frame_counts: list[int] = [n for _, n in scanned]
        if not self.videos and not self.skipped:
            raise DatasetError(f"the {self._part} holds no video ({self.split_rule}); pick "
                               "another split, or add videos")
        if not self.videos:
            raise DatasetError(f"no readable videos in the {self._part} ({self.num_skipped} "
                               "skipped, see the warnings); check the files and the split")
        self._check_classes(index)
        self._warn_short()
        self._bad: set[int] = set()
        n = 1 if train else clips_per_video
        self.clip_video: list[int] = [v for v in range(len(self.videos)) for _ in range(n)]
        logger.info("VideoFolder %s (%s, split %d, %s): %d classes, %d videos, %d skipped",
                    self.root, self.layout, split, "train" if train else "test",
                    self.num_classes, len(self.videos), self.num_skipped)

    # -- bookkeeping ------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def labels(self) -> list[int]:
        """Label of each video in ``self.videos``."""
        return [v.label for v in self.videos]

    def class_counts(self) -> list[int]:
        """Readable videos per class (index = label)."""
        have = Counter(v.label for v in self.videos)
        return [have[c] for c in range(self.num_classes)]

    @property
    def longest_video(self) -> int:
        """Frames of the longest video (after ``temporal_step``); 0 when no length is known."""
        return max(self.frame_counts, default=0)

    @property
    def _part(self) -> str:
        return f"{'train' if self.train else 'test'} split {self.split} of {self.root}"

    def _check_classes(self, index: SplitIndex) -> None:
        for label, count in enumerate(self.class_counts()):
            if count:
                continue
            name = self.class_names[label]
            lost = [p for p in self.skipped if p.parent.name.lower() == name.lower()]
            if lost:
                raise DatasetError(
                    f"class folder {lost[0].parent} has no readable video in the {self._part}: "
                    f"all {len(lost)} of its videos there are corrupt or missing (see the "
                    "warnings); re-encode or replace them, or remove the class")
            if self.train:
                raise DatasetError(
                    f"class {name!r} has no video in the {self._part}; a model cannot learn a "
                    f"class it never sees: add videos to {self.root / name} or pick another "
                    "split")
            logger.warning("class %r has no video in the %s; its accuracy is not measured",
                           name, self._part)

    def _warn_short(self) -> None:
        span = clip_span(self.clip_len, self.frame_stride)
        short = sum(0 < n < span for n in self.frame_counts)
        if short:
            logger.warning(
                "%d of %d videos in the %s have fewer than %d frames (clip_len %d, "
                "frame_stride %d); their clips repeat the last frame", short, len(self.videos),
                self._part, span, self.clip_len, self.frame_stride)

    def video_index(self, i: int) -> int:
        """Index into ``self.videos`` of the video that item ``i`` is a clip of."""
        return self.clip_video[i]

    def set_epoch(self, epoch: int) -> None:
        """Change the random clips of a seeded training set (``seed=int``) per epoch."""
        self.epoch = int(epoch)

    def _skip(self, path: Path, reason: str) -> None:
        if path in self.skipped:
            return
        self.skipped.append(path)
        warnings.warn(f"skipping video {path}: {reason}", CorruptVideoWarning, stacklevel=3)

    def __len__(self) -> int:
        return len(self.clip_video)

    # -- decoding ---------------------------------------------------------------------
    def _decode(self, path: Path) -> np.ndarray:
        return _decode.decode_video(path, size=self.resize, step=self.temporal_step)

    def _check(self, entry: VideoEntry) -> tuple[str | None, int]:
        """``(None, frames)`` if the video is usable (frames 0: unknown), else ``(why, 0)``."""
        try:
            if self.cache is not None:
                return None, len(self.cache.get(entry.path, self._decode))
            declared = _decode.probe_video(entry.path).declared_frames
        except VideoDecodeError as exc:
            return exc.reason, 0
        return None, math.ceil(declared / self.temporal_step)

    def _scan(self, entries: list[VideoEntry], probe: bool,
              workers: int | None) -> list[tuple[VideoEntry, int]]:
        if self.cache is None and not probe:
            return [(entry, 0) for entry in entries]
        workers = workers or min(8, os.cpu_count() or 1)
        what = "decoding into the cache" if self.cache is not None else "probing"
        logger.info("%s %d videos under %s", what, len(entries), self.root)
        good: list[tuple[VideoEntry, int]] = []
        step = max(1, len(entries) // 10)
        # FFmpeg releases the GIL while decoding, so threads overlap the work.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(self._check, entries)
            for k, (entry, (reason, frames)) in enumerate(zip(entries, results, strict=True)):
                if reason is None:
                    good.append((entry, frames))
                else:
                    self._skip(entry.path, reason)
                if len(entries) > 50 and (k + 1) % step == 0:
                    logger.info("%s: %d/%d videos", what, k + 1, len(entries))
        return good

    def _frames(self, vid: int) -> tuple[np.ndarray, int]:
        """Frames and index of video ``vid``, or of the next readable one if it fails."""
        n = len(self.videos)
        for k in range(n):
            cand = (vid + k) % n
            if cand in self._bad:
                continue
            path = self.videos[cand].path
            try:
                if self.cache is not None:
                    return self.cache.get(path, self._decode), cand
                return self._decode(path), cand
            except VideoDecodeError as exc:
                self._bad.add(cand)
                self._skip(path, f"{exc.reason} (replaced by another video)")
        raise DatasetError(f"no readable video left in {self.root}; all "
                           f"{n} videos failed to decode")

    # -- items ------------------------------------------------------------------------
    def _rng(self, i: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        return np.random.default_rng([self.seed, self.epoch, i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i < 0:
            i += len(self)
        frames, vid = self._frames(self.clip_video[i])
        num, h, w = frames.shape[:3]
        rng = self._rng(i) if self.train else None
        if self.train:
            start = random_start(num, self.clip_len, self.frame_stride, rng)
        else:
            starts = even_starts(num, self.clip_len, self.frame_stride, self.clips_per_video)
            start = starts[i % self.clips_per_video]
        idx = clip_indices(num, self.clip_len, self.frame_stride, start)
        if self.crop is not None:
            try:
                y, x = crop_box(h, w, self.crop, rng=rng)
            except ValueError as exc:
                raise DatasetError(f"{self.videos[vid].path}: {exc} (set resize=)") from exc
            clip = frames[idx, y:y + self.crop[0], x:x + self.crop[1]]
        else:
            clip = frames[idx]
        out = normalize_frames(clip, self.mean, self.std)
        if self.train and self.hflip and rng.random() < 0.5:
            out = out.flip(-1)
        if self.transform is not None:
            out = self.transform(out)
        return out, self.videos[vid].label
