"""sparsity_loss and the sparsity-weight schedules (ProSparse's multi-stage sine)."""

import math

import pytest
import torch
from torch import nn

import deltasparse as ds
from deltasparse.layers import sparsity_layers


def _video():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 16, 4),
    )  # fmt: skip
    return ds.convert(
        ds.VideoModel(model), ds.DeltaConfig(threshold_init=0.05, sparsity_weight=0.3)
    )


def test_sparsity_loss_sums_the_layer_losses_of_the_last_forward():
    video = _video()
    x = torch.randn(2, 3, 2, 4, 4)
    video(x * 10)
    video(x)
    layers = [m for _, m in sparsity_layers(video)]
    assert len(layers) == 2
    loss = ds.sparsity_loss(video)
    # independently from the per-frame activations the layers emitted
    expected = 0.0
    for m in layers:
        assert m.stats.total > 0
    outs = []
    hooks = [m.register_forward_hook(lambda mod, i, o: outs.append((mod, o))) for m in layers]
    video(x)
    for h in hooks:
        h.remove()
    for mod, o in outs:
        q = o.reshape(2, 3, *o.shape[1:])
        d = q[:, 1:] - q[:, :-1]
        expected += 0.3 * mod.fan_out * d.abs().sum().item() / d.numel()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() > 0
    loss.backward()
    for m in layers:
        assert m.theta.grad is not None and m.theta.grad.abs().sum() > 0


def test_sparsity_loss_is_zero_without_layers_or_temporal_forward():
    plain = nn.Linear(3, 2)
    assert ds.sparsity_loss(plain).item() == 0.0
    video = _video()
    assert ds.sparsity_loss(video).item() == 0.0  # no forward yet
    video.frame_model(torch.randn(2, 2, 4, 4))  # frames outside a clip: no temporal loss
    assert ds.sparsity_loss(video).item() == 0.0


def test_set_sparsity_weight_scales_the_loss():
    video = _video()
    x = torch.randn(1, 3, 2, 4, 4)
    video(x)
    before = ds.sparsity_loss(video).item()
    ds.set_sparsity_weight(video, 0.6)
    video(x)
    assert ds.sparsity_loss(video).item() == pytest.approx(2 * before, rel=1e-6)


def test_l1_layers_contribute():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(1, 2, 1))
    gm = ds.convert(model, ds.DeltaConfig(kind="l1", sparsity_weight=1.0))
    x = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]]]])
    gm(x)
    assert ds.sparsity_loss(gm).item() == pytest.approx(1.0 * 2.0 * 4.0 / 4)  # fan_out 2


# -- schedules ---------------------------------------------------------------------------------
def test_constant_and_linear_warmup():
    assert [ds.Constant(0.3)(s) for s in (0, 10, 10**6)] == [0.3, 0.3, 0.3]
    w = ds.LinearWarmup(1.0, warmup_steps=10)
    assert [w(s) for s in (0, 5, 10, 11, 1000)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert ds.LinearWarmup(1.0, 4, start=0.2)(2) == pytest.approx(0.6)
    assert ds.LinearWarmup(2.0, 0)(0) == 2.0


def _prosparse(step, milestones, values, start=0.0):
    """λ = λ_{i-1} + (λ_i − λ_{i-1})·½[sin(−π/2 + π·(t−T_{i−1})/(T_i−T_{i−1})) + 1]."""
    bounds = [0, *milestones]
    lams = [start, *values]
    for i in range(1, len(bounds)):
        if step < bounds[i]:
            frac = (step - bounds[i - 1]) / (bounds[i] - bounds[i - 1])
            return lams[i - 1] + (lams[i] - lams[i - 1]) * 0.5 * (
                math.sin(-math.pi / 2 + math.pi * frac) + 1
            )
    return lams[-1]


def test_multi_stage_sine_exact_values():
    s = ds.MultiStageSine(milestones=(10, 30, 40), values=(1.0, 3.0, 4.0))
    # stage boundaries hit the stage values exactly, midpoints are half way
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.5)
    assert s(10) == 1.0
    assert s(20) == pytest.approx(2.0)
    assert s(30) == 3.0
    assert s(35) == pytest.approx(3.5)
    assert s(40) == 4.0 and s(10**6) == 4.0
    assert s(2.5) == pytest.approx(0.5 * (1 - math.sqrt(0.5)))  # a quarter of the first stage
    for step in range(0, 45):
        assert s(step) == pytest.approx(_prosparse(step, (10, 30, 40), (1.0, 3.0, 4.0)), abs=1e-12)
    steps = [s(t) for t in range(0, 45)]
    assert steps == sorted(steps)  # monotone for increasing values


def test_multi_stage_sine_start_and_errors():
    s = ds.MultiStageSine((4,), (1.0,), start=0.5)
    assert s(0) == 0.5 and s(2) == pytest.approx(0.75) and s(4) == 1.0
    with pytest.raises(ValueError, match="as many milestones as values"):
        ds.MultiStageSine((1, 2), (1.0,))
    with pytest.raises(ValueError, match="increase"):
        ds.MultiStageSine((5, 5), (1.0, 2.0))
    with pytest.raises(ValueError, match="increase"):
        ds.MultiStageSine((0,), (1.0,))


def test_make_schedule():
    assert ds.make_schedule("constant", 0.2, 100) == ds.Constant(0.2)
    lin = ds.make_schedule("linear", 0.2, 100)
    assert lin(0) == 0.0 and lin(25) == pytest.approx(0.2)
    sine = ds.make_schedule("sine", 0.8, 120)
    assert sine(0) == 0.0 and sine(20) == pytest.approx(0.2) and sine(60) == pytest.approx(0.8)
    assert sine(40) == pytest.approx(0.4) and sine(1000) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="unknown sparsity schedule 'cosine'"):
        ds.make_schedule("cosine", 1.0, 10)
