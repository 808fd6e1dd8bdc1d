"""DeltaActivation against DESIGN.md §1: hand-computed cases, an independent reference over
every granularity and option, dtypes, state handling, bad input and random shapes."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import deltasparse as ds

# -- hand-computed tiny case ------------------------------------------------------------------
# x: (B=1, T=3, C=2); theta = [0.5, -1.0] so thr = [0.5, 1.0] (negative theta on channel 1).
# channel 0: a/thr = [0.5, 2.5, 2.8] -> round half to even [0, 2, 3] -> q = [0, 1.0, 1.5]
# channel 1: a/thr = [1.5, 1.6, -0.5] -> [2, 2, -0]                  -> q = [2, 2, 0]
# deltas (t=1,2): ch0 [1.0, 0.5], ch1 [0, -2]: nonzero 3 of 4, sum|d| = 3.5
X = [[[0.25, 1.5], [1.25, 1.6], [1.4, -0.5]]]
Q = [[[0.0, 2.0], [1.0, 2.0], [1.5, 0.0]]]
LEVELS = [[[0.0, 2.0], [2.0, 2.0], [3.0, 0.0]]]
W, FAN_OUT = 0.1, 3.0


def _hand_layer(**kw):
    layer = ds.DeltaActivation(
        granularity="channel", threshold_init=0.5, sparsity_weight=W, fan_out=FAN_OUT,
        num_channels=2, **kw,
    )  # fmt: skip
    with torch.no_grad():
        layer.theta.copy_(torch.tensor([0.5, -1.0]))
    return layer


def test_hand_forward_q_stats_and_loss():
    layer = _hand_layer()
    q = layer(torch.tensor(X))
    assert torch.equal(q, torch.tensor(Q))
    assert layer.stats.nonzero == 3 and layer.stats["nonzero"] == 3
    assert layer.stats.total == 4 and layer.stats["total"] == 4  # first frame excluded
    assert layer.stats.fan_out == FAN_OUT and layer.stats["fan_out"] == FAN_OUT
    assert layer.stats.ops == FAN_OUT * 3 and layer.stats.dense_ops == FAN_OUT * 4
    assert layer.loss.item() == pytest.approx(W * FAN_OUT * 3.5 / 4)  # 0.2625


def test_hand_delta_output():
    layer = _hand_layer(delta_output=True)
    y = layer(torch.tensor(X))
    assert torch.equal(y, torch.tensor([[[0.0, 2.0], [1.0, 0.0], [0.5, -2.0]]]))
    assert layer.stats.nonzero == 3 and layer.loss.item() == pytest.approx(0.2625)


def test_hand_gradients_of_output():
    # L = sum(G * q): dq/da = 1 (straight-through) so dL/dx = G; dq/dthr = -levels and
    # thr = |theta| so dL/dtheta = -sum_t(G * levels) * sign(theta).
    layer = _hand_layer()
    x = torch.tensor(X, requires_grad=True)
    g = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]]])
    (layer(x) * g).sum().backward()
    assert torch.equal(x.grad, g)
    # ch0: -(1*0 + 3*2 + 0.5*3) * (+1) = -7.5 ; ch1: -(2*2 + -1*2 + 4*0) * (-1) = +2
    assert torch.allclose(layer.theta.grad, torch.tensor([-7.5, 2.0]))


def test_hand_gradients_of_loss():
    # loss = c * sum|d| / 4 with c = w * fan_out; dloss/dq_t = c/4 * (sign d_t - sign d_{t+1})
    # ch0: d = [+1, +0.5] -> dq = c/4 * [-1, 0, +1]; dthr = c/4 * (+1 * -3) = -3c/4
    # ch1: d = [0, -2]    -> dq = c/4 * [0, +1, -1]; dthr = c/4 * (+1 * -2) = -2c/4, * sign -1
    layer = _hand_layer()
    x = torch.tensor(X, requires_grad=True)
    layer(x)
    layer.loss.backward()
    k = W * FAN_OUT / 4
    assert torch.allclose(layer.theta.grad, torch.tensor([-3 * k, 2 * k]))
    assert torch.allclose(x.grad, k * torch.tensor([[[-1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]]))


def test_hand_relu_activation_gradient_and_zeroing():
    layer = _hand_layer(activation="relu")
    x = torch.tensor(X, requires_grad=True)
    q = layer(x)
    assert torch.equal(q, torch.tensor([[[0.0, 2.0], [1.0, 2.0], [1.5, 0.0]]]))
    q.sum().backward()
    assert torch.equal(x.grad, (torch.tensor(X) > 0).float())  # relu' * 1 (straight-through)


def test_round_half_to_even_and_negative_layer_theta():
    layer = ds.DeltaActivation(granularity="layer", threshold_init=0.5, fan_out=1.0)
    with torch.no_grad():
        layer.theta.fill_(-0.5)
    # a/thr = 0.5, 1.5, 2.5, -0.5, -1.5, -2.5 -> 0, 2, 2, -0, -2, -2
    a = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, -1.25]).reshape(1, 6, 1)
    q = layer(a)
    assert torch.equal(q.flatten(), torch.tensor([0.0, 1.0, 1.0, 0.0, -1.0, -1.0]))
    q.sum().backward()
    # dL/dthr = -sum(levels) = -(0+2+2+0-2-2) = 0 -> use a weighted sum instead
    layer.theta.grad = None
    w = torch.arange(1.0, 7.0).reshape(1, 6, 1)
    (layer(a) * w).sum().backward()
    levels = torch.tensor([0.0, 2, 2, 0, -2, -2])
    expected = -(levels * torch.arange(1.0, 7.0)).sum() * -1.0  # sign(theta) = -1
    assert layer.theta.grad.shape == () and layer.theta.grad.item() == pytest.approx(expected)


def test_first_frame_is_excluded_and_static_clip_costs_nothing():
    layer = ds.DeltaActivation(threshold_init=0.1, fan_out=5.0)
    x = torch.full((2, 4, 3, 2, 2), 7.3)
    q = layer(x)
    assert torch.count_nonzero(q) == q.numel()  # dense first wave
    assert layer.stats.nonzero == 0 and layer.stats.total == 2 * 3 * 3 * 4
    assert layer.loss.item() == 0.0


# -- independent reference over the option grid -----------------------------------------------
def _reference(x, theta, granularity, activation, sigma, delta_output, w, fan_out):
    """Float32 reference built from the §1 formulas with explicit broadcasting.

    Rounding is straight-through for ``a``; ``dq/dthr = -levels`` via a detached correction.
    """
    c = x.shape[2]
    spatial = x.shape[3:]
    thr = theta.abs()
    if granularity == "layer":
        thr_b = thr.expand(c, *spatial)
    elif granularity == "channel":
        thr_b = thr.reshape(c, *([1] * len(spatial))).expand(c, *spatial)
    else:
        thr_b = thr
    s = torch.stack([x[:, : t + 1].sum(dim=1) for t in range(x.shape[1])], 1) if sigma else x
    a = {None: lambda v: v, "relu": F.relu, "relu6": lambda v: v.clamp(0, 6)}[activation](s)
    levels = torch.round(a.detach() / thr_b.detach())
    q = (levels * thr_b).detach() + (a - a.detach()) - (thr_b - thr_b.detach()) * levels
    d = torch.stack([q[:, t] - q[:, t - 1] for t in range(1, q.shape[1])], 1)
    loss = w * fan_out * d.abs().sum() / d.numel()
    out = torch.cat([q[:, :1], d], 1) if delta_output else q
    return out, loss, int((d != 0).sum()), d.numel(), levels


SHAPES = [(2, 4, 3), (2, 4, 3, 5), (2, 3, 3, 4, 4)]
GRID = list(
    itertools.product(
        SHAPES, ("layer", "channel", "neuron"), (None, "relu", "relu6"), (False, True),
        (False, True),
    )
)  # fmt: skip


@pytest.mark.parametrize("shape,granularity,activation,sigma,delta_output", GRID)
def test_against_reference(shape, granularity, activation, sigma, delta_output):
    layer = ds.DeltaActivation(
        granularity=granularity, threshold_init=0.3, sparsity_weight=0.01, fan_out=4.0,
        activation=activation, sigma=sigma, delta_output=delta_output,
    )  # fmt: skip
    x = (torch.randn(shape) * 2).requires_grad_(True)
    if granularity != "layer":
        assert layer.theta is None  # lazy: created at the first forward
    y = layer(x)
    assert [n for n, _ in layer.named_parameters()] == ["theta"]
    want = {"layer": (), "channel": (shape[2],), "neuron": tuple(shape[2:])}[granularity]
    assert tuple(layer.theta.shape) == want
    # distinct steps per element so that a broadcasting mistake shows
    with torch.no_grad():
        layer.theta.copy_(0.2 + 0.3 * torch.rand(want) * torch.where(torch.rand(want) < 0.3, -1, 1))
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype

    x_ref = x.detach().clone().requires_grad_(True)
    theta_ref = layer.theta.detach().clone().requires_grad_(True)
    out, loss, nz, total, _ = _reference(
        x_ref, theta_ref, granularity, activation, sigma, delta_output, 0.01, 4.0
    )
    torch.testing.assert_close(y, out, rtol=0, atol=1e-5)
    assert layer.stats.nonzero == nz and layer.stats.total == total
    torch.testing.assert_close(layer.loss, loss)

    g = torch.randn(shape)
    ((y * g).sum() + layer.loss).backward()
    ((out * g).sum() + loss).backward()
    torch.testing.assert_close(layer.theta.grad, theta_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_threshold_not_trainable(shape):
    layer = ds.DeltaActivation(threshold_trainable=False)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert not layer.theta.requires_grad
    ((y**2).sum() + layer.loss).backward()
    assert layer.theta.grad is None
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_sigma_delta_chain_reconstructs():
    # a delta_output layer followed by a sigma layer with the same step is q again
    first = ds.DeltaActivation(granularity="layer", threshold_init=0.25, delta_output=True)
    second = ds.DeltaActivation(granularity="layer", threshold_init=0.25, sigma=True)
    plain = ds.DeltaActivation(granularity="layer", threshold_init=0.25)
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(second(first(x)), plain(x), rtol=0, atol=1e-6)
    assert second.stats.nonzero == plain.stats.nonzero


# -- dtypes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", ["layer", "channel", "neuron"])
def test_dtypes(dtype, granularity):
    layer = ds.DeltaActivation(granularity=granularity, threshold_init=0.125, fan_out=2.0)
    x = (torch.randn(2, 4, 3, 5, 5) * 3).to(dtype).requires_grad_(True)
    y = layer(x)
    assert y.dtype == dtype
    thr = layer.threshold
    if granularity == "channel":
        thr = thr.reshape(3, 1, 1)
    # quantisation happens in float32 on the (exactly representable) input values
    q32 = torch.round(x.detach().float() / thr) * thr
    assert torch.equal(y, q32.to(dtype))
    d = y.detach()[:, 1:] - y.detach()[:, :-1]
    assert layer.stats.nonzero == int(torch.count_nonzero(d))
    (y.float().sum() + layer.loss).backward()
    assert x.grad.dtype == dtype and layer.theta.grad.dtype == torch.float32
    assert torch.isfinite(layer.theta.grad).all()


def test_float64_and_to():
    layer = ds.DeltaActivation(threshold_init=0.5)
    x = torch.randn(1, 3, 2, 4)
    layer(x)
    layer.to("cpu").to(torch.float64)
    assert layer.theta.dtype == torch.float64
    y = layer(x.double())
    assert y.dtype == torch.float64
    expected = torch.round(x.double() / 0.5) * 0.5
    torch.testing.assert_close(y, expected)
    (y.sum() + layer.loss).backward()
    assert layer.theta.grad.dtype == torch.float64


# -- state -------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["layer", "channel", "neuron"])
def test_state_dict_roundtrip_into_fresh_layer(granularity):
    layer = ds.DeltaActivation(granularity=granularity, threshold_init=0.2)
    x = torch.randn(2, 3, 4, 3, 3)
    layer(x)
    with torch.no_grad():
        layer.theta.mul_(torch.rand_like(layer.theta) + 0.5)
    sd = layer.state_dict()
    assert list(sd) == ["theta"]
    fresh = ds.DeltaActivation(granularity=granularity, threshold_init=0.2)
    fresh.load_state_dict(sd)  # strict: the lazy theta is materialised on load
    assert torch.equal(fresh.theta, layer.theta)
    assert isinstance(fresh.theta, torch.nn.Parameter) and fresh.theta.requires_grad
    assert torch.equal(fresh(x), layer(x))
    assert fresh.stats.nonzero == layer.stats.nonzero


def test_theta_only_after_first_forward_or_given_shape():
    assert ds.DeltaActivation().theta is None
    assert list(ds.DeltaActivation().parameters()) == []
    assert ds.DeltaActivation(num_channels=4).theta.shape == (4,)
    assert ds.DeltaActivation(granularity="neuron", neuron_shape=(2, 3)).theta.shape == (2, 3)
    with pytest.raises(RuntimeError, match="first forward"):
        ds.DeltaActivation().threshold  # noqa: B018
    layer = ds.DeltaActivation(threshold_init=0.07)
    layer(torch.randn(1, 2, 5))
    assert torch.equal(layer.theta.data, torch.full((5,), 0.07))
    assert list(layer.buffers()) == []


# -- bad input ---------------------------------------------------------------------------------
def test_bad_input_errors():
    layer = ds.DeltaActivation()
    with pytest.raises(ValueError, match=r"at least 3 dims.*\(4, 5\)"):
        layer(torch.randn(4, 5))
    with pytest.raises(ValueError, match="time axis of length >= 2.*T=1"):
        layer(torch.randn(2, 1, 3))
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        layer(torch.ones(2, 3, 4, dtype=torch.long))
    layer(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"channels \(6,\).*created for \(4,\)"):
        layer(torch.randn(2, 3, 6))
    neuron = ds.DeltaActivation(granularity="neuron")
    neuron(torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="created for"):
        neuron(torch.randn(1, 2, 3, 5))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"granularity": "pixel"}, "granularity"),
        ({"activation": "gelu"}, "activation"),
        ({"threshold_init": 0.0}, "threshold_init"),
        ({"fan_out": -1.0}, "fan_out"),
        ({"input_layout": "nchw"}, "input_layout"),
    ],
)
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        ds.DeltaActivation(**kw)


# -- properties on random shapes ---------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(2, 5),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    thr=st.floats(0.01, 2.0),
    granularity=st.sampled_from(["layer", "channel", "neuron"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_properties(b, t, c, spatial, thr, granularity, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, c, *spatial, generator=gen) * 3
    layer = ds.DeltaActivation(granularity=granularity, threshold_init=thr)
    q = layer(x)
    assert q.shape == x.shape
    d = q[:, 1:] - q[:, :-1]
    assert layer.stats.nonzero == int(torch.count_nonzero(d))
    assert layer.stats.total == d.numel()
    step = layer.threshold
    if granularity == "channel":
        step = step.reshape(c, *([1] * len(spatial)))
    ratio = q / step
    assert torch.allclose(ratio, ratio.round(), atol=1e-3)
    assert bool(((q - x).abs() <= step / 2 + 1e-5 * (1 + x.abs())).all())
    assert math.isfinite(layer.loss.item())


# -- gradient paths: output only, loss only, deltas only, both ----------------------------------
@pytest.mark.parametrize("delta_output", [False, True])
@pytest.mark.parametrize("use_out,use_loss", [(True, False), (False, True), (True, True)])
def test_gradient_paths_against_reference(delta_output, use_out, use_loss):
    layer = ds.DeltaActivation(threshold_init=0.3, sparsity_weight=0.05, fan_out=2.0,
                               delta_output=delta_output)  # fmt: skip
    x = torch.randn(2, 4, 3, 5, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    theta_ref = layer.theta.detach().clone().requires_grad_(True)
    out, loss, *_ = _reference(x_ref, theta_ref, "channel", None, False, delta_output, 0.05, 2.0)
    g = torch.randn_like(y)
    ((y * g).sum() * use_out + layer.loss * use_loss).backward()
    ((out * g).sum() * use_out + loss * use_loss).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.theta.grad, theta_ref.grad, rtol=1e-4, atol=1e-5)


def test_retain_graph_and_two_backwards_accumulate():
    # task loss and sparsity loss backpropagated separately through one graph
    layer = ds.DeltaActivation(threshold_init=0.2, sparsity_weight=0.1)
    x = torch.randn(1, 3, 4, requires_grad=True)
    y = layer(x)
    (y**2).sum().backward(retain_graph=True)
    first = layer.theta.grad.clone()
    layer.loss.backward()
    both = layer.theta.grad.clone()
    layer.theta.grad = None
    x.grad = None
    y = layer(x)
    ((y**2).sum() + layer.loss).backward()
    torch.testing.assert_close(layer.theta.grad, both)
    assert not torch.equal(first, both)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gradients_match_float32_reference(dtype):
    layer = ds.DeltaActivation(threshold_init=0.25, sparsity_weight=0.5, fan_out=4.0)
    x = (torch.randn(2, 3, 4, 6) * 2).to(dtype).requires_grad_(True)
    y = layer(x)
    x_ref = x.detach().float().requires_grad_(True)
    theta_ref = layer.theta.detach().clone().requires_grad_(True)
    out, loss, *_ = _reference(x_ref, theta_ref, "channel", None, False, False, 0.5, 4.0)
    assert torch.equal(y.float(), out.detach())  # q is exact in half precision here
    g = torch.randn(y.shape)
    ((y.float() * g).sum() + layer.loss).backward()
    ((out * g).sum() + loss).backward()
    torch.testing.assert_close(x.grad.float(), x_ref.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(layer.theta.grad, theta_ref.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer.loss, loss.detach(), rtol=1e-3, atol=1e-6)


# -- the fast exact count used by the layers ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_count_nonzero_is_exact(dtype, monkeypatch):
    from deltasparse.layers import _base

    x = torch.randn(3, 7, 5).relu_().to(dtype)
    assert _base.count_nonzero(x).item() == torch.count_nonzero(x).item()
    assert _base.count_nonzero(x).dtype == torch.int64
    y = x.clone()
    y[0, 0, 0], y[1, 1, 1], y[2, 2, 2] = float("nan"), float("inf"), -float("inf")
    assert _base.count_nonzero(y).item() == torch.count_nonzero(y).item()  # NaN counts
    monkeypatch.setattr(_base, "_F32_EXACT", 16)  # force the chunked / per-row exact paths
    assert _base.count_nonzero(x).item() == torch.count_nonzero(x).item()
    assert _base.count_nonzero(torch.ones(100, dtype=dtype)).item() == 100
    assert _base.count_nonzero(torch.zeros(0)).item() == 0


def test_nan_input_is_counted_not_hidden():
    layer = ds.DeltaActivation(threshold_init=0.5)
    x = torch.zeros(1, 3, 4)
    x[0, 2, 1] = float("nan")
    layer(x)
    assert layer.stats.nonzero == 1
    assert math.isnan(layer.loss.item())


@pytest.mark.parametrize("delta_output", [False, True])
def test_in_place_ops_on_the_output_keep_gradients_right(delta_output):
    # e.g. an nn.ReLU(inplace=True) or in-place dropout right after the layer
    grads = []
    for in_place in (False, True):
        layer = ds.DeltaActivation(threshold_init=0.2, delta_output=delta_output)
        x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = layer(x)
        y = torch.relu_(y.mul_(2)) if in_place else torch.relu(y * 2)
        (y.sum() + layer.loss).backward()
        grads.append((x.grad, layer.theta.grad))
    torch.testing.assert_close(grads[0], grads[1])
