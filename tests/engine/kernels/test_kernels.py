"""Every torch-backend kernel against the ``reference`` backend, and the window geometry."""

from __future__ import annotations

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from deltasparse.engine.kernels import (
    ConvSpec,
    LinearSpec,
    PoolSpec,
    ReferenceBackend,
    TorchBackend,
    WindowGeom,
)
from deltasparse.engine.kernels.geometry import out_size
from deltasparse.engine.runtime import _avg_divisor

REF, FAST = ReferenceBackend(), TorchBackend()


def _buf(p: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p + 1, c, generator=g)
    x[-1] = 0
    return x


def _rows(p: int, frac: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = max(1, int(p * frac))
    return torch.randperm(p, generator=g)[:n].sort().values


geoms = st.fixed_dictionaries({
    "b": st.integers(1, 2), "h": st.integers(4, 11), "w": st.integers(4, 11),
    "k": st.sampled_from([1, 2, 3, 5]), "s": st.integers(1, 3), "p": st.integers(0, 2),
    "d": st.integers(1, 2), "seed": st.integers(0, 2**16), "frac": st.floats(0.05, 1.0),
})  # fmt: skip


def _geom(g, k=None) -> WindowGeom | None:
    k = k or g["k"]
    ho = out_size(g["h"], k, g["s"], g["p"], g["d"])
    wo = out_size(g["w"], k, g["s"], g["p"], g["d"])
    if ho < 1 or wo < 1 or g["p"] > k // 2 + 1:
        return None
    return WindowGeom(g["b"], (g["h"], g["w"]), (ho, wo), (k, k), (g["s"],) * 2, (g["p"],) * 2,
                      (g["d"],) * 2)  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(g=geoms, groups=st.sampled_from([1, 2, "dw"]), bias=st.booleans())
def test_conv_kernels_match_reference(g, groups, bias):
    geom = _geom(g)
    assume(geom is not None)
    c_in = 6
    c_out, gr = (c_in, c_in) if groups == "dw" else (8, groups)
    torch.manual_seed(g["seed"])
    w = torch.randn(c_out, c_in // gr, *geom.kernel)
    b = torch.randn(c_out) if bias else None
    spec = ConvSpec.from_weight(geom, w, b, gr)
    x = _buf(geom.p_in, c_in, g["seed"])
    rows = _rows(geom.p_out, g["frac"], g["seed"])
    kernel = "depthwise" if spec.depthwise else "conv"
    want = getattr(REF, kernel)(x, spec, rows)
    torch.testing.assert_close(getattr(FAST, kernel)(x, spec, rows), want, rtol=1e-5, atol=1e-5)
    dense = getattr(FAST, kernel)(x, spec, None)
    torch.testing.assert_close(dense[rows], want, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(g=geoms, mode=st.sampled_from(["max", "avg"]), ceil=st.booleans(), cip=st.booleans())
def test_pool_kernels_match_reference(g, mode, ceil, cip):
    k = max(g["k"], 2)
    assume(g["p"] <= k // 2)
    d = g["d"] if mode == "max" else 1
    ho = out_size(g["h"], k, g["s"], g["p"], d, ceil)
    wo = out_size(g["w"], k, g["s"], g["p"], d, ceil)
    assume(ho >= 1 and wo >= 1)
    geom = WindowGeom(g["b"], (g["h"], g["w"]), (ho, wo), (k, k), (g["s"],) * 2, (g["p"],) * 2,
                      (d, d))  # fmt: skip
    spec = PoolSpec(geom, mode, ceil, cip, None)
    a = dict(k=(k, k), s=(g["s"],) * 2, p=(g["p"],) * 2, div=None, cip=cip)
    spec.divisor = _avg_divisor(g["h"], g["w"], ho, wo, a, g["b"], "cpu")
    x = _buf(geom.p_in, 5, g["seed"])
    rows = _rows(geom.p_out, g["frac"], g["seed"])
    want = REF.pool(x, spec, rows)
    torch.testing.assert_close(FAST.pool(x, spec, rows), want, rtol=1e-5, atol=1e-6)


def test_linear_kernel_matches_reference():
    x = _buf(50, 12, 0)
    spec = LinearSpec(torch.randn(12, 7), torch.randn(7))
    rows = _rows(50, 0.3, 1)
    torch.testing.assert_close(FAST.linear(x, spec, rows), REF.linear(x, spec, rows))
    torch.testing.assert_close(FAST.linear(x, spec, None), REF.linear(x, spec, None))


@settings(max_examples=40, deadline=None)
@given(g=geoms)
def test_reachable_is_every_window_touching_an_active_input(g):
    geom = _geom(g)
    assume(geom is not None)
    active = _rows(geom.p_in, g["frac"] / 3, g["seed"])
    got = geom.reachable(active)
    mask = torch.zeros(geom.p_in + 1, dtype=torch.bool)
    mask[active] = True
    want = mask[geom.taps].any(1).nonzero().squeeze(1)  # brute force over all windows
    assert torch.equal(got, want)


def test_commit_reports_changed_rows_and_writes_only_those():
    buf = torch.full((11, 3), float("nan"))
    buf[:10] = 1.0
    buf[10] = 0
    z = torch.ones(4, 3)
    z[1, 2] = 2.0
    rows = torch.tensor([0, 3, 5, 9])
    changed = FAST.commit(buf, rows, z)
    assert changed.tolist() == [3]
    assert buf[3, 2] == 2.0 and torch.isfinite(buf).all()
