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


# -- checks that turn wrong-but-plausible data into errors or warnings -----------------------
def test_class_whose_videos_are_all_corrupt_is_an_error_naming_its_folder(ucf_copy):
    root, written, _ = ucf_copy
    folder = root / "MoveRight"
    test_files = set(written.test_files[1])
    for rel in written.files:  # every training video of one class becomes garbage
        if rel.startswith("MoveRight/") and rel not in test_files:
            (root / rel).write_bytes(b"not a video" * 100)
    with pytest.warns(CorruptVideoWarning), pytest.raises(DatasetError) as err:
        VideoFolder(root, train=True, clip_len=2)
    msg = str(err.value)
    assert f"class folder {folder} has no readable video" in msg
    assert "train split 1" in msg and "replace them, or remove the class" in msg
    assert VideoFolder(root, train=False, clip_len=2).class_counts() == [1, 1, 1]


def test_plain_folder_class_with_only_corrupt_videos_is_an_error(ucf, tmp_path):
    root, written, _ = ucf
    plain = tmp_path / "plain"
    for cls in ("a", "b"):
        (plain / cls).mkdir(parents=True)
    for i, rel in enumerate(written.files[:6]):
        shutil.copy(root / rel, plain / "a" / f"clip{i}{(root / rel).suffix}")
    for i in range(6):
        (plain / "b" / f"clip{i}.mp4").write_bytes(b"\0" * 500)
    with pytest.warns(CorruptVideoWarning), pytest.raises(DatasetError,
                                                          match=f"class folder {plain / 'b'} "):
        VideoFolder(plain, train=True)


def test_frame_counts_are_learnt_while_checking(ucf, tmp_path):
    root, _, _ = ucf
    probed = VideoFolder(root, train=False)
    assert probed.frame_counts == [12] * len(probed.videos) and probed.longest_video == 12
    stepped = VideoFolder(root, train=False, temporal_step=5)
    assert stepped.frame_counts == [3] * len(stepped.videos)  # frames 0, 5, 10
    cached = VideoFolder(root, train=False, temporal_step=5, cache_dir=tmp_path / "c")
    assert cached.frame_counts == [3] * len(cached.videos)
    unknown = VideoFolder(root, train=False, probe=False)
    assert unknown.longest_video == 0


def test_videos_shorter_than_the_clip_are_logged(ucf, caplog):
    root, _, _ = ucf
    with caplog.at_level("WARNING", logger="deltasparse.data.video_folder"):
        VideoFolder(root, train=False, clip_len=6, frame_stride=2)  # span 11 <= 12: fits
    assert not caplog.records
    with caplog.at_level("WARNING", logger="deltasparse.data.video_folder"):
        VideoFolder(root, train=False, clip_len=8, frame_stride=2)  # span 15 > 12
    assert "3 of 3 videos" in caplog.text and "fewer than 15 frames" in caplog.text


def test_ucf101_folder_without_class_index_warns_about_the_fallback(ucf_copy, caplog):
    root, written, _ = ucf_copy
    (root / "ucfTrainTestlist" / "classInd.txt").unlink()
    with caplog.at_level("WARNING", logger="deltasparse.data.layout"):
        ds = VideoFolder(root, train=False, probe=False)
    assert ds.layout == "folder"
    assert "looks like UCF101" in caplog.text and "classInd.txt" in caplog.text
    assert "--splits-dir" in ds.layout_warning and "--layout folder" in ds.layout_warning
    # Only the folder of split lists gone: the v_<Class>_gNN_cNN names still give it away.
    shutil.rmtree(root / "ucfTrainTestlist")
    again = VideoFolder(root, train=False, probe=False)
    assert "named like UCF101's" in again.layout_warning
    # Asked for explicitly, the plain-folder split is no surprise.
    assert VideoFolder(root, train=False, probe=False, layout="folder").layout_warning is None


def test_plain_folders_with_other_names_do_not_warn(ucf, tmp_path, caplog):
    root, written, _ = ucf
    plain = tmp_path / "plain"
    for i, rel in enumerate(written.files):
        (plain / rel.split("/")[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, plain / rel.split("/")[0] / f"clip{i}{(root / rel).suffix}")
    with caplog.at_level("WARNING", logger="deltasparse.data.layout"):
        ds = VideoFolder(plain, train=False, probe=False)
    assert ds.layout_warning is None and not caplog.records
    assert "(k + 1) % 5 == 0" in ds.split_rule


def test_splits_each_layout_supports(ucf):
    root, _, _ = ucf
    with pytest.raises(DatasetError, match="official splits are 1, 2 and 3"):
        VideoFolder(root, split=4, probe=False)
    ds = VideoFolder(root, split=4, layout="folder", train=False, probe=False)
    assert ds.split == 4 and "split 4 of 1..5" in ds.split_rule
    with pytest.raises(DatasetError, match="splits are 1..5"):
        VideoFolder(root, split=6, layout="folder", probe=False)
    assert VideoFolder(root, train=False, probe=False).split_rule.startswith(
        "UCF101 official split 1: trainlist01.txt / testlist01.txt")


def test_missing_split_file_names_the_cli_options(ucf_copy):
    root, _, _ = ucf_copy
    (root / "ucfTrainTestlist" / "testlist01.txt").unlink()
    with pytest.raises(DatasetError) as err:
        VideoFolder(root, train=False)
    assert "--splits-dir" in str(err.value) and "--layout folder" in str(err.value)
