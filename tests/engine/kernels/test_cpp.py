"""The C++ engine ops (``torch.ops.deltasparse``) against the reference, and their build cache.

``quant_commit`` (bias -> clamp -> quantise or hysteresis gate -> compare -> write back) is
checked against the same steps written in torch ops, ``window_rows`` (depthwise conv and max
pooling at listed or all rows) against the ``reference`` backend, over threshold modes x gates x bias x compare x row selections x
shapes, with fresh random inputs and the rows that must not be written poisoned. The build key is tested without compiling.
"""

from __future__ import annotations

import logging
import math
import zlib

import pytest
import torch

from deltasparse.engine.kernels import (
    ConvSpec,
    CppBackend,
    PoolSpec,
    ReferenceBackend,
    WindowGeom,
    cpp,
)
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
    # -march=native: another CPU model (a cache shared between machines) builds its own copy
    path = "/venvs/a/lib/python3.11/site-packages/torch"
    assert cpp.build_key("2.13.0", path, "3.11", cpu="AMD EPYC") != cpp.build_key(
        "2.13.0", path, "3.11", cpu="Intel Xeon")
    assert cpp.build_key("2.13.0", path, "3.11", openmp=False) != a


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
    # with OpenMP first, then (that build failing) without it, into another keyed folder
    kw, plain = seen
    assert "-fopenmp" in kw["extra_cflags"] and "-fopenmp" in kw["extra_ldflags"]
    assert "-fopenmp" not in plain["extra_cflags"] and not plain["extra_ldflags"]
    assert plain["build_directory"] == str(cpp.build_dir(openmp=False)) != kw["build_directory"]
    assert any("did not build with OpenMP" in r.getMessage() for r in caplog.records)
    assert kw["build_directory"] == str(cpp.build_dir())
    assert cpp.build_dir().is_dir() and cpp.build_dir().parent == tmp_path / "cpp"
    assert any("building the C++ engine op" in r.getMessage() for r in caplog.records)
    assert cpp.build_error() == "OSError: stop before compiling"
    # built before: no announcement
    for folder in (cpp.build_dir(), cpp.build_dir(openmp=False)):
        (folder / f"{kw['name']}.so").write_bytes(b"")
    monkeypatch.setattr(cpp, "_state", {})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=cpp.__name__):
        cpp.load()
    assert not any("building" in r.getMessage() for r in caplog.records)


# -- quant_commit ---------------------------------------------------------------------------------
def _spec_commit(z, buf, rows, bias, lo, hi, thr, mode, hw, compare, gate=0):
    """The epilogue in plain torch ops (float32, round half to even), on a copy of ``buf``.

    gate 0: grid quantiser; 1: scalar hysteresis (a scalar takes v where |v - old| > t);
    2: pixel hysteresis (the whole row takes v when any scalar would). Returns
    ``(changed rows mask, new buf, pre-gate values)``."""
    buf = buf.clone()
    v = z.clone()
    if bias.numel():
        v = v + bias
    v = torch.where(v < lo, torch.full_like(v, lo), v)
    v = torch.where(v > hi, torch.full_like(v, hi), v)
    pre = v.clone()
    r = rows if rows.numel() else torch.arange(z.shape[0])
    t = {0: None, 1: thr[:1], 2: thr, 3: thr.view(hw, -1)[r % hw] if mode == 3 else None}[mode]
    old = buf[r]
    if gate == 0:
        if t is not None:
            v = torch.round(v / t) * t
        changed = (v != old).any(1) if compare else torch.zeros(len(r), dtype=torch.bool)
    else:
        send = (v - old).abs() > t
        if gate == 2:
            send = send.any(1, keepdim=True).expand_as(v)
        v = torch.where(send, v, old)
        changed = send.any(1)  # "something was sent", compared or not
    buf[r] = v
    return changed, buf, pre


@needs_cpp
@pytest.mark.parametrize("mode,gate", [(0, 0), (1, 0), (2, 0), (3, 0), (1, 1), (2, 1), (3, 1),
                                       (1, 2), (2, 2), (3, 2)])  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("compare", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 7), (3, 6, 33)])  # (B, H*W, C)
def test_quant_commit_matches_the_torch_spec(mode, gate, bias, compare, sparse, shape):
    b, hw, c = shape
    p = b * hw
    g = torch.Generator().manual_seed(hash((mode, gate, bias, compare, sparse, shape)) % 2**31)
    if sparse:
        rows = torch.randperm(p, generator=g)[: max(1, p // 2)].sort().values
    else:
        rows = torch.empty(0, dtype=torch.long)
    r = rows if sparse else torch.arange(p)
    n = len(r)
    z = 3 * torch.randn(n, c, generator=g)
    z[0, 0] = 0.25  # a tie: round half to even (without bias)
    thr = {0: torch.empty(0), 1: torch.tensor([0.5]), 2: 0.1 + torch.rand(c, generator=g),
           3: 0.1 + torch.rand(hw * c, generator=g)}[mode]  # fmt: skip
    bs = torch.randn(c, generator=g) if bias else torch.empty(0)
    lo, hi = (0.0, 6.0) if mode % 2 else (-math.inf, math.inf)
    buf = torch.full((p + 1, c), POISON)  # rows that must not be written keep the poison
    # the stored values: new values, values near them (hysteresis keeps those) and others
    _, new, pre = _spec_commit(z, buf, rows, bs, lo, hi, thr, mode, hw, compare, gate)
    near = pre + 0.05 * torch.randn(n, c, generator=g)
    far = 10 * torch.randn(n, c, generator=g)
    pick = (torch.arange(n) % 3)[torch.randperm(n, generator=g)].unsqueeze(1)  # all 3 kinds
    buf[r] = torch.where(pick == 0, new[r], torch.where(pick == 1, near, far))
    want_changed, want_buf, _ = _spec_commit(z, buf, rows, bs, lo, hi, thr, mode, hw, compare,
                                             gate)  # fmt: skip
    z_before = z.clone()
    changed = torch.ops.deltasparse.quant_commit(z, buf, rows, bs, lo, hi, thr, mode, hw,
                                                 compare, gate)  # fmt: skip
    assert torch.equal(changed, want_changed)
    assert torch.equal(buf, want_buf)  # written rows equal the spec, the others untouched
    assert torch.equal(z, z_before)
    assert float(buf[-1].max()) == POISON  # the padding row is never written
    if n > 2 and (compare or gate):
        assert 0 < int(changed.sum()) < n  # the draw exercised both outcomes


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
@pytest.mark.parametrize("c", [2, 8, 19, 48])  # 48: 3x3 in blocks of 16 channels (dw9_rows)
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
    got = torch.ops.deltasparse.window_rows(x, geom.taps, spec.w_taps, rows, False, 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(CppBackend().depthwise(x, spec, rows), want, rtol=1e-5, atol=1e-5)
    empty = torch.ops.deltasparse.window_rows(x, geom.taps, spec.w_taps, rows[:0], False, 0)
    assert empty.shape == (0, c)
    every = CppBackend().depthwise(x, spec, None)  # every row: the same kernel
    torch.testing.assert_close(every, ReferenceBackend().depthwise(x, spec, None), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    assert torch.equal(every[rows], got)  # bit for bit as the sparse rows


# -- max pooling rows ------------------------------------------------------------------------------
@needs_cpp
@pytest.mark.parametrize("k,s,pad,ceil", [(2, 2, 0, False), (3, 2, 1, False), (3, 2, 1, True),
                                           (3, 1, 1, False), (2, 2, 0, True)])  # fmt: skip
@pytest.mark.parametrize("c", [3, 64, 70])
def test_max_pool_rows_match_reference(k, s, pad, ceil, c):
    g = torch.Generator().manual_seed(hash((k, s, pad, ceil, c)) % 2**31)
    b, h, w = 2, 9, 7
    ho, wo = out_size(h, k, s, pad, 1, ceil), out_size(w, k, s, pad, 1, ceil)
    geom = WindowGeom(b, (h, w), (ho, wo), (k, k), (s, s), (pad, pad), (1, 1))
    spec = PoolSpec(geom, "max", ceil)
    x = torch.randn(geom.p_in + 1, c, generator=g) - 3.0  # mostly negative: padding must not win
    x[-1] = 0  # the padding row
    x[5, 1] = float("nan")  # a NaN wins its windows, as in F.max_pool2d
    ref = ReferenceBackend().pool(x, spec, None)
    every = CppBackend().pool(x, spec, None)
    torch.testing.assert_close(every, ref, rtol=0, atol=0, equal_nan=True)
    rows = torch.randperm(geom.p_out, generator=g)[: max(1, geom.p_out // 3)].sort().values
    torch.testing.assert_close(CppBackend().pool(x, spec, rows), ref[rows], rtol=0, atol=0,
                               equal_nan=True)  # fmt: skip


# -- fused compute + commit (gemm_commit, window_commit), gemm_rows, reachable -----------------
def _spec_rows(kind, x, geom, w, rows):
    """The op's values at ``rows`` (all rows: None) in float64 torch ops: the reference."""
    r = torch.arange(geom.p_out) if rows is None else rows
    xd = x.double()
    if kind == "linear":
        return xd[r] @ w.double()
    g = xd[geom.taps[r]]  # (n, k2, C_in); padding taps read the zero row
    if kind == "conv":
        return g.reshape(len(r), -1) @ w.double()
    if kind == "depthwise":
        return (g * w.double()).sum(1)
    valid = geom.valid[r].unsqueeze(-1)
    return g.masked_fill(~valid, -math.inf).amax(1)  # max pooling


@needs_cpp
@pytest.mark.parametrize("kind", ["linear", "conv", "depthwise", "max"])
@pytest.mark.parametrize("mode,gate", [(0, 0), (2, 0), (1, 1), (3, 1), (2, 2), (3, 2)])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("c_in,c_out", [(3, 5), (40, 70), (32, 48)])  # 32: dw9_rows
@pytest.mark.parametrize("b", [3, 40])  # 40: many blocks of rows, over both threads
def test_fused_commit_matches_compute_then_quant_commit(kind, mode, gate, sparse, c_in, c_out, b):
    key = repr((kind, mode, gate, sparse, c_in, c_out, b)).encode()
    g = torch.Generator().manual_seed(zlib.crc32(key))
    h, w = 9, 7
    if kind == "linear":
        geom = WindowGeom(b, (h, w), (h, w), (1, 1), (1, 1), (0, 0), (1, 1))
    else:
        geom = WindowGeom(b, (h, w), (5, 4), (3, 3), (2, 2), (1, 1), (1, 1))
    if kind in ("depthwise", "max"):
        c_out = c_in
    x = torch.randn(geom.p_in + 1, c_in, generator=g)
    x[-1] = 0
    k_in = c_in * (geom.k2 if kind == "conv" else 1)
    wt = {"linear": torch.randn(c_in, c_out, generator=g), "conv": torch.randn(k_in, c_out,
          generator=g), "depthwise": torch.randn(geom.k2, c_in, generator=g),
          "max": torch.empty(0)}[kind]  # fmt: skip
    bias = torch.randn(c_out, generator=g) if kind != "max" else torch.empty(0)
    hw = geom.out_hw[0] * geom.out_hw[1]
    thr = {0: torch.empty(0), 1: torch.tensor([0.5]), 2: 0.1 + torch.rand(c_out, generator=g),
           3: 0.1 + torch.rand(hw * c_out, generator=g)}[mode]  # fmt: skip
    lo, hi = (0.0, 6.0) if mode % 2 else (-math.inf, math.inf)
    rows = (torch.randperm(geom.p_out, generator=g)[: geom.p_out // 2].sort().values if sparse
            else torch.empty(0, dtype=torch.long))  # fmt: skip
    buf = torch.full((geom.p_out + 1, c_out), POISON)
    r = rows if sparse else torch.arange(geom.p_out)
    buf[r] = 3 * torch.randn(len(r), c_out, generator=g)
    taps = torch.empty(0, dtype=torch.long) if kind == "linear" else geom.taps
    ops = torch.ops.deltasparse
    # half the rows store what this frame commits (unchanged), the others other values
    z0 = (ops.gemm_rows(x, taps, r, False, wt, geom.p_out) if kind in ("linear", "conv")
          else ops.window_rows(x, geom.taps, wt, r, False, int(kind == "max")))
    settled = buf.clone()
    ops.quant_commit(z0, settled, r, bias, lo, hi, thr, mode, hw, True, gate)
    keep = torch.rand(len(r), 1, generator=g) < 0.5
    buf[r] = torch.where(keep, settled[r], buf[r])
    for compare in (True, False):
        z = (ops.gemm_rows(x, taps, rows, not sparse, wt, geom.p_out) if kind in ("linear", "conv")
             else ops.window_rows(x, geom.taps, wt, rows, not sparse, int(kind == "max")))
        torch.testing.assert_close(z.double(), _spec_rows(kind, x, geom, wt, rows if sparse
                                   else None), rtol=1e-5, atol=1e-4)  # fmt: skip
        want_buf = buf.clone()
        mask = ops.quant_commit(z, want_buf, rows, bias, lo, hi, thr, mode, hw, compare, gate)
        got_buf = buf.clone()
        if kind in ("linear", "conv"):
            got = ops.gemm_commit(x, taps, rows, not sparse, wt, bias, got_buf, lo, hi, thr, mode,
                                  hw, compare, gate)  # fmt: skip
        else:
            got = ops.window_commit(x, geom.taps, wt, rows, not sparse, int(kind == "max"), bias,
                                    got_buf, lo, hi, thr, mode, hw, compare, gate)  # fmt: skip
        assert torch.equal(got_buf, want_buf)  # bit for bit: the same kernel, the same epilogue
        if compare:
            assert torch.equal(got, r[mask])
            assert 0 < got.numel() < len(r)  # both outcomes drawn
        else:
            assert got.numel() == 0  # the first frame: no list


@needs_cpp
@pytest.mark.parametrize("mode,gate", [(0, 0), (2, 0), (2, 1), (2, 2)])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("b,s,c", [(3, 5, 7), (40, 16, 48)])  # 40: blocks over both threads
def test_gpool_commit_matches_mean_then_quant_commit(mode, gate, sparse, b, s, c):
    """Global average pooling fused with the epilogue == each sample's rows summed in order
    in float32 and divided by S (within rounding of torch's mean), then quant_commit: bit for
    bit."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((mode, gate, sparse, b, s, c)).encode()))
    x = torch.randn(b * s + 1, c, generator=g)
    x[-1] = 0
    thr = {0: torch.empty(0), 2: 0.05 + 0.1 * torch.rand(c, generator=g)}[mode]
    lo, hi = (0.0, 6.0) if gate else (-math.inf, math.inf)
    rows = (torch.randperm(b, generator=g)[: max(2, b // 2)].sort().values if sparse
            else torch.empty(0, dtype=torch.long))  # fmt: skip
    r = rows if sparse else torch.arange(b)
    per = x[: b * s].view(b, s, c)[r]
    z = per[:, 0].clone()
    for j in range(1, s):
        z += per[:, j]
    z /= s
    torch.testing.assert_close(z, per.mean(1), rtol=1e-5, atol=1e-6)
    buf = torch.full((b + 1, c), POISON)
    buf[r] = z + 0.5 * torch.randn(len(r), c, generator=g)
    settled = buf.clone()
    ops, e = torch.ops.deltasparse, torch.empty(0)
    ops.quant_commit(z.clone(), settled, rows, e, lo, hi, thr, mode, 1, True, gate)
    buf[r[::2]] = settled[r[::2]]  # some samples store what this frame commits
    for compare in (True, False):
        got_buf, want_buf = buf.clone(), buf.clone()
        got = ops.gpool_commit(x, s, rows, not sparse, e, got_buf, lo, hi, thr, mode, 1, compare,
                               gate)  # fmt: skip
        mask = ops.quant_commit(z.clone(), want_buf, rows, e, lo, hi, thr, mode, 1, compare, gate)
        assert torch.equal(got_buf, want_buf)
        if compare:
            assert torch.equal(got, r[mask])
            assert 0 < got.numel() < len(r)  # both outcomes drawn
        else:
            assert got.numel() == 0
    with pytest.raises(RuntimeError, match="B \\* S"):
        ops.gpool_commit(x[:-1], s, rows, not sparse, e, buf.clone(), lo, hi, thr, mode, 1, True,
                         gate)  # fmt: skip


@needs_cpp
def test_fused_commit_refuses_bad_shapes():
    ops = torch.ops.deltasparse
    x, buf, e = torch.zeros(5, 3), torch.zeros(5, 4), torch.empty(0)
    with pytest.raises(RuntimeError, match="w has 2 rows"):
        ops.gemm_commit(x, e.long(), e.long(), True, torch.zeros(2, 4), e, buf, 0.0, 1.0, e, 0, 1,
                        True, 0)  # fmt: skip
    with pytest.raises(RuntimeError, match="float32"):
        ops.gemm_rows(x.double(), e.long(), e.long(), True, torch.zeros(3, 4), 4)
    w = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="row 4 outside"):
        ops.gemm_commit(x, e.long(), torch.tensor([4]), False, w, e, buf, 0.0, 1.0, e, 0, 1,
                        True, 0)  # fmt: skip
    with pytest.raises(RuntimeError, match="thr_mode 2"):
        ops.gemm_commit(x, e.long(), e.long(), True, w, e, buf, 0.0, 1.0, torch.ones(3), 2, 1,
                        True, 0)  # fmt: skip


@needs_cpp
@pytest.mark.parametrize("k,s,pad,d", [
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((2, 2), (2, 2), (0, 0), (1, 1)), ((1, 1), (1, 1), (0, 0), (1, 1)),
    ((3, 3), (3, 3), (2, 2), (1, 1)), ((3, 3), (1, 1), (2, 2), (2, 2)),
    ((5, 5), (2, 2), (2, 2), (1, 1)), ((3, 3), (2, 2), (2, 2), (2, 2)),
    ((3, 5), (2, 1), (1, 2), (2, 1)), ((1, 3), (1, 3), (0, 1), (1, 1)),
])  # fmt: skip
@pytest.mark.parametrize("ceil", [False, True])
def test_reachable_cpp_equals_torch(k, s, pad, d, ceil, monkeypatch):
    """The C++ op (from the window's arithmetic, rectangular windows included) == the table
    path == the definition."""
    from deltasparse.engine.kernels import geometry

    g = torch.Generator().manual_seed(zlib.crc32(repr((k, s, pad, d, ceil)).encode()))
    out = (out_size(9, k[0], s[0], pad[0], d[0], ceil), out_size(7, k[1], s[1], pad[1], d[1], ceil))
    geom = WindowGeom(2, (9, 7), out, k, s, pad, d)
    monkeypatch.setattr(geometry, "_cpp_loaded", lambda: False)  # the table path
    for n in (0, 1, 5, geom.p_in // 3, geom.p_in):
        active = torch.randperm(geom.p_in, generator=g)[:n].sort().values
        fast = torch.ops.deltasparse.reachable(active, 2, 9, 7, *out, *k, *s, *pad, *d)
        assert torch.equal(fast, geom.reachable(active))  # the table path
        # the definition: outputs whose window holds an active input
        hit = torch.isin(geom.taps, active).any(1).nonzero().squeeze(1)
        assert torch.equal(fast, hit)
    monkeypatch.undo()
    active = torch.arange(0, geom.p_in, 3)
    assert torch.equal(geom.reachable(active), torch.isin(geom.taps, active).any(1)
                       .nonzero().squeeze(1))  # the engine's call: the C++ op  # fmt: skip
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.deltasparse.reachable(torch.tensor([geom.p_in]), 2, 9, 7, *out, *k, *s, *pad,
                                        *d)  # fmt: skip


@needs_cpp
@pytest.mark.parametrize("k,s,pad,d,n", [
    ((3, 3), (2, 2), (1, 1), (1, 1), 20), ((3, 3), (2, 2), (1, 1), (1, 1), 9000),
    ((3, 3), (1, 1), (1, 1), (1, 1), 30000), ((2, 2), (2, 2), (0, 0), (1, 1), 40000),
    ((3, 5), (1, 2), (2, 1), (2, 1), 5000),
])  # fmt: skip
def test_reachable_cpp_on_large_maps(k, s, pad, d, n, monkeypatch):
    """Maps large enough for the threaded paths (the dilation in tasks of output rows, the
    indices in chunks): the C++ op == the table path, a sparse and a dense active set."""
    from deltasparse.engine.kernels import geometry

    g = torch.Generator().manual_seed(n)
    h, w = 64, 48
    out = (out_size(h, k[0], s[0], pad[0], d[0]), out_size(w, k[1], s[1], pad[1], d[1]))
    geom = WindowGeom(8, (h, w), out, k, s, pad, d)
    active = torch.randperm(geom.p_in, generator=g)[:n].sort().values
    fast = torch.ops.deltasparse.reachable(active, 8, h, w, *out, *k, *s, *pad, *d)
    monkeypatch.setattr(geometry, "_cpp_loaded", lambda: False)  # the table path
    assert torch.equal(fast, geom.reachable(active))
    assert 0 < fast.numel() <= geom.p_out


@needs_cpp
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100, 16384, 16391, 50001])
@pytest.mark.parametrize("p", [0.0, 0.03, 0.5, 1.0])
def test_flagged_equals_nonzero(n, p):
    """flagged (branch-free, 8 flags a step, chunks on threads) == mask.nonzero() and
    rows[mask], for sizes around the steps and the chunks."""
    g = torch.Generator().manual_seed(n + int(100 * p))
    mask = torch.rand(n, generator=g) < p
    rows = torch.randperm(3 * n + 1, generator=g)[:n]
    got = torch.ops.deltasparse.flagged(mask, torch.empty(0, dtype=torch.long))
    assert torch.equal(got, mask.nonzero().squeeze(1))
    assert torch.equal(torch.ops.deltasparse.flagged(mask, rows), rows[mask])
    with pytest.raises(RuntimeError, match="as many as mask"):
        torch.ops.deltasparse.flagged(torch.ones(3, dtype=torch.bool), torch.arange(2))


@needs_cpp
def test_engine_fused_and_unfused_paths_agree(monkeypatch):
    """The engine on the fused kernels (MKL's SGEMM per block of rows) and, as where torch does
    not link MKL, on the unfused ones: the same outputs as the dense model, frame by frame."""
    from engine_helpers import ALWAYS_SPARSE, AllOps, DenseRecorder, compare_rel, converted

    from deltasparse import DeltaEngine
    from deltasparse.engine import FallbackWarning
    from deltasparse.layers import streaming

    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 16, 16, generator=g)
    gm = converted(AllOps(), x0[:1], gate="pixel", mode="hysteresis", thr=0.05)
    rec = DenseRecorder(gm)
    frames = [x0]
    for _ in range(4):
        f = frames[-1].clone()
        f[:, :, 4:9, 3:8] += 0.3 * torch.rand(2, 3, 5, 5, generator=g)
        frames.append(f)
    results = []
    for gemm in (True, False):
        monkeypatch.setattr(torch.ops.deltasparse, "has_sgemm", lambda gemm=gemm: gemm)
        if gemm:
            eng = DeltaEngine(gm, backend="cpp", crossover=ALWAYS_SPARSE)
            assert not eng.stats.fallbacks
        else:  # the slower path is announced
            with pytest.warns(FallbackWarning, match="sgemm_"):
                eng = DeltaEngine(gm, backend="cpp", crossover=ALWAYS_SPARSE)
            assert any("sgemm_" in f for f in eng.stats.fallbacks)
        assert eng.backend._gemm is gemm
        with streaming(gm):
            errs = [compare_rel(eng, rec, f) for f in frames]
        assert max(e[0] for e in errs) < 1e-5
        results.append(eng.step(frames[-1]).clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_stale_build_lock_of_a_killed_build_is_removed(tmp_path, caplog):
    """torch's build lock is a plain file that a killed build leaves behind (every later
    build then waits forever): under deltasparse's flock, which dies with its process, a
    leftover lock file is stale, and it is removed with a warning instead of hanging."""
    from deltasparse.engine.kernels import cpp

    (tmp_path / "lock").touch()
    with caplog.at_level(logging.WARNING, logger=cpp.__name__):
        with cpp._build_lock(tmp_path):
            assert not (tmp_path / "lock").exists()
    assert "stale build lock" in caplog.text
    caplog.clear()
    with cpp._build_lock(tmp_path):  # nothing stale: nothing said
        pass
    assert caplog.text == ""


def test_build_lock_without_flock_warns_and_goes_on(tmp_path, caplog, monkeypatch):
    """A filesystem without flock (ENOLCK) must not turn the C++ engine off: warned, and the
    build goes on under torch's own lock."""
    import errno
    import fcntl

    from deltasparse.engine.kernels import cpp

    def no_lock(fh, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_lock)
    ran = []
    with caplog.at_level(logging.WARNING, logger=cpp.__name__):
        with cpp._build_lock(tmp_path):
            ran.append(True)
    assert ran and "cannot lock" in caplog.text
