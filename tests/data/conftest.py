"""Fixtures: tiny UCF101-layout folders of real .avi / .mp4 files with corrupt files in them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from deltasparse.data import SyntheticActions, write_ucf101_layout

# 3 classes x 5 videos, 12 frames of 32x32: 5 groups per class, group 1 tested in split 1.
TINY = dict(num_videos=15, num_classes=3, frames=12, size=(32, 32), seed=0)
CORRUPT = ("MoveLeft/v_MoveLeft_g09_c01", "MoveDown/v_MoveDown_g09_c01")


def _add_corrupt(root: Path, fmt: str, real_file: str) -> list[Path]:
    """A garbage file and a truncated copy of a real video, both in trainlist01.txt."""
    garbage = root / f"{CORRUPT[0]}.{fmt}"
    garbage.write_bytes(os.urandom(4000))
    truncated = root / f"{CORRUPT[1]}.{fmt}"
    data = (root / real_file).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with open(root / "ucfTrainTestlist" / "trainlist01.txt", "a") as fh:
        fh.write(f"{CORRUPT[0]}.{fmt} 2\n{CORRUPT[1]}.{fmt} 3\n")
    return [garbage, truncated]


@pytest.fixture
def tiny_params():
    return dict(TINY)


@pytest.fixture(scope="session", params=["avi", "mp4"])
def ucf(request, tmp_path_factory):
    """(root, WrittenLayout, corrupt paths) of a written layout; treat it as read-only."""
    fmt = request.param
    root = tmp_path_factory.mktemp(f"ucf_{fmt}")
    written = write_ucf101_layout(SyntheticActions(**TINY), root, fmt=fmt, splits=(1, 2, 3))
    corrupt = _add_corrupt(root, fmt, written.files[0])
    return root, written, corrupt


@pytest.fixture
def ucf_copy(ucf, tmp_path):
    """A private copy of the ``ucf`` folder that a test may modify."""
    root, written, corrupt = ucf
    dst = tmp_path / "ucf"
    shutil.copytree(root, dst)
    return dst, written, [dst / p.relative_to(root) for p in corrupt]
