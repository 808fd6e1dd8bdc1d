"""write_ucf101_layout and the video encoders."""

from __future__ import annotations

import re

import numpy as np
import pytest

from deltasparse.data import (
    DatasetError,
    SyntheticActions,
    decode_video,
    write_ucf101_layout,
    write_video,
)
from deltasparse.data.encode import pick_encoder


def test_layout_files_and_split_lists(ucf, tiny_params):
    root, written, _ = ucf
    fmt = written.files[0].rsplit(".", 1)[1]
    assert written.encoder == pick_encoder("." + fmt)
    assert len(written.files) == tiny_params["num_videos"]
    lists = root / "ucfTrainTestlist"
    assert (lists / "classInd.txt").read_text() == "1 MoveRight\n2 MoveLeft\n3 MoveDown\n"
    for rel, label in zip(written.files, written.labels, strict=True):
        cls = written.class_names[label]
        assert re.fullmatch(rf"{cls}/v_{cls}_g\d\d_c\d\d\.{fmt}", rel)
        assert (root / rel).stat().st_size > 0
    for s in (1, 2, 3):
        test = (lists / f"testlist0{s}.txt").read_text().split()
        train = [line.split() for line in (lists / f"trainlist0{s}.txt").read_text().splitlines()]
        assert test == written.test_files[s]
        # 5 videos per class in 5 groups: group s is the test group of split s.
        assert {re.search(r"_g(\d\d)_", t).group(1) for t in test} == {f"{s:02d}"}
        train_files = {t[0] for t in train if "g09" not in t[0]}  # g09: the corrupt extras
        assert train_files == set(written.files) - set(test)
        for rel, label in train:
            assert written.class_names[int(label) - 1] == rel.split("/")[0]


def test_written_video_matches_rendered(ucf, tiny_params):
    root, written, _ = ucf
    ds = SyntheticActions(**tiny_params)
    for idx in (0, 8):
        # Files are class-major: file j of class c is video c + j * num_classes.
        c = written.labels[idx]
        j = idx - written.labels.index(c)
        rendered = ds.render(c + j * ds.num_classes)
        video = decode_video(root / written.files[idx])
        assert video.shape == rendered.shape
        assert np.abs(video.astype(int) - rendered).mean() < 12  # lossy 4:2:0 at 32x32


def test_params_dict_and_too_few_videos(tmp_path):
    out = write_ucf101_layout(dict(num_videos=4, num_classes=2, frames=3, size=16),
                              tmp_path / "a", fmt="avi")
    assert len(out.files) == 4
    assert out.test_files == {1: ["MoveRight/v_MoveRight_g01_c01.avi",
                                  "MoveLeft/v_MoveLeft_g01_c01.avi"]}
    with pytest.raises(DatasetError, match="split 2"):
        write_ucf101_layout(dict(num_videos=4, num_classes=2, frames=3, size=16),
                            tmp_path / "b", splits=(1, 2))
    with pytest.raises(DatasetError, match="num_videos"):
        write_ucf101_layout(dict(num_videos=3, num_classes=2, frames=3, size=16), tmp_path / "c")


@pytest.mark.parametrize("suffix", [".mkv", ".webm", ".avi", ".mp4"])
def test_write_video_roundtrip(tmp_path, suffix):
    frames = SyntheticActions(num_videos=1, num_classes=1, frames=6, size=(16, 24)).render(0)
    path = tmp_path / f"clip{suffix}"
    write_video(path, frames)
    back = decode_video(path)
    assert back.shape == frames.shape
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_write_video_rejects_bad_input(tmp_path):
    with pytest.raises(DatasetError, match="even"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(DatasetError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(DatasetError, match="extension"):
        write_video(tmp_path / "x.mov", np.zeros((2, 16, 16, 3), np.uint8))


def test_write_class_folders_is_a_plain_folder_layout(tmp_path):
    from deltasparse.data import VideoFolder, write_class_folders

    ds = SyntheticActions(num_videos=20, num_classes=4, frames=6, size=(32, 32))
    rels = write_class_folders(ds, tmp_path)
    assert len(rels) == 20 and all((tmp_path / r).is_file() for r in rels)
    assert not (tmp_path / "ucfTrainTestlist").exists()
    test = VideoFolder(tmp_path, train=False, clip_len=4)
    train = VideoFolder(tmp_path, train=True, clip_len=4)
    assert test.layout == "folder" and sorted(test.class_names) == sorted(ds.class_names)
    assert len(test.videos) + len(train.videos) == 20  # every video in exactly one split
    assert not {v.path for v in test.videos} & {v.path for v in train.videos}
