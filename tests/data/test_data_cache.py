"""Frame cache: decode once, reuse across runs, invalidate on change, write atomically."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import deltasparse.data.decode as decode_mod
from deltasparse.data import CorruptVideoWarning, FrameCache, VideoDecodeError, VideoFolder


def _counting_decoder(monkeypatch):
    calls = []
    real = decode_mod.decode_video

    def counted(path, **kw):
        calls.append(path)
        return real(path, **kw)

    monkeypatch.setattr(decode_mod, "decode_video", counted)
    return calls


def _forbid_decoding(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("decoded although the cache should have been used")

    monkeypatch.setattr(decode_mod, "decode_video", boom)
    monkeypatch.setattr(decode_mod, "probe_video", boom)


def test_second_run_reads_cache_without_decoding(ucf_copy, tmp_path, monkeypatch):
    root, _, corrupt = ucf_copy
    cache = tmp_path / "cache"
    calls = _counting_decoder(monkeypatch)
    with pytest.warns(CorruptVideoWarning):
        first = VideoFolder(root, cache_dir=cache, resize=16, clip_len=4, seed=0)
    assert len(calls) == len(first.videos) + 2  # every video once, corrupt ones included
    ref = [first[i][0] for i in range(len(first))]

    _forbid_decoding(monkeypatch)
    with pytest.warns(CorruptVideoWarning):  # bad files are remembered, not re-decoded
        second = VideoFolder(root, cache_dir=cache, resize=16, clip_len=4, seed=0)
    assert sorted(second.skipped) == sorted(corrupt) == sorted(first.skipped)
    for i in range(len(second)):
        clip, _ = second[i]
        assert clip.shape == (4, 3, 16, 16)
        torch.testing.assert_close(clip, ref[i])
    entries = list((cache / "short16-step1").iterdir())
    assert sum(p.suffix == ".npy" for p in entries) == len(first.videos)
    assert sum(p.suffix == ".bad" for p in entries) == 2
    assert not [p for p in entries if ".tmp" in p.name]


def test_changed_file_is_decoded_again(ucf_copy, tmp_path, monkeypatch):
    root, written, _ = ucf_copy
    cache = tmp_path / "cache"
    with pytest.warns(CorruptVideoWarning):
        VideoFolder(root, cache_dir=cache, clip_len=2)
    changed = root / written.files[1]
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    calls = _counting_decoder(monkeypatch)
    with pytest.warns(CorruptVideoWarning):
        VideoFolder(root, cache_dir=cache, clip_len=2)
    assert calls == [changed]
    # Same for a change of size (a re-encoded file); the stale entry is removed.
    with open(changed, "ab") as fh:
        fh.write(b"\0" * 16)
    calls.clear()
    with pytest.warns(CorruptVideoWarning):
        VideoFolder(root, cache_dir=cache, clip_len=2)
    assert calls == [changed]
    stem_entries = [p for p in (cache / "orig-step1").iterdir() if p.name.startswith(changed.stem)]
    assert len(stem_entries) == 1


def test_cache_settings_get_their_own_entries(ucf_copy, tmp_path):
    root, _, _ = ucf_copy
    cache = tmp_path / "cache"
    a = VideoFolder(root, train=False, cache_dir=cache, resize=16)
    b = VideoFolder(root, train=False, cache_dir=cache, resize=(8, 12), temporal_step=2)
    assert a[0][0].shape == (16, 3, 16, 16)
    assert b[0][0].shape == (16, 3, 8, 12)  # 6 decoded frames, padded to clip_len
    assert {p.name for p in cache.iterdir()} == {"short16-step1", "8x12-step2"}


def test_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    src = tmp_path / "video.avi"
    src.write_bytes(b"x")
    cache = FrameCache(tmp_path / "cache")

    def dies(fh, arr):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        cache.store(src, np.zeros((2, 4, 4, 3), np.uint8))
    assert list(cache.dir.iterdir()) == []
    assert cache.load(src) is None
    monkeypatch.undo()
    frames = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    cache.store(src, frames)
    loaded = cache.load(src)
    assert isinstance(loaded, np.memmap) and np.array_equal(loaded, frames)


def test_failed_decode_is_remembered(tmp_path):
    src = tmp_path / "bad.mp4"
    src.write_bytes(os.urandom(1000))
    cache = FrameCache(tmp_path / "cache")
    with pytest.raises(VideoDecodeError, match="bad.mp4"):
        cache.get(src, decode_mod.decode_video)
    assert cache.bad_reason(src)
    with pytest.raises(VideoDecodeError, match="remembered"):
        cache.get(src, lambda p: pytest.fail("decoded a known-bad file"))


def test_ast_parse_is_serialised_for_threaded_cache_loads(tmp_path):
    """np.load parses .npy headers with ast; the cache's loader threads and the main thread
    must not build ASTs at the same time (python/cpython#106905: a SystemError in a demo)."""
    import ast
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    import deltasparse.data.cache  # noqa: F401  (installs the wrapper)

    if sys.version_info < (3, 13):
        assert getattr(ast.parse, "_deltasparse_serialised", False)
    arrays = [np.full((2, 3, 4, 3), i, dtype=np.uint8) for i in range(8)]
    paths = []
    for i, a in enumerate(arrays):
        p = tmp_path / f"{i}.npy"
        np.save(p, a)
        paths.append(p)
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda p: np.load(p, mmap_mode="r"), paths * 50))
    assert all(np.array_equal(x, arrays[i % 8]) for i, x in enumerate(loaded))
    assert ast.literal_eval("{'shape': (2, 3)}") == {"shape": (2, 3)}
