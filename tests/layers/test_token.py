"""TokenDelta: token gates on hand-computed tiny cases (forward, counts, loss, both gradients),
the budget policies, the error bound, and frames under ds.streaming equal to clips."""

import math

import pytest
import torch

import deltasparse as ds
from deltasparse.layers.token import token_send

# one clip, 3 frames, 2 tokens of 2 features; threshold 0.5 (an RMS change per element)
A = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]],
                   [[0.4, 0.4], [2.0, 1.0]],  # token 0: e = 0.4 (kept); token 1: e = 0.707 (sent)
                   [[0.6, 0.6], [2.0, 1.0]]]])  # token 0: e = 0.6 vs its reference 0 (sent)
Q = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]],
                   [[0.0, 0.0], [2.0, 1.0]],
                   [[0.6, 0.6], [2.0, 1.0]]]])


def test_threshold_policy_forward_counts_and_loss_by_hand():
    g = ds.TokenDelta(threshold_init=0.5, sparsity_weight=0.1, fan_out=3.0)
    q = g(A)
    assert torch.equal(q, Q)
    assert (g.stats.nonzero, g.stats.total, g.stats.fan_out) == (2, 4, 3.0)
    norms = 1.0 + math.sqrt(0.72)  # ||d_1|| = 1 (token 1), ||d_2|| = 0.8485 (token 0)
    want = 0.1 * 3.0 * norms / math.sqrt(2) / 8  # numel(d) = 2 frames x 2 tokens x 2
    assert float(g.loss.detach()) == pytest.approx(want, rel=1e-6)


def test_gradients_straight_through_and_the_papers_threshold_rule():
    g = ds.TokenDelta(threshold_init=0.5, sparsity_weight=0.1, fan_out=3.0)
    a = A.clone().requires_grad_(True)
    g(a).sum().backward()
    assert torch.equal(a.grad, torch.ones_like(a))  # dq/da = 1
    assert float(g.theta.grad) == pytest.approx(-float(Q.sum()) / 0.5)  # dq/dthr = -q/thr
    # the sparsity loss alone raises the step: d loss / d thr = -loss / thr
    g.theta.grad = None
    g(A)
    g.loss.backward()
    assert float(g.theta.grad) == pytest.approx(-float(g.loss.detach()) / 0.5, rel=1e-5)


def test_budget_policies_never_send_unchanged_tokens_nor_train_the_threshold():
    e = torch.tensor([[0.0, 0.5, 0.0, 0.0]])
    assert token_send(e, "topk", None, 3, None).tolist() == [[False, True, False, False]]
    g = ds.TokenDelta(policy="fraction", fraction=0.5)
    assert not g.theta.requires_grad
    static = A[:, :1].repeat(1, 4, 1, 1)
    g(static)
    assert g.stats.nonzero == 0  # a static scene sends nothing, whatever the budget


def test_budget_policies_pick_the_largest_changes_lowest_index_first():
    e = torch.tensor([[0.3, 0.9, 0.3, 0.1]])
    assert token_send(e, "topk", None, 2, None).tolist() == [[True, True, False, False]]
    assert token_send(e, "fraction", None, None, 0.5).tolist() == [[True, True, False, False]]
    assert token_send(e, "fraction", None, None, 0.26).tolist() == [[True, True, False, False]]
    assert token_send(e, "topk", None, 0, None).sum() == 0
    g = ds.TokenDelta(policy="topk", k=1)
    q = g(A)
    # frame 1: token 1 changed most (0.707 > 0.4); frame 2: token 0 (0.6 against 0)
    assert torch.equal(q, Q)
    assert g.stats.nonzero == 2


def test_threshold_error_bound_at_every_frame():
    torch.manual_seed(0)
    a = torch.cumsum(0.05 * torch.randn(3, 30, 7, 16), dim=1)  # drifting tokens
    g = ds.TokenDelta(threshold_init=0.2)
    with torch.no_grad():
        q = g(a)
    rms = (q - a).pow(2).mean(-1).sqrt()
    assert float(rms.max()) <= 0.2 + 1e-6
    assert 0 < g.stats.nonzero < g.stats.total  # some tokens waited, some were sent


def test_frames_under_streaming_equal_the_clip():
    torch.manual_seed(1)
    a = torch.cumsum(0.1 * torch.randn(2, 6, 5, 8), dim=1)
    g = ds.TokenDelta(threshold_init=0.15, input_layout="frame")
    clip = ds.TokenDelta(threshold_init=0.15)(a)
    with ds.streaming(g):
        frames = torch.stack([g(a[:, t]) for t in range(a.shape[1])], dim=1)
    assert torch.equal(frames, clip)
    assert torch.equal(g(a[:, 3]), a[:, 3])  # outside streaming: a first frame, sent whole


def test_bad_arguments_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="policy"):
        ds.TokenDelta(policy="nope")
    with pytest.raises(ValueError, match="needs k"):
        ds.TokenDelta(policy="topk")
    with pytest.raises(ValueError, match="fraction"):
        ds.TokenDelta(policy="fraction", fraction=1.5)
    with pytest.raises(ValueError, match="clips"):
        ds.TokenDelta()(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="T=1"):
        ds.TokenDelta()(torch.zeros(1, 1, 4, 8))
    g = ds.TokenDelta(input_layout="frame")
    with ds.streaming(g):
        g(torch.zeros(2, 4, 8))
        with pytest.raises(ValueError, match="reset_state"):
            g(torch.zeros(3, 4, 8))
