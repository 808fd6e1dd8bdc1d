"""The fused C++ training gate (engine/kernels/cpp.py gate_forward / gate_backward) against the
torch path of DeltaActivation: identical outputs and counts, losses and both gradients equal
to float rounding, for every gate, mode, activation and threshold granularity it takes."""

from __future__ import annotations

import pytest
import torch

import deltasparse as ds
from deltasparse.engine.kernels import CppBackend
from deltasparse.layers import delta as delta_mod

pytestmark = pytest.mark.skipif(not CppBackend.available(), reason="the C++ op does not build")

CASES = [(g, m, a, gran) for g in ("scalar", "pixel") for m in ("grid", "hysteresis")
         for a in (None, "relu", "relu6") for gran in ("layer", "channel")]  # fmt: skip


def _run(layer, x, fused: bool, monkeypatch, weight=None):
    with monkeypatch.context() as mp:
        if not fused:
            mp.setattr(type(layer), "_fused", lambda self, s: False)
        else:
            assert layer._fused(x), "the fused gate should take this clip"
        x = x.detach().clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        q = layer(x)
        w = torch.linspace(-1, 1, q.numel()).reshape(q.shape) if weight is None else weight
        ((q * w).sum() + 7.0 * layer.loss).backward()
        return q.detach(), layer.loss.detach(), int(layer.stats.nonzero), x.grad, layer.theta.grad


@pytest.mark.parametrize("gate,mode,act,gran", CASES)
def test_fused_gate_equals_the_torch_path(gate, mode, act, gran, monkeypatch):
    torch.manual_seed(0)
    layer = ds.DeltaActivation(granularity=gran, threshold_init=0.4, activation=act, gate=gate,
                               mode=mode, sparsity_weight=0.1)  # fmt: skip
    x = torch.randn(3, 5, 4, 6, 7) * 2
    x[:, 2] = x[:, 1] + 0.01 * torch.randn_like(x[:, 1])  # small changes: some pixels stay
    ref = _run(layer, x, False, monkeypatch)
    got = _run(layer, x, True, monkeypatch)
    assert torch.equal(ref[0], got[0])  # the outputs: the same float operations
    assert ref[2] == got[2]  # the exact count of changed scalars (pixels x C)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[4], ref[4], rtol=1e-5, atol=1e-6)


def test_fused_gate_with_the_spread_loss(monkeypatch):
    # a pixel gate whose loss counts the consumer rows each change reaches
    torch.manual_seed(1)
    layer = ds.DeltaActivation(threshold_init=0.3, activation="relu", gate="pixel",
                               mode="hysteresis")  # fmt: skip
    layer.spread = [{"windows": [((3, 3), (1, 1), (1, 1), (1, 1), False)], "macs_per_row": 90}]
    x = torch.randn(2, 4, 5, 6, 6)
    ref, got = _run(layer, x, False, monkeypatch), _run(layer, x, True, monkeypatch)
    assert torch.equal(ref[0], got[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[4], ref[4], rtol=1e-5, atol=1e-6)


def test_fused_gate_output_may_be_changed_in_place():
    # the backward replays q from x: an in-place op on the output does not corrupt it
    torch.manual_seed(2)
    x0 = torch.randn(2, 3, 4, 5, 5)
    grads = []
    for in_place in (False, True):
        layer = ds.DeltaActivation(threshold_init=0.2, gate="pixel", mode="hysteresis")
        x = x0.clone().requires_grad_()
        y = layer(x)
        y = y.mul_(2) if in_place else y * 2
        (y.square().sum() + layer.loss).backward()
        grads.append((x.grad.clone(), layer.theta.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_double_backward_is_an_error_not_a_zero(monkeypatch):
    layer = ds.DeltaActivation(threshold_init=0.3, activation="relu")
    x = torch.randn(2, 3, 4, 5, 5, requires_grad=True)
    assert layer._fused(x)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


def test_unused_loss_with_infinite_activations_gives_the_torch_gradient(monkeypatch):
    # no loss gradient: no e terms at all (0 * inf would be NaN)
    x = torch.zeros(1, 3, 2, 4, 4)
    x[0, 1, 0] = float("inf")
    grads = []
    for fused in (False, True):
        layer = ds.DeltaActivation(threshold_init=0.3, gate="pixel")
        with monkeypatch.context() as mp:
            if not fused:
                mp.setattr(type(layer), "_fused", lambda self, s: False)
            xx = x.clone().requires_grad_()
            layer(xx).sum().backward()
            grads.append(xx.grad)
    assert torch.equal(grads[0], grads[1]) and bool(torch.isfinite(grads[1]).all())


def test_paths_that_the_fused_gate_does_not_take():
    x = torch.randn(2, 3, 4, 5, 5)
    assert not ds.DeltaActivation()._fused(torch.randn(2, 3, 10))  # (B, T, F): torch path
    assert not ds.DeltaActivation()._fused(torch.randn(2, 3, 4, 3, 3))  # 9 positions
    assert not ds.DeltaActivation()._fused(torch.randn(0, 3, 4, 5, 5))  # empty batch
    assert not ds.DeltaActivation(granularity="neuron")._fused(x)
    assert not ds.DeltaActivation(delta_output=True)._fused(x)
    assert not ds.DeltaActivation()._fused(x.double())
    assert not ds.DeltaActivation()._fused(x.bfloat16())
    assert ds.DeltaActivation()._fused(x)


def test_a_failed_build_warns_once_and_trains_on_the_torch_path(monkeypatch):
    from deltasparse.engine.kernels import cpp

    monkeypatch.setattr(delta_mod, "_FUSED", {})
    monkeypatch.setattr(cpp, "gate_ops", lambda: None)
    monkeypatch.setattr(cpp, "build_error", lambda: "OSError: no compiler")
    layer = ds.DeltaActivation(gate="pixel")
    x = torch.randn(2, 3, 4, 5, 5, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="fused C.. training gate could not be built"):
        y = layer(x)
    (y.sum() + layer.loss).backward()
    assert x.grad is not None and delta_mod._FUSED["ops"] is None


# -- deltasparse::pixel_loss: the pixel loss (receptive-field weights) in one C++ pass --------
_SPREADS = {
    "conv3x3": [{"windows": [((3, 3), (1, 1), (1, 1), (1, 1), False)], "macs_per_row": 36}],
    "conv3x3_s2": [{"windows": [((3, 3), (2, 2), (1, 1), (1, 1), False)], "macs_per_row": 576}],
    "pool_1x1": [{"windows": [((2, 2), (2, 2), (0, 0), (1, 1), False),
                              ((1, 1), (1, 1), (0, 0), (1, 1), False)], "macs_per_row": 5}],
    "dilated_padded": [{"windows": [((3, 3), (1, 1), (2, 2), (2, 2), False)],
                        "macs_per_row": 1}],
    "three_consumers": [
        {"windows": [((3, 3), (2, 2), (1, 1), (1, 1), True), ((2, 2), (2, 2), (0, 0), (1, 1), True),
                     ((1, 1), (1, 1), (0, 0), (1, 1), False)], "macs_per_row": 7},
        {"windows": [((2, 2), (2, 2), (0, 0), (1, 1), False), "global"], "macs_per_row": 300},
        {"windows": [((1, 1), (1, 1), (0, 0), (1, 1), False)], "macs_per_row": 11}],
    "none": None,
}  # fmt: skip


@pytest.mark.parametrize("hw", [(7, 7), (8, 8), (5, 9)])
@pytest.mark.parametrize("spread", sorted(_SPREADS))
def test_cpp_pixel_loss_equals_the_torch_reference(spread, hw):
    """Weights, gradient factor and count bit for bit (ties, NaN, all-zero maps), the loss sum
    to float rounding, against _spread_weights / _pixel_loss in torch ops."""
    torch.manual_seed(0)
    c = 4
    layer = ds.DeltaActivation(num_channels=c, gate="pixel")
    layer.spread = _SPREADS[spread]
    spec = layer._loss_spec(torch.zeros(2, 4, c, *hw))
    assert spec is not None
    weight_fn = layer._spread_weights if layer.spread else None
    op = delta_mod._pixel_loss_cpp()
    for zero_frac in (0.0, 0.7, 1.0):
        norm = torch.rand(2, 3, 1, *hw)
        norm[torch.rand_like(norm) < zero_frac] = 0
        norm[0, 0, 0, 0, 1] = norm[0, 0, 0, 0, 0]  # a tie: the first maximum wins
        ref = delta_mod._pixel_loss(norm, c, weight_fn)
        got = delta_mod._pixel_loss(norm, c, weight_fn, spec)
        assert torch.equal(got[2], ref[2])
        assert torch.equal(got[1], ref[1])
        torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=0)
        if weight_fn is not None:
            w = op(norm.view(-1, *hw), spec, c)[3].view(norm.shape)
            assert torch.equal(w, layer._spread_weights(norm))
        norm[1, 1, 0, 3, 3] = float("nan")  # a diverged run: counted, no gradient, as torch
        ref = delta_mod._pixel_loss(norm, c, weight_fn)
        got = delta_mod._pixel_loss(norm, c, weight_fn, spec)
        assert torch.equal(got[2], ref[2]) and got[0].isnan() and ref[0].isnan()
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0, equal_nan=True)
        if weight_fn is not None:
            w = op(norm.view(-1, *hw), spec, c)[3].view(norm.shape)
            assert torch.equal(w, layer._spread_weights(norm))


def test_the_pixel_loss_spec_follows_the_spread():
    layer = ds.DeltaActivation(num_channels=2, gate="pixel")
    clip = torch.zeros(1, 2, 2, 4, 4)
    assert layer._loss_spec(clip).numel() == 0  # the plain group loss
    layer.spread = _SPREADS["pool_1x1"]
    assert layer._loss_spec(clip).tolist() == [1, 5, 2, 0, 2, 2, 2, 2, 0, 0, 1, 1, 0,
                                               0, 1, 1, 1, 1, 0, 0, 1, 1, 0]  # fmt: skip
    layer.spread = _SPREADS["conv3x3"]
    assert layer._loss_spec(clip).tolist()[:2] == [1, 36]
    assert layer._loss_spec(clip.double()) is None  # torch ops there
    assert layer._loss_spec(torch.zeros(1, 2, 2, 4)) is None


def test_cpp_pixel_loss_edge_cases():
    """1x1 consumers only, MACs past 2**24: the torch path's single rounding of their sum; a
    window that holds no pixel of the map: an error, as max_pool2d's, not a crash."""
    layer = ds.DeltaActivation(num_channels=2, gate="pixel")
    one = ((1, 1), (1, 1), (0, 0), (1, 1), False)
    layer.spread = [{"windows": [one], "macs_per_row": 2**24}, {"windows": [one],
                    "macs_per_row": 1}, {"windows": [one], "macs_per_row": 1}]  # fmt: skip
    norm = torch.rand(1, 2, 1, 4, 4)
    spec = layer._loss_spec(torch.zeros(1, 3, 2, 4, 4))
    ref = delta_mod._pixel_loss(norm, 2, layer._spread_weights)
    got = delta_mod._pixel_loss(norm, 2, layer._spread_weights, spec)
    assert torch.equal(got[1], ref[1])
    layer.spread = [{"windows": [((2, 2), (1, 1), (1, 1), (2, 2), False)], "macs_per_row": 3}]
    norm = torch.rand(1, 1, 1, 1, 5)
    spec = layer._loss_spec(torch.zeros(1, 2, 2, 1, 5))
    with pytest.raises(RuntimeError):
        delta_mod._pixel_loss(norm, 2, layer._spread_weights)
    with pytest.raises(RuntimeError, match="holds no pixel"):
        delta_mod._pixel_loss(norm, 2, layer._spread_weights, spec)
