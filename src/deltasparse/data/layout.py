"""Find the videos of one split: the UCF101 layout with its official split files, or any
folder of class sub-folders.

**UCF101** (``layout="ucf101"``): ``root/<Class>/v_<Class>_gGG_cCC.avi`` plus the split
files ``classInd.txt`` ("1 ApplyEyeMakeup"), ``trainlist0{1,2,3}.txt``
("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1") and ``testlist0{1,2,3}.txt``, looked for in
``splits_dir``, ``root/ucfTrainTestlist``, ``root`` itself, and ``root/../ucfTrainTestlist``
(where the official zip extracts beside ``UCF-101/``). Labels come from ``classInd.txt``
(0-based here). Names are matched case-insensitively, because the official lists spell
``HandStandPushups`` where the folder is ``HandstandPushups``.

**Plain folders** (``layout="folder"``): ``root/<class>/<video>.{avi,mp4,mkv,webm}``;
classes are the sorted sub-folder names. The split is deterministic: videos are grouped by
their UCF-style group tag (``_g08_``) when the name has one, else each video is its own
group, so clips of one group never straddle train and test. Within each class the sorted
group keys are numbered ``k = 0, 1, ...``; key ``k`` belongs to the test set of split ``s``
iff ``(k + s) % test_every == 0`` (about ``1/test_every`` of the groups).

**auto** (``layout="auto"``, the default) picks UCF101 when ``classInd.txt`` is found, else
plain folders. A folder that looks like UCF101 (``v_<Class>_gNN_cNN`` file names, or a
``ucfTrainTestlist`` folder) but has no ``classInd.txt`` falls back to plain folders with a
warning: that split is not the official one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from .decode import VIDEO_EXTENSIONS
from .errors import DatasetError

logger = logging.getLogger(__name__)

SPLITS_FOLDER = "ucfTrainTestlist"
UCF101_SPLITS = (1, 2, 3)
LAYOUTS = ("auto", "ucf101", "folder")
_GROUP = re.compile(r"_g(\d+)_c\d+", re.IGNORECASE)
_UCF_NAME = re.compile(r"^v_.+_g\d+_c\d+$", re.IGNORECASE)
_warned: set[str] = set()  # one fallback warning per root and process, not one per split


@dataclass(frozen=True)
class VideoEntry:
    path: Path
    label: int


@dataclass
class SplitIndex:
    """Videos of one split. ``missing`` lists files the split names that are not on disk."""

    layout: str
    class_names: list[str]
    videos: list[VideoEntry]
    missing: list[Path] = field(default_factory=list)


def _is_video(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".")


def find_splits_dir(root: Path, splits_dir: str | Path | None = None) -> Path | None:
    """Folder holding ``classInd.txt``: ``splits_dir`` if given, else the usual places."""
    if splits_dir is not None:
        d = Path(splits_dir).expanduser()
        if not d.is_dir():
            raise DatasetError(f"splits_dir {d} does not exist or is not a folder; pass the "
                               "folder holding classInd.txt, trainlist01.txt and testlist01.txt "
                               "as --splits-dir (splits_dir=)")
        return d
    for d in (root / SPLITS_FOLDER, root, root.parent / SPLITS_FOLDER):
        if (d / "classInd.txt").is_file():
            return d
    return None


def looks_like_ucf101(root: Path) -> str | None:
    """Why ``root`` looks like a UCF101 folder (a reason for the user), or None."""
    for d in (root / SPLITS_FOLDER, root.parent / SPLITS_FOLDER):
        if d.is_dir():
            return f"{d} exists"
    for folder in sorted(p for p in root.iterdir() if p.is_dir())[:5]:
        for video in sorted(p for p in folder.iterdir() if _is_video(p))[:3]:
            if _UCF_NAME.match(video.stem):
                return f"its videos are named like UCF101's ({video.name})"
    return None


def fallback_warning(root: Path, layout: str, splits_dir: str | Path | None) -> str | None:
    """Why ``layout="auto"`` should not have fallen back to plain folders here, or None."""
    if layout != "auto" or find_splits_dir(root, splits_dir) is not None:
        return None
    why = looks_like_ucf101(root)
    if why is None:
        return None
    return (f"{root} looks like UCF101 ({why}) but no classInd.txt is in {root / SPLITS_FOLDER}, "
            f"{root} or {root.parent / SPLITS_FOLDER}: using the plain-folder split, NOT the "
            "official one; pass --splits-dir (splits_dir=) with the folder holding "
            "classInd.txt, or --layout folder (layout='folder') to accept this split")


def resolve_layout(root: Path, layout: str, splits_dir: str | Path | None) -> str:
    """``ucf101`` or ``folder`` for ``layout`` (``auto`` decides by looking for classInd.txt,
    and logs :func:`fallback_warning` once per root)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto', 'ucf101' or 'folder', got {layout!r}; pass "
                         "--layout auto, ucf101 or folder")
    if layout != "auto":
        return layout
    if find_splits_dir(root, splits_dir) is not None:
        return "ucf101"
    note = fallback_warning(root, layout, splits_dir)
    if note is not None and str(root) not in _warned:
        _warned.add(str(root))
        logger.warning("%s", note)
    return "folder"


def split_rule(layout: str, split: int, test_every: int = 5,
               splits_dir: Path | None = None) -> str:
    """One line that says how the videos of ``split`` are divided into train and test."""
    if layout == "ucf101":
        where = f" in {splits_dir}" if splits_dir is not None else ""
        return (f"UCF101 official split {split}: trainlist0{split}.txt / "
                f"testlist0{split}.txt{where}")
    return (f"class folders, split {split} of 1..{test_every}: within each class, group k "
            f"(UCF _gNN_ tag, else one video) is tested iff (k + {split}) % {test_every} == 0")


def check_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder; pass the "
                           "folder that holds one sub-folder of videos per class")
    return root


def _read_lines(path: Path) -> list[tuple[int, list[str]]]:
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _split_file(d: Path, name: str) -> Path:
    path = d / name
    if not path.is_file():
        raise DatasetError(
            f"split file {path} is missing; extract the UCF101 split archive "
            f"(UCF101TrainTestSplits-RecognitionTask.zip) so that {d} holds classInd.txt, "
            "trainlist0N.txt and testlist0N.txt, pass the folder that holds them as "
            "--splits-dir (splits_dir=), or use --layout folder (layout='folder') to split "
            "the class folders without the official lists")
    return path


def _class_index(path: Path) -> list[str]:
    names: list[str] = []
    for n, parts in _read_lines(path):
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(names) + 1:
            raise DatasetError(f"{path}, line {n}: expected '{len(names) + 1} ClassName', got "
                               f"{' '.join(parts)!r}; classInd.txt numbers classes 1, 2, ...")
        names.append(parts[1])
    if not names:
        raise DatasetError(f"{path} lists no classes; expected lines like '1 ApplyEyeMakeup'")
    return names


class _CaseInsensitiveFiles:
    """Map of relative path (lower case, '/') -> file, built on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._map: dict[str, Path] | None = None

    def find(self, rel: str) -> Path | None:
        exact = self.root / rel
        if exact.is_file():
            return exact
        if self._map is None:
            self._map = {p.relative_to(self.root).as_posix().lower(): p
                         for p in self.root.rglob("*") if p.is_file()}
        return self._map.get(rel.lower())


def ucf101_index(root: Path, split: int, train: bool,
                 splits_dir: str | Path | None = None) -> SplitIndex:
    """Videos of UCF101 split ``split`` (1-3), train or test list."""
    if split not in UCF101_SPLITS:
        raise DatasetError(f"split {split} does not exist in the UCF101 layout of {root}; its "
                           "official splits are 1, 2 and 3: pass --split 1, 2 or 3 (or "
                           "--layout folder, whose splits are 1..5)")
    d = find_splits_dir(root, splits_dir)
    if d is None:
        d = root / SPLITS_FOLDER  # for the error message
    names = _class_index(_split_file(d, "classInd.txt"))
    by_lower = {name.lower(): i for i, name in enumerate(names)}
    _check_class_folders(root, names)
    list_path = _split_file(d, f"{'train' if train else 'test'}list0{split}.txt")
    files = _CaseInsensitiveFiles(root)
    videos: list[VideoEntry] = []
    missing: list[Path] = []
    for n, parts in _read_lines(list_path):
        rel = parts[0].replace("\\", "/")
        cls = rel.split("/")[0].lower()
        if "/" not in rel or cls not in by_lower:
            raise DatasetError(f"{list_path}, line {n}: {rel!r} is not '<Class>/<video>' with a "
                               f"class from classInd.txt; check that the split files match")
        label = by_lower[cls]
        if len(parts) > 1 and parts[1].isdigit() and int(parts[1]) - 1 != label:
            raise DatasetError(f"{list_path}, line {n}: label {parts[1]} disagrees with "
                               f"classInd.txt ({names[label]} is {label + 1})")
        path = files.find(rel)
        if path is None:
            missing.append(root / rel)
        else:
            videos.append(VideoEntry(path, label))
    return SplitIndex("ucf101", names, videos, missing)


def _check_class_folders(root: Path, names: list[str]) -> None:
    folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    for name in names:
        folder = folders.get(name.lower())
        if folder is None:
            raise DatasetError(f"class folder {root / name} (listed in classInd.txt) is "
                               "missing; finish extracting the dataset or fix the root path")
        if not any(_is_video(p) for p in folder.iterdir()):
            raise DatasetError(f"class folder {folder} contains no videos "
                               f"({', '.join(VIDEO_EXTENSIONS)}); add its videos or remove "
                               "the class from classInd.txt")


def _group_key(path: Path) -> str:
    m = _GROUP.search(path.stem)
    return f"g{int(m.group(1)):04d}" if m else path.name


def folder_index(root: Path, split: int, train: bool, test_every: int = 5) -> SplitIndex:
    """Videos of a class-folder tree, split deterministically (see the module docstring)."""
    if test_every < 2:
        raise ValueError(f"test_every must be >= 2, got {test_every}")
    if not 1 <= split <= test_every:
        raise DatasetError(f"split {split} does not exist in the class-folder layout of {root}; "
                           f"its splits are 1..{test_every}: pass --split 1 to {test_every}")
    class_dirs = sorted(p for p in root.iterdir()
                        if p.is_dir() and not p.name.startswith(".") and p.name != SPLITS_FOLDER)
    if not class_dirs:
        raise DatasetError(f"{root} has no class sub-folders; expected "
                           f"{root}/<class>/<video>.mp4 (or .avi, .mkv, .webm)")
    videos: list[VideoEntry] = []
    for label, folder in enumerate(class_dirs):
        files = sorted(p for p in folder.iterdir() if _is_video(p))
        if not files:
            raise DatasetError(f"class folder {folder} contains no videos "
                               f"({', '.join(VIDEO_EXTENSIONS)}); add videos or remove it")
        keys = sorted({_group_key(p) for p in files})
        test_keys = {k for i, k in enumerate(keys) if (i + split) % test_every == 0}
        videos += [VideoEntry(p, label) for p in files if (_group_key(p) in test_keys) != train]
    return SplitIndex("folder", [p.name for p in class_dirs], videos)
