"""ActivationL1, the spatial-only baseline of arXiv 2107.07305: identity, weighted L1, counts."""

import pytest
import torch

import deltasparse as ds


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 3, 4, 5), (2, 3, 2, 4, 4), (6, 4, 3, 3)])
def test_identity_loss_counts(shape):
    layer = ds.ActivationL1(sparsity_weight=0.5, fan_out=3.0)
    x = torch.relu(torch.randn(shape)).requires_grad_(True)
    y = layer(x)
    assert torch.equal(y, x)
    nz = int((x != 0).sum())
    assert layer.stats.nonzero == nz and layer.stats["nonzero"] == nz
    assert layer.stats.total == x.numel() and layer.stats.fan_out == 3.0
    expected = 0.5 * 3.0 * x.detach().abs().sum() / x.numel()
    torch.testing.assert_close(layer.loss, expected)
    layer.loss.backward()
    torch.testing.assert_close(x.grad, 0.5 * 3.0 * torch.sign(x.detach()) / x.numel())
    assert list(layer.parameters()) == []


def test_hand_case():
    layer = ds.ActivationL1(sparsity_weight=0.1, fan_out=2.0)
    x = torch.tensor([[[0.0, 1.5], [-2.0, 0.0], [0.5, 0.0]]])  # 3 nonzero of 6, sum|x| = 4
    layer(x)
    assert layer.stats.nonzero == 3 and layer.stats.total == 6
    assert layer.loss.item() == pytest.approx(0.1 * 2.0 * 4.0 / 6)


def test_bad_input():
    layer = ds.ActivationL1()
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        layer(torch.randn(5))
    with pytest.raises(ValueError, match="fan_out"):
        ds.ActivationL1(fan_out=-2.0)


def test_half_dtype_loss_is_float32():
    layer = ds.ActivationL1(sparsity_weight=1.0)
    x = torch.full((1, 2, 3), 2.0, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    assert layer.loss.dtype == torch.float32 and layer.loss.item() == 2.0


def test_non_finite_values_are_counted():
    layer = ds.ActivationL1()
    x = torch.zeros(1, 2, 5)
    x[0, 0, 1], x[0, 1, 2], x[0, 1, 3] = float("nan"), float("inf"), 1.0
    layer(x)
    assert layer.stats.nonzero == 3 == int(torch.count_nonzero(x))
