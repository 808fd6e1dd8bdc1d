"""Write SyntheticActions videos to disk as real video files in the UCF101 layout.

    root/<ClassName>/v_<ClassName>_g<GG>_c<CC>.avi        (or .mp4, .mkv, .webm)
    root/ucfTrainTestlist/classInd.txt                     "1 ClassName"
    root/ucfTrainTestlist/trainlist0N.txt                  "ClassName/v_..._g08_c01.avi 1"
    root/ucfTrainTestlist/testlist0N.txt                   "ClassName/v_..._g01_c01.avi"

UCF101 has 25 groups per class (clips of one group share actor and scene) and puts groups
1-7 / 8-14 / 15-21 in the test set of split 1 / 2 / 3. Scaled down: the ``n_c`` videos of a
class fill ``G = min(groups, n_c)`` groups in order (``ceil(n_c / G)`` clips each), and split
``s`` tests groups ``(s-1)*t + 1 .. s*t`` with ``t = max(1, round(7 * G / 25))``.
The result is readable by ``VideoFolder(root)`` (and by UCF101 tooling).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .encode import pick_encoder, write_video
from .errors import DatasetError
from .layout import SPLITS_FOLDER
from .synthetic import SyntheticActions

logger = logging.getLogger(__name__)

_UCF_GROUPS, _UCF_TEST_GROUPS = 25, 7


@dataclass
class WrittenLayout:
    """What ``write_ucf101_layout`` wrote. ``files`` are paths relative to ``root``;
    ``test_files[s]`` are those in the test list of split ``s`` (the rest train)."""

    root: Path
    class_names: list[str]
    encoder: str
    files: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    test_files: dict[int, list[str]] = field(default_factory=dict)
    seconds: float = 0.0


def _test_groups(num_groups: int, split: int) -> range:
    t = max(1, round(_UCF_TEST_GROUPS * num_groups / _UCF_GROUPS))
    return range((split - 1) * t + 1, split * t + 1)


def write_ucf101_layout(dataset_or_params: SyntheticActions | Mapping[str, Any],
                        root: str | Path, *, fmt: str = "avi", splits: Sequence[int] = (1,),
                        groups: int = _UCF_GROUPS, fps: int = 25, codec: str | None = None,
                        overwrite: bool = False, workers: int | None = None) -> WrittenLayout:
    """Render every video of a ``SyntheticActions`` (or of ``SyntheticActions(**params)``)
    and write it, with UCF101 split files, under ``root``; returns a ``WrittenLayout``.

    ``fmt`` is the container: ``avi`` (mpeg4, like UCF101), ``mp4`` (libx264, falling back
    to mpeg4), ``mkv`` or ``webm``. Existing files are kept unless ``overwrite``; ``workers``
    threads render and encode (default: the CPU count, at most 8)."""
    ds = (dataset_or_params if isinstance(dataset_or_params, SyntheticActions)
          else SyntheticActions(**dict(dataset_or_params)))
    suffix = "." + fmt.lower().lstrip(".")
    encoder = pick_encoder(suffix, codec)
    if any(s not in (1, 2, 3) for s in splits) or not splits:
        raise ValueError(f"splits must be a non-empty subset of (1, 2, 3), got {tuple(splits)}")
    if groups < 2:
        raise ValueError(f"groups must be >= 2 (train and test need one each), got {groups}")
    root = Path(root).expanduser()
    names = ds.class_names
    per_class = [list(range(c, len(ds), ds.num_classes)) for c in range(ds.num_classes)]
    if min(len(v) for v in per_class) < 2:
        raise DatasetError(f"{len(ds)} videos for {ds.num_classes} classes leave a class with "
                           "fewer than 2 videos; use num_videos >= 2 * num_classes")

    out = WrittenLayout(root, names, encoder, test_files={s: [] for s in splits})
    train_lines: dict[int, list[str]] = {s: [] for s in splits}
    jobs: list[tuple[Path, int]] = []
    for label, indices in enumerate(per_class):
        g_count = min(groups, len(indices))
        per_group = math.ceil(len(indices) / g_count)
        g_used = math.ceil(len(indices) / per_group)
        for s in splits:
            if _test_groups(g_count, s).stop - 1 >= g_used:
                raise DatasetError(
                    f"class {names[label]} has {len(indices)} videos in {g_used} groups, too "
                    f"few for split {s} (its test groups {list(_test_groups(g_count, s))} "
                    "must leave a training group); use more videos or fewer splits")
        for j, index in enumerate(indices):
            group, clip = j // per_group + 1, j % per_group + 1
            rel = f"{names[label]}/v_{names[label]}_g{group:02d}_c{clip:02d}{suffix}"
            if overwrite or not (root / rel).exists():
                jobs.append((root / rel, index))
            out.files.append(rel)
            out.labels.append(label)
            for s in splits:
                if group in _test_groups(g_count, s):
                    out.test_files[s].append(rel)
                else:
                    train_lines[s].append(f"{rel} {label + 1}")

    start = time.perf_counter()

    def write(job: tuple[Path, int]) -> None:
        # The file's own encoder is the compression: render uncompressed, encode at ds.crf.
        write_video(job[0], ds.render(job[1], compress=False), fps=fps, codec=encoder,
                    crf=18 if ds.crf is None else ds.crf)

    # Rendering (numpy) and encoding (FFmpeg) both release the GIL for most of their time.
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for done, _ in enumerate(pool.map(write, jobs), 1):
            if done % max(1, len(jobs) // 10) == 0:
                logger.info("write_ucf101_layout: %d/%d videos", done, len(jobs))

    lists = root / SPLITS_FOLDER
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    for s in splits:
        (lists / f"trainlist0{s}.txt").write_text("".join(f"{x}\n" for x in train_lines[s]))
        (lists / f"testlist0{s}.txt").write_text("".join(f"{x}\n" for x in out.test_files[s]))
    out.seconds = time.perf_counter() - start
    logger.info("wrote %d %s videos (%s) and splits %s to %s in %.1f s", len(out.files), fmt,
                encoder, tuple(splits), root, out.seconds)
    return out


def write_class_folders(dataset_or_params: SyntheticActions | Mapping[str, Any],
                        root: str | Path, *, fmt: str = "mp4", fps: int = 25,
                        overwrite: bool = False, workers: int | None = None) -> list[str]:
    """Render every video into ``root/<ClassName>/clip_NNNN.<fmt>``: a plain folder of class
    folders (no split files, no UCF101 names), read by ``VideoFolder(root, layout="folder")``
    as any camera footage sorted by class is. Returns the paths written, relative to root."""
    ds = (dataset_or_params if isinstance(dataset_or_params, SyntheticActions)
          else SyntheticActions(**dict(dataset_or_params)))
    suffix = "." + fmt.lower().lstrip(".")
    encoder = pick_encoder(suffix)
    root = Path(root).expanduser()
    rels = [f"{ds.class_names[i % ds.num_classes]}/clip_{i:04d}{suffix}" for i in range(len(ds))]

    def write(i: int) -> None:
        path = root / rels[i]
        if overwrite or not path.exists():
            write_video(path, ds.render(i, compress=False), fps=fps, codec=encoder,
                        crf=18 if ds.crf is None else ds.crf)  # fmt: skip

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(write, range(len(ds))))
    return rels
