"""Gates and modes of DeltaActivation (``gate="scalar"|"pixel"``, ``mode="grid"|"hysteresis"``):
hand-computed tiny cases (forward, counts, loss, both gradients), an independent float64
reference over random clips, the hysteresis error bound, and frame-by-frame streaming."""

import math

import pytest
import torch

import deltasparse as ds

# x: (B=1, T=3, C=2); theta = [0.5, -1.0] so thr = [0.5, 1.0] (as in test_delta.py)
X = [[[0.25, 1.5], [1.25, 1.6], [1.4, -0.5]]]
G = [[[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]]]
W, FAN_OUT = 0.1, 3.0
K = W * FAN_OUT / 4  # loss = K * loss_sum (numel(d) = 4)


def _layer(**kw):
    layer = ds.DeltaActivation(
        granularity="channel", threshold_init=0.5, sparsity_weight=W, fan_out=FAN_OUT,
        num_channels=2, **kw,
    )  # fmt: skip
    with torch.no_grad():
        layer.theta.copy_(torch.tensor([0.5, -1.0]))
    return layer


# -- scalar gate, hysteresis ------------------------------------------------------------------
# ch0: a = [0.25, 1.25, 1.4], thr 0.5: |0.25-0| no -> 0; |1.25-0| yes -> 1.25; |0.15| no
# ch1: a = [1.5, 1.6, -0.5], thr 1.0: |1.5| yes -> 1.5; |0.1| no; |-2.0| yes -> -0.5
Q_SH = [[[0.0, 1.5], [1.25, 1.5], [1.25, -0.5]]]


def test_scalar_hysteresis_forward_counts_loss():
    layer = _layer(mode="hysteresis")
    q = layer(torch.tensor(X))
    assert torch.equal(q, torch.tensor(Q_SH))
    assert layer.stats.nonzero == 2 and layer.stats.total == 4  # d: ch0 [1.25, 0], ch1 [0, -2]
    assert layer.loss.item() == pytest.approx(K * 3.25)


def test_scalar_hysteresis_gradients():
    layer = _layer(mode="hysteresis")
    x = torch.tensor(X, requires_grad=True)
    g = torch.tensor(G)
    (layer(x) * g).sum().backward()
    assert torch.equal(x.grad, g)  # straight-through
    # dq/dthr = -q/thr: levels ch0 [0, 2.5, 2.5], ch1 [1.5, 1.5, -0.5]
    # ch0: -(0 + 7.5 + 1.25) = -8.75; ch1: -(3 - 1.5 - 2) = 0.5, times sign(theta) = -1
    assert torch.allclose(layer.theta.grad, torch.tensor([-8.75, -0.5]))

    layer = _layer(mode="hysteresis")
    x = torch.tensor(X, requires_grad=True)
    layer(x)
    layer.loss.backward()
    # dloss/dq_t = K (sgn d_t - sgn d_{t+1}); sgn d: ch0 [1, 0], ch1 [0, -1]
    assert torch.allclose(x.grad, K * torch.tensor([[[-1.0, 0.0], [1.0, 1.0], [0.0, -1.0]]]))
    # ch0: -K (1 * 2.5) ; ch1: -K (1 * 1.5 + -1 * -0.5) = -2K, times -1
    assert torch.allclose(layer.theta.grad, torch.tensor([-2.5 * K, 2.0 * K]))


# -- pixel gate, hysteresis -------------------------------------------------------------------
# t0: ch1 |1.5| > 1 -> the whole pixel is sent: [0.25, 1.5]
# t1: |1.25-0.25| = 1.0 > 0.5 on ch0 -> sent: [1.25, 1.6]
# t2: |-0.5-1.6| = 2.1 > 1 on ch1 -> sent: [1.4, -0.5]
Q_PH = [[[0.25, 1.5], [1.25, 1.6], [1.4, -0.5]]]


def test_pixel_hysteresis_forward_counts_loss():
    layer = _layer(mode="hysteresis", gate="pixel")
    q = layer(torch.tensor(X))
    assert torch.allclose(q, torch.tensor(Q_PH))
    assert torch.equal(q, torch.tensor(X))  # every pixel was sent: the output is the input
    assert layer.stats.nonzero == 4 and layer.stats.total == 4  # 2 pixels x 2 channels
    n1, n2 = math.hypot(1.0, 0.1), math.hypot(0.15, 2.1)
    assert layer.loss.item() == pytest.approx(K * math.sqrt(2) * (n1 + n2), rel=1e-6)


def test_pixel_hysteresis_gradients():
    layer = _layer(mode="hysteresis", gate="pixel")
    x = torch.tensor(X, requires_grad=True)
    (layer(x) * torch.tensor(G)).sum().backward()
    assert torch.equal(x.grad, torch.tensor(G))
    # levels ch0 = [0.5, 2.5, 2.8], ch1 = [1.5, 1.6, -0.5]
    assert torch.allclose(layer.theta.grad, torch.tensor([-9.4, -0.6]), atol=1e-5)

    layer = _layer(mode="hysteresis", gate="pixel")
    x = torch.tensor(X, requires_grad=True)
    layer(x)
    layer.loss.backward()
    d1, d2 = torch.tensor([1.0, 0.1]), torch.tensor([0.15, -2.1])
    s1, s2 = math.sqrt(2) * d1 / d1.norm(), math.sqrt(2) * d2 / d2.norm()
    want = K * torch.stack([-s1, s1 - s2, s2])[None]
    assert torch.allclose(x.grad, want, atol=1e-6)
    lv = torch.tensor([[0.5, 1.5], [2.5, 1.6], [2.8, -0.5]])
    grad_thr = -(want[0] * lv).sum(0)
    assert torch.allclose(layer.theta.grad, grad_thr * torch.tensor([1.0, -1.0]), atol=1e-6)


# -- pixel gate, grid -------------------------------------------------------------------------
def test_pixel_grid_forward_is_the_quantiser_counts_are_pixels():
    scalar, pixel = _layer(), _layer(gate="pixel")
    x = torch.tensor(X)
    assert torch.equal(scalar(x), pixel(x))
    # d: ch0 [1.0, 0.5], ch1 [0, -2]: both frames have a changed pixel -> 2 pixels x 2 channels
    assert scalar.stats.nonzero == 3 and pixel.stats.nonzero == 4
    want = K * math.sqrt(2) * (1.0 + math.hypot(0.5, 2.0))
    assert pixel.loss.item() == pytest.approx(want, rel=1e-6)


# -- an independent float64 reference over random clips ---------------------------------------
def _reference(x, thr, mode, gate):
    """Loops over time and pixels in float64: (q, nonzero, loss_sum)."""
    x = x.double()
    b, t, c = x.shape[:3]
    thr = thr.double().reshape(c, *([1] * (x.dim() - 3)))
    if mode == "grid":
        q = torch.round(x / thr) * thr
    else:
        q = torch.empty_like(x)
        ref = torch.zeros_like(x[:, 0])
        for i in range(t):
            send = (x[:, i] - ref).abs() > thr
            if gate == "pixel":
                send = send.any(1, keepdim=True).expand_as(send)
            ref = torch.where(send, x[:, i], ref)
            q[:, i] = ref
    d = q[:, 1:] - q[:, :-1]
    if gate == "scalar":
        return q, int((d != 0).sum()), float(d.abs().sum())
    norms = d.norm(dim=2)
    return q, int((norms > 0).sum()) * c, float(math.sqrt(c) * norms.sum())


@pytest.mark.parametrize("gate", ["scalar", "pixel"])
@pytest.mark.parametrize("mode", ["grid", "hysteresis"])
@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 4, 6, 3, 5)])
def test_random_clips_match_float64_reference(gate, mode, shape):
    g = torch.Generator().manual_seed(hash((gate, mode, shape)) % 2**31)
    c = shape[2]
    # a slowly drifting signal with noise: some entries cross, most do not
    x = torch.randn(shape, generator=g).cumsum(1) * 0.2 + 0.05 * torch.randn(shape, generator=g)
    thr = 0.1 + torch.rand(c, generator=g) * 0.3
    layer = ds.DeltaActivation(num_channels=c, gate=gate, mode=mode, fan_out=2.0,
                               sparsity_weight=1.0)  # fmt: skip
    with torch.no_grad():
        layer.theta.copy_(thr)
    q = layer(x)
    q_ref, nonzero, loss_sum = _reference(x, thr, mode, gate)
    numel = x[:, 1:].numel()
    assert torch.allclose(q.double(), q_ref, atol=1e-6)
    assert layer.stats.nonzero == nonzero
    assert layer.loss.item() == pytest.approx(2.0 * loss_sum / numel, rel=1e-5)


@pytest.mark.parametrize("gate", ["scalar", "pixel"])
def test_hysteresis_error_is_bounded_by_the_step(gate):
    """|q_t - a_t| <= thr for every scalar and every frame, the first included."""
    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(4, 30, 8, 5, 5, generator=g).cumsum(1) * 0.3)
    layer = ds.DeltaActivation(granularity="neuron", neuron_shape=(8, 5, 5), gate=gate,
                               mode="hysteresis")  # fmt: skip
    with torch.no_grad():
        layer.theta.copy_(0.05 + torch.rand(8, 5, 5, generator=g))
    q = layer(x)
    err, thr = (q - x).abs().detach(), layer.threshold.detach()
    assert bool((err <= thr).all())
    assert float(err.max()) > 0.5 * float(thr.min())  # the bound is not vacuous
    assert layer.stats.nonzero < layer.stats.total  # and it does skip changes


@pytest.mark.parametrize("gate", ["scalar", "pixel"])
def test_hysteresis_frames_stream_like_the_clip(gate):
    """Streaming, the per-frame layer called frame by frame equals the clip forward; reset
    starts over; outside streaming every call is the first frame of a stream."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, 4, 2, 2, generator=g).cumsum(1) * 0.2
    clip_layer = ds.DeltaActivation(num_channels=4, gate=gate, mode="hysteresis",
                                    threshold_init=0.15)  # fmt: skip
    frame_layer = ds.DeltaActivation(num_channels=4, gate=gate, mode="hysteresis",
                                     threshold_init=0.15, input_layout="frame")  # fmt: skip
    want = clip_layer(x)
    with ds.streaming(frame_layer):
        got = torch.stack([frame_layer(x[:, t]) for t in range(x.shape[1])], 1)
        assert torch.equal(got, want)
        with pytest.raises(ValueError, match="reset_state"):
            frame_layer(x[:2, 0])  # another batch of streams without a reset
        ds.reset_state(frame_layer)
        assert torch.equal(frame_layer(x[:, 0]), want[:, 0])
    for t in range(3):  # stateless again: each frame against a zero reference
        first = clip_layer(torch.stack([x[:, t], x[:, t]], 1))[:, 0]
        assert torch.equal(frame_layer(x[:, t]), first)


def test_hysteresis_sparsity_loss_raises_the_step():
    x = torch.randn(2, 6, 4, 3, 3).cumsum(1)
    layer = ds.DeltaActivation(num_channels=4, mode="hysteresis", gate="pixel")
    layer(x)
    layer.loss.backward()
    assert bool((layer.theta.grad < 0).all())


def test_hysteresis_relu_activation_and_bf16():
    x = torch.randn(2, 4, 3, 5)
    layer = ds.DeltaActivation(num_channels=3, mode="hysteresis", activation="relu")
    q = layer(x)
    assert bool((q >= 0).all())
    q16 = layer(x.bfloat16())
    assert q16.dtype == torch.bfloat16 and bool(((q16.float() - torch.relu(x)).abs()
                                                 <= layer.threshold[:, None] + 1e-2).all())


def test_bad_gate_and_mode_options():
    with pytest.raises(ValueError, match="gate"):
        ds.DeltaActivation(gate="tile")
    with pytest.raises(ValueError, match="mode"):
        ds.DeltaActivation(mode="sigma")
    with pytest.raises(ValueError, match="hysteresis"):
        ds.DeltaActivation(mode="hysteresis", sigma=True)
    with pytest.raises(ValueError, match="grid quantiser"):
        ds.DeltaActivation(num_channels=2, mode="hysteresis").quantize(torch.zeros(1, 2))


# -- the receptive-field weights of the pixel loss (DeltaActivation.spread) --------------------
def test_spread_weights_count_the_consumer_rows_each_change_reaches():
    """One consumer, a 3x3 conv (padding 1) with 2 output channels on a 4x4 map: a row costs
    9 * C * 2 MACs. Changes of norm 1 at (1, 1) and 0.5 at (1, 2): the 9 rows around (1, 1)
    have their largest change there, 3 more rows (column 3) see only (1, 2): the loss is the
    rows the engine recomputes (12), each weighted by the largest change in its window."""
    c = 2
    layer = ds.DeltaActivation(num_channels=c, gate="pixel", mode="grid", sparsity_weight=1.0,
                               fan_out=9 * 2, threshold_init=0.01)  # fmt: skip
    macs = 9 * c * 2
    layer.spread = [{"windows": [((3, 3), (1, 1), (1, 1), (1, 1), False)], "macs_per_row": macs}]
    x = torch.zeros(1, 2, c, 4, 4)
    x[0, 1, :, 1, 1] = torch.tensor([0.6, 0.8])  # norm 1.0
    x[0, 1, :, 1, 2] = torch.tensor([0.3, 0.4])  # norm 0.5
    layer(x)
    want = macs * (9 * 1.0 + 3 * 0.5) / math.sqrt(c) / x[:, 1:].numel()
    assert layer.loss.item() == pytest.approx(want, rel=1e-5)
    # without the spread the same changes cost the plain group loss
    plain = ds.DeltaActivation(num_channels=c, gate="pixel", mode="grid", sparsity_weight=1.0,
                               fan_out=9 * 2, threshold_init=0.01)  # fmt: skip
    plain(x)
    assert plain.loss.item() == pytest.approx(18 * math.sqrt(c) * 1.5 / x[:, 1:].numel(),
                                              rel=1e-5)  # fmt: skip


def test_spread_weights_through_a_pool_and_gradients():
    """A 2x2 max pool, then a 1x1 conv: a change costs one pooled row; two changes inside one
    pool window cost one row, at the larger change (the smaller one gets no gradient)."""
    layer = ds.DeltaActivation(num_channels=1, gate="pixel", mode="grid", sparsity_weight=1.0,
                               threshold_init=0.01)  # fmt: skip
    layer.spread = [{"windows": [((2, 2), (2, 2), (0, 0), (1, 1), False),
                                 ((1, 1), (1, 1), (0, 0), (1, 1), False)], "macs_per_row": 5}]
    x = torch.zeros(1, 2, 1, 4, 4)
    x[0, 1, 0, 0, 0], x[0, 1, 0, 1, 1], x[0, 1, 0, 3, 3] = 2.0, 1.0, 0.5
    x.requires_grad_()
    layer(x)
    assert layer.loss.item() == pytest.approx(5 * (2.0 + 0.5) / 16, rel=1e-5)
    layer.loss.backward()
    g = x.grad[0, 1, 0]
    assert g[0, 0] > 0 and g[3, 3] > 0 and g[1, 1] == 0  # (1, 1) is not its window's max


def test_convert_gives_pixel_gates_their_consumer_windows():
    model = ds.models.create("convnet", num_classes=3, width_mult=0.5)
    gm = ds.convert(model, ds.DeltaConfig(gate="pixel", on_input=True))
    layers = dict(ds.layers.sparsity_layers(gm))
    first = layers["features.2_delta"].spread
    assert first == [{"windows": [((2, 2), (2, 2), (0, 0), (1, 1), False),
                                  ((3, 3), (1, 1), (1, 1), (1, 1), False)],
                      "macs_per_row": 9 * 12 * 24}]  # fmt: skip
    last = layers["features.14_delta"].spread  # max pool, global pool, flatten, linear
    assert last[0]["windows"][-1] == "global" and last[0]["macs_per_row"] == 96 * 3
    assert layers["input_delta"].spread[0]["macs_per_row"] == 9 * 3 * 12
    scalar = ds.convert(ds.models.create("convnet", num_classes=3), ds.DeltaConfig())
    assert all(m.spread is None for _, m in ds.layers.sparsity_layers(scalar))


def test_spread_weights_of_a_dilated_window():
    """3x3 dilation 2 padding 2 (max_pool2d refuses that padding; it is emulated): a lone
    change in the middle of a 7x7 map reaches 9 rows."""
    layer = ds.DeltaActivation(num_channels=1, gate="pixel", sparsity_weight=1.0,
                               threshold_init=0.01)  # fmt: skip
    layer.spread = [{"windows": [((3, 3), (1, 1), (2, 2), (2, 2), False)], "macs_per_row": 1}]
    x = torch.zeros(1, 2, 1, 7, 7)
    x[0, 1, 0, 3, 3] = 1.0
    layer(x)
    assert layer.loss.item() == pytest.approx(9 * 1.0 / 49, rel=1e-6)


class _FunctionalPools(torch.nn.Module):
    """conv -> relu -> F.max_pool2d(3, 2, 1, dilation 1, ceil_mode) -> F.avg_pool2d -> 1x1."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.nn.functional.max_pool2d(x, 3, 2, 1, 1, True)
        x = torch.nn.functional.avg_pool2d(x, kernel_size=2, ceil_mode=True)
        return self.head(x)


def test_convert_reads_every_argument_of_functional_pools():
    """ceil_mode and dilation of F.max_pool2d / F.avg_pool2d reach the spread windows (they
    were dropped: the spread weights of such pools were wrong)."""
    gm = ds.convert(_FunctionalPools(), ds.DeltaConfig(gate="pixel"))
    (layer,) = [m for _, m in ds.layers.sparsity_layers(gm)]
    assert layer.spread == [{"windows": [((3, 3), (2, 2), (1, 1), (1, 1), True),
                                         ((2, 2), (2, 2), (0, 0), (1, 1), True),
                                         ((1, 1), (1, 1), (0, 0), (1, 1), False)],
                             "macs_per_row": 4 * 2}]  # fmt: skip


def test_pixel_hysteresis_step_is_any_channel_over_its_step():
    """The pixel send (computed as max_c(|d| - thr) > 0) is exactly any_c(|d| > thr), ties and
    differences of one ulp included."""
    from deltasparse.layers import hysteresis_step

    g = torch.Generator().manual_seed(0)
    thr = torch.rand(1, 5, 1, 1, generator=g) + 0.1
    ref = torch.randn(4, 5, 6, 6, generator=g)
    d = torch.randn(4, 5, 6, 6, generator=g) * thr
    d[0] = thr[0]  # |d| == thr exactly: not sent
    d[1] = torch.nextafter(thr[0], torch.tensor(9.0))  # one ulp above: sent
    a = ref + d
    want_send = ((a - ref).abs() > thr).any(dim=1, keepdim=True)
    got = hysteresis_step(a, ref, thr, pixel=True)
    torch.testing.assert_close(got, torch.where(want_send, a, ref), rtol=0, atol=0)
    assert want_send.any() and not want_send.all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["grid", "hysteresis"])
def test_pixel_gate_half_gradients_are_finite_and_match_float32(dtype, mode):
    """Unchanged pixels (norm 0) and tiny norms must not overflow the per-pixel loss factor in
    half precision (it gave NaN gradients)."""
    torch.manual_seed(0)
    x32 = (torch.randn(2, 3, 4, 5, 5) * 32).round() / 16  # exact in half precision
    x32[:, 2] = x32[:, 1]  # a repeated frame: every pixel unchanged
    grads = {}
    for dt in (torch.float32, dtype):
        layer = ds.DeltaActivation(num_channels=4, gate="pixel", mode=mode, sparsity_weight=0.5,
                                   fan_out=4.0, threshold_init=0.25)  # fmt: skip
        x = x32.detach().to(dt).clone().requires_grad_(True)
        y = layer(x)
        ((y.float() * 0.1).sum() + layer.loss).backward()
        assert torch.isfinite(x.grad.float()).all() and torch.isfinite(layer.theta.grad).all()
        grads[dt] = (x.grad.float(), layer.theta.grad)
    torch.testing.assert_close(grads[dtype][0], grads[torch.float32][0], rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(grads[dtype][1], grads[torch.float32][1], rtol=5e-2, atol=5e-2)
