"""The C++ engine ops (``torch.ops.deltasparse``) against the reference, and their build cache.

``quant_commit`` (bias -> clamp -> quantise -> compare -> write back) is checked against the
same steps written in torch ops, ``depthwise_rows`` against the ``reference`` backend, over
thresholds modes x bias x compare x row selections x shapes, with fresh random inputs and the
rows that must not be written poisoned. The build key is tested without compiling.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from deltasparse.engine.kernels import ConvSpec, CppBackend, ReferenceBackend, WindowGeom, cpp
from deltasparse.engine.kernels.geometry import out_size

needs_cpp = pytest.mark.skipif(not CppBackend.available(), reason="the C++ op does not build here")
POISON = 1234.5


# -- the build cache ------------------------------------------------------------------------------
def test_build_key_separates_torch_installs():
    a = cpp.build_key("2.13.0", "/venvs/a/lib/python3.11/site-packages/torch", "3.11")
    b = cpp.build_key("2.13.0", "/venvs/b/lib/python3.11/site-packages/torch", "3.11")
    assert a != b
    assert a == cpp.build_key("2.13.0", "/venvs/a/lib/python3.11/site-packages/torch", "3.11")
    assert a != cpp.build_key("2.12.0", "/venvs/a/lib/python3.11/site-packages/torch", "3.11")
    assert a != cpp.build_key("2.13.0", "/venvs/a/lib/python3.11/site-packages/torch", "3.12")
    assert len(a) == 16 and int(a, 16) >= 0


def test_build_dir_follows_the_running_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTASPARSE_CACHE", str(tmp_path))
    here = cpp.build_dir()
    assert here.parent == tmp_path / "cpp"
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    other = cpp.build_dir()
    assert other.parent == tmp_path / "cpp" and other != here
    monkeypatch.delenv("DELTASPARSE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpp.build_dir().parent == tmp_path / "xdg" / "deltasparse" / "cpp"


def test_load_builds_into_the_keyed_folder_and_announces_it(monkeypatch, tmp_path, caplog):
    import torch.utils.cpp_extension as ext

    seen = []

    def fake_load_inline(**kw):
        seen.append(kw)
        raise OSError("stop before compiling")

    monkeypatch.setenv("DELTASPARSE_CACHE", str(tmp_path))
    monkeypatch.delenv("DELTASPARSE_NO_CPP", raising=False)
    monkeypatch.setattr(ext, "load_inline", fake_load_inline)
    monkeypatch.setattr(cpp, "_state", {})
    with caplog.at_level(logging.WARNING, logger=cpp.__name__):
        assert cpp.load() is None
    (kw,) = seen
    assert kw["build_directory"] == str(cpp.build_dir())
    assert cpp.build_dir().is_dir() and cpp.build_dir().parent == tmp_path / "cpp"
    assert any("building the C++ engine op" in r.getMessage() for r in caplog.records)
    assert cpp.build_error() == "OSError: stop before compiling"
    # built before: no announcement
    (cpp.build_dir() / f"{kw['name']}.so").write_bytes(b"")
    monkeypatch.setattr(cpp, "_state", {})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=cpp.__name__):
        cpp.load()
    assert not any("building" in r.getMessage() for r in caplog.records)


# -- quant_commit ---------------------------------------------------------------------------------
def _spec_commit(z, buf, rows, bias, lo, hi, thr, mode, hw, compare):
    """The epilogue in plain torch ops (float32, round half to even), on copies."""
    buf = buf.clone()
    v = z.clone()
    if bias.numel():
        v = v + bias
    v = torch.where(v < lo, torch.full_like(v, lo), v)
    v = torch.where(v > hi, torch.full_like(v, hi), v)
    r = rows if rows.numel() else torch.arange(z.shape[0])
    if mode == 1:
        v = torch.round(v / thr[0]) * thr[0]
    elif mode == 2:
        v = torch.round(v / thr) * thr
    elif mode == 3:
        t = thr.view(hw, -1)[r % hw]
        v = torch.round(v / t) * t
    changed = (v != buf[r]).any(1) if compare else torch.zeros(len(r), dtype=torch.bool)
    buf[r] = v
    return changed, buf


@needs_cpp
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("compare", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 7), (3, 6, 33)])  # (B, H*W, C)
def test_quant_commit_matches_the_torch_spec(mode, bias, compare, sparse, shape):
    b, hw, c = shape
    p = b * hw
    g = torch.Generator().manual_seed(hash((mode, bias, compare, sparse, shape)) % 2**31)
    if sparse:
        rows = torch.randperm(p, generator=g)[: max(1, p // 2)].sort().values
    else:
        rows = torch.empty(0, dtype=torch.long)
    n = rows.numel() or p
    z = 3 * torch.randn(n, c, generator=g)
    z[0, 0] = 0.25  # a tie: round half to even
    thr = {0: torch.empty(0), 1: torch.tensor([0.5]), 2: 0.1 + torch.rand(c, generator=g),
           3: 0.1 + torch.rand(hw * c, generator=g)}[mode]  # fmt: skip
    bs = torch.randn(c, generator=g) if bias else torch.empty(0)
    lo, hi = (0.0, 6.0) if mode % 2 else (-math.inf, math.inf)
    buf = torch.full((p + 1, c), POISON)  # rows that must not be written keep the poison
    want_changed, want_buf = _spec_commit(z, buf, rows, bs, lo, hi, thr, mode, hw, compare)
    r = rows if sparse else torch.arange(p)
    keep = torch.rand(len(r), generator=g) < 0.5  # half the rows already hold the new value
    buf[r[keep]] = want_buf[r[keep]]
    want_changed = want_changed & ~keep if compare else want_changed
    expect_buf = want_buf.clone()
    z_before = z.clone()
    changed = torch.ops.deltasparse.quant_commit(z, buf, rows, bs, lo, hi, thr, mode, hw, compare)
    assert torch.equal(changed, want_changed)
    assert torch.equal(buf, expect_buf)  # written rows equal the spec, the others untouched
    assert torch.equal(z, z_before)
    assert float(buf[-1].max()) == POISON  # the padding row is never written


@needs_cpp
def test_quant_commit_refuses_float64():
    z, buf = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
    e = torch.empty(0)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.deltasparse.quant_commit(z, buf, e.long(), e, 0.0, 1.0, e, 0, 1, True)


# -- depthwise_rows -------------------------------------------------------------------------------
@needs_cpp
@pytest.mark.parametrize("k,s,pad,d", [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1),
                                        (3, 1, 2, 2), (3, 2, 0, 1)])  # fmt: skip
@pytest.mark.parametrize("c", [2, 8, 19])
@pytest.mark.parametrize("frac", [0.1, 1.0])
def test_depthwise_rows_matches_reference(k, s, pad, d, c, frac):
    g = torch.Generator().manual_seed(hash((k, s, pad, d, c, frac)) % 2**31)
    b, h, w = 2, 9, 7
    ho, wo = out_size(h, k, s, pad, d), out_size(w, k, s, pad, d)
    geom = WindowGeom(b, (h, w), (ho, wo), (k, k), (s, s), (pad, pad), (d, d))
    weight = torch.randn(c, 1, k, k, generator=g)
    spec = ConvSpec.from_weight(geom, weight, None, c)
    assert spec.depthwise
    x = torch.randn(geom.p_in + 1, c, generator=g)
    x[-1] = 0  # the padding row
    n = max(1, int(geom.p_out * frac))
    rows = torch.randperm(geom.p_out, generator=g)[:n].sort().values
    want = ReferenceBackend().depthwise(x, spec, rows)
    got = torch.ops.deltasparse.depthwise_rows(x, geom.taps, spec.w_taps, rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(CppBackend().depthwise(x, spec, rows), want, rtol=1e-5, atol=1e-5)
    empty = torch.ops.deltasparse.depthwise_rows(x, geom.taps, spec.w_taps, rows[:0])
    assert empty.shape == (0, c)
