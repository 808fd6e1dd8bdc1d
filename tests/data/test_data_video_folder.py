"""VideoFolder on real .avi/.mp4 files: splits, labels, corrupt files, clip sampling."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from deltasparse.data import (
    CorruptVideoWarning,
    DatasetError,
    VideoFolder,
    decode_video,
    normalize,
)
from deltasparse.data.transforms import frames_to_clip


def _rel(ds, root):
    return sorted(v.path.relative_to(root).as_posix() for v in ds.videos)


def _expected_clip(path, idx, crop=None):
    frames = decode_video(path)[idx]
    if crop is not None:
        h, w = frames.shape[1:3]
        y, x = (h - crop[0]) // 2, (w - crop[1]) // 2
        frames = frames[:, y:y + crop[0], x:x + crop[1]]
    return normalize(frames_to_clip(frames))


def test_ucf101_split_membership_labels_and_corrupt_files(ucf):
    root, written, corrupt = ucf
    with pytest.warns(CorruptVideoWarning):
        train = VideoFolder(root, split=1, train=True, clip_len=4)
    test = VideoFolder(root, split=1, train=False, clip_len=4)
    assert train.layout == "ucf101"
    assert train.num_skipped == 2 and sorted(train.skipped) == sorted(corrupt)
    assert test.num_skipped == 0
    assert _rel(test, root) == sorted(written.test_files[1])
    assert _rel(train, root) == sorted(set(written.files) - set(written.test_files[1]))
    # Labels follow classInd.txt (1-based there, 0-based here).
    ind = (root / "ucfTrainTestlist" / "classInd.txt").read_text().split()
    class_of = {ind[i + 1]: int(ind[i]) - 1 for i in range(0, len(ind), 2)}
    assert train.class_names == written.class_names
    for v in train.videos + test.videos:
        assert v.label == class_of[v.path.parent.name]
    _, label = train[0]
    assert label == train.videos[0].label


def test_other_splits_are_disjoint_and_cover(ucf):
    root, written, _ = ucf
    for s in (2, 3):
        tr = VideoFolder(root, split=s, train=True)  # the corrupt files are only in split 1
        assert tr.num_skipped == 0
        te = VideoFolder(root, split=s, train=False)
        assert not set(_rel(tr, root)) & set(_rel(te, root))
        assert set(_rel(tr, root)) | set(_rel(te, root)) == set(written.files)
        assert _rel(te, root) == sorted(written.test_files[s])


def test_eval_clips_evenly_spaced_with_stride_and_video_index(ucf):
    root, _, _ = ucf
    ds = VideoFolder(root, train=False, clip_len=3, frame_stride=2, clips_per_video=3,
                     crop=(24, 24))
    assert len(ds) == 3 * len(ds.videos)
    assert ds.clip_video == [v for v in range(len(ds.videos)) for _ in range(3)]
    # 12 frames, span (3-1)*2+1 = 5: starts 0, 4 (3.5 rounds to even), 7.
    for k, start in enumerate([0, 4, 7]):
        clip, label = ds[3 + k]
        assert ds.video_index(3 + k) == 1 and label == ds.videos[1].label
        assert clip.shape == (3, 3, 24, 24) and clip.dtype == torch.float32
        idx = start + 2 * np.arange(3)
        torch.testing.assert_close(clip, _expected_clip(ds.videos[1].path, idx, (24, 24)))


def test_train_clips_random_within_bounds_and_seeded(ucf):
    root, _, _ = ucf
    with pytest.warns(CorruptVideoWarning):
        ds = VideoFolder(root, clip_len=4, frame_stride=3, crop=(16, 16), seed=7)
    frames = decode_video(ds.videos[0].path)
    starts = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        clip, _ = ds[0]
        assert clip.shape == (4, 3, 16, 16)
        again, _ = ds[0]
        torch.testing.assert_close(clip, again)  # same (seed, epoch, item) -> same clip
        # Find the start and crop this clip came from; they must be in bounds.
        full = normalize(frames_to_clip(frames))
        found = [(s, y, x) for s in range(0, 12 - 9) for y in range(17) for x in range(17)
                 if torch.allclose(full[s:s + 10:3, :, y:y + 16, x:x + 16], clip, atol=1e-5)]
        assert found, "train clip is not a strided in-bounds crop of the video"
        starts.add(found[0][0])
    assert len(starts) > 1


def test_short_video_is_padded_with_last_frame(ucf):
    root, _, _ = ucf
    ds = VideoFolder(root, train=False, clip_len=8, frame_stride=2)  # span 15 > 12 frames
    clip, _ = ds[0]
    idx = np.minimum(2 * np.arange(8), 11)
    torch.testing.assert_close(clip, _expected_clip(ds.videos[0].path, idx))
    torch.testing.assert_close(clip[-1], clip[-2])


def test_resize_at_decode_and_no_probe(ucf):
    root, _, _ = ucf
    ds = VideoFolder(root, train=False, resize=(20, 24), probe=False, clip_len=2)
    assert ds.num_skipped == 0 and len(ds.videos) == 3
    clip, _ = ds[0]
    assert clip.shape == (2, 3, 20, 24)


def test_lazy_failure_is_replaced_and_counted(ucf):
    root, _, corrupt = ucf
    ds = VideoFolder(root, probe=False, clip_len=2)
    assert ds.num_skipped == 0
    bad = [i for i, v in enumerate(ds.videos) if v.path in corrupt]
    with pytest.warns(CorruptVideoWarning):
        clip, label = ds[bad[0]]
    assert clip.shape[0] == 2 and ds.num_skipped >= 1 and ds.skipped[0] in corrupt


def test_plain_folder_layout(ucf, tmp_path):
    root, written, _ = ucf
    plain = tmp_path / "plain"
    for i, rel in enumerate(written.files):  # mix containers; drop the UCF group tags
        cls, name = rel.split("/")
        (plain / cls.lower()).mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, plain / cls.lower() / f"clip{i:02d}{root.joinpath(rel).suffix}")
    (plain / "notes.txt").write_text("not a class")
    tr = VideoFolder(plain, train=True, probe=False)
    te = VideoFolder(plain, train=False, probe=False)
    assert tr.layout == "folder"
    assert tr.class_names == sorted(c.lower() for c in written.class_names)
    # Each class has 5 ungrouped videos; with test_every=5 split 1 tests the 5th (k=4).
    assert [v.path.stem for v in te.videos] == ["clip14", "clip09", "clip04"]
    assert [v.label for v in te.videos] == [0, 1, 2]  # movedown, moveleft, moveright
    assert not set(_rel(tr, plain)) & set(_rel(te, plain))
    assert len(tr.videos) + len(te.videos) == len(written.files)
    again = VideoFolder(plain, train=False, probe=False)
    assert _rel(again, plain) == _rel(te, plain)  # deterministic
    other = VideoFolder(plain, train=False, split=2, probe=False)
    assert not set(_rel(other, plain)) & set(_rel(te, plain))


def test_plain_folder_keeps_ucf_groups_together(ucf):
    root, _, _ = ucf
    ds = VideoFolder(root, layout="folder", train=False, probe=False)
    assert ds.layout == "folder"
    groups = {v.path.stem.split("_")[2] for v in ds.videos}
    assert groups == {"g05"}  # sorted keys g01..g05 (+g09, corrupt): k=4 is tested in split 1


def test_errors_name_the_path(ucf_copy, tmp_path):
    root, _, _ = ucf_copy
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=str(missing)):
        VideoFolder(missing)
    (root / "ucfTrainTestlist" / "testlist01.txt").unlink()
    with pytest.raises(DatasetError, match="testlist01.txt"):
        VideoFolder(root, train=False)
    with pytest.raises(DatasetError, match="trainlist02.txt"):
        VideoFolder(root, split=2, splits_dir=_splits_without(root, tmp_path, "trainlist02.txt"))
    no_index = _splits_without(root, tmp_path, "classInd.txt")
    with pytest.raises(DatasetError, match="classInd.txt"):
        VideoFolder(root, layout="ucf101", splits_dir=no_index)


def _splits_without(root, tmp_path, name):
    d = tmp_path / f"splits_no_{name}"
    shutil.copytree(root / "ucfTrainTestlist", d)
    (d / name).unlink()
    return d


def test_empty_class_folder_is_an_error(ucf_copy, tmp_path):
    root, _, _ = ucf_copy
    folder = root / "MoveUp"
    folder.mkdir()
    with open(root / "ucfTrainTestlist" / "classInd.txt", "a") as fh:
        fh.write("4 MoveUp\n")
    with pytest.raises(DatasetError, match="MoveUp"):
        VideoFolder(root)
    plain = tmp_path / "plain"
    (plain / "a").mkdir(parents=True)
    (plain / "b").mkdir()
    shutil.copy(next((root / "MoveRight").iterdir()), plain / "a")
    with pytest.raises(DatasetError, match=str(plain / "b")):
        VideoFolder(plain)
