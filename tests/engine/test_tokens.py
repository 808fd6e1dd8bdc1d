"""The token engine: equal to the dense streaming model of the gated network on realistic
footage, history independent over 1,000 frames, skipping work on a static scene, counting what
it computes (by hand on a tiny case, and measure() == the engine), for timm-style attention and
nn.MultiheadAttention, with clear errors for what it cannot run."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltasparse as ds
from deltasparse.data.streams import synthetic_stream
from deltasparse.engine.plan import UnsupportedOpError


def _vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(num_classes=5, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return ds.models.create("vit_tiny", **{**args, **kw}).eval()


def _gated(model, thr=0.05, **kw):
    return ds.convert(model, ds.DeltaConfig(kind="token", threshold_init=thr, **kw)).eval()


def _footage(n, batch=2, seed=1, noise=0.01):
    return list(synthetic_stream(n, (batch, 3, 32, 32), noise=noise, seed=seed))


def test_convert_places_gates_before_qkv_and_mlp_with_fan_out_from_the_graph():
    gm = _gated(_vit())
    gates = dict(ds.layers.sparsity_layers(gm))
    assert list(gates) == [f"blocks.{b}.norm{i}_token" for b in range(2) for i in (1, 2)]
    d = 32
    assert gates["blocks.0.norm1_token"].fan_out == 3 * d * d  # q, k, v of one token
    assert gates["blocks.0.norm2_token"].fan_out == 2 * d * 4 * d  # fc1 + fc2 of one token
    assert ds.DeltaConfig.from_json(ds.DeltaConfig(kind="token", policy="topk", k=3).to_json()).k == 3


def test_convert_token_errors_name_the_fix():
    cnn = ds.models.create("convnet", num_classes=3)
    with pytest.raises(ValueError, match="kind='delta'"):
        ds.convert(cnn, ds.DeltaConfig(kind="token"))
    with pytest.raises(ValueError, match="on_input"):
        ds.DeltaConfig(kind="token", on_input=True)


@pytest.mark.parametrize("policy", [dict(), dict(policy="topk", k=5), dict(policy="fraction", fraction=0.3)])
def test_engine_equals_the_dense_streaming_model(policy):
    gm = _gated(_vit(), **policy)
    eng = ds.DeltaEngine(gm)
    frames = _footage(30)
    agree = 0
    with torch.no_grad(), ds.streaming(gm):
        for t, f in enumerate(frames):
            want, got = gm(f), eng.step(f)
            err = float((want - got).abs().max()) / float(want.abs().max())
            assert err <= 1e-5, f"frame {t}: {err}"
            agree += int(torch.equal(want.argmax(1), got.argmax(1)))
    assert agree == len(frames)
    st = eng.stats
    assert 0 < st.density < 1


def test_reference_backend_equals_torch_backend():
    gm = _gated(_vit(1))
    a, b = ds.DeltaEngine(gm, backend="torch"), ds.DeltaEngine(gm, backend="reference")
    for f in _footage(12, seed=4):
        ya, yb = a.step(f), b.step(f)
        assert float((ya - yb).abs().max()) <= 1e-5 * float(yb.abs().max())
    assert b.stats.density == 1.0 and a.stats.density < 1.0


def test_history_independence_over_1000_frames():
    """Every streamed output equals the gated network recomputed by the model's own modules
    from the current frame and the gates' current references: nothing drifts."""
    gm = _gated(_vit(2, depth=1, embed_dim=16), thr=0.03)
    eng = ds.DeltaEngine(gm)
    worst = 0.0
    for t, f in enumerate(synthetic_stream(1000, (1, 3, 32, 32), noise=0.01, seed=5)):
        y = eng.step(f)
        if t % 10 == 0 or t > 990:
            r = eng.tokens.replay()
            worst = max(worst, float((y - r).abs().max()) / float(r.abs().max()))
    assert worst <= 1e-5
    assert eng.stats.frames == 1000
    sent = {o["name"]: o for o in eng.stats.layers}["blocks.0.norm1_token"]["computed_density"]
    assert 0.01 < sent < 0.9  # tokens were sent and held all along: the state was exercised


def test_static_scene_costs_nothing_after_the_first_frame():
    gm = _gated(_vit())
    eng = ds.DeltaEngine(gm)
    f = _footage(1)[0]
    y0 = eng.step(f)
    dense = eng.stats.effective_macs
    for _ in range(5):
        assert torch.equal(eng.step(f.clone()), y0)
    assert eng.stats.effective_macs == dense
    assert eng.stats.dense_macs == 6 * dense


def test_counts_by_hand_one_changed_patch_and_gates_that_hold():
    """One pixel changes; the gates' threshold is huge, so nothing is sent: the engine computes
    that patch's embedding and the head's row, nothing else (the pooled mean changed)."""
    gm = _gated(_vit(), thr=1e6)
    eng = ds.DeltaEngine(gm)
    f = torch.rand(1, 3, 32, 32)
    eng.step(f)
    first = eng.stats.effective_macs
    g = f.clone()
    g[0, 1, 9, 17] += 0.5  # patch (1, 2)
    eng.step(g)
    d = 32
    assert eng.stats.effective_macs - first == 3 * 8 * 8 * d + d * 5
    ops = {o["name"]: o for o in eng.stats.layers}
    assert ops["blocks.0.attn.qkv"]["effective_macs"] == 16 * 3 * d * d  # the first frame only


def test_measure_counts_what_the_engine_executes():
    gm = _gated(_vit(3), thr=0.05)
    video = ds.VideoModel(gm).eval()
    frames = torch.stack(_footage(6, batch=2, seed=7), dim=1)  # (B, T, C, H, W)
    rep = ds.measure(video, [frames])
    eng = ds.DeltaEngine(gm)
    for t in range(frames.shape[1]):
        eng.step(frames[:, t])
        if t == 0:
            first = eng.stats
    st = eng.stats
    executed = (st.effective_macs - first.effective_macs) / (st.dense_macs - first.dense_macs)
    assert rep.executed_fraction == pytest.approx(executed, rel=1e-12)
    ops = rep.executed["ops"]
    assert set(ops) >= {"qkv", "qk", "av", "proj", "mlp", "patch_embed"}
    assert 0 < ops["mlp"]["executed_fraction"] < 1
    row = {r.name: r for r in rep.layers}["blocks.0.norm1_token"]
    assert row.kind == "token" and 0 < row.temporal_density < 1
    assert row.total == 2 * 5 * 16  # tokens of frames t >= 1


def test_measure_probes_a_plain_transformer_with_exact_token_changes():
    rep = ds.measure(ds.VideoModel(_vit()), [torch.stack(_footage(4, noise=0.0), dim=1)])
    assert rep.mode == "temporal"
    assert rep.executed_fraction is not None and rep.executed_fraction <= 1.0


class _MHABlock(nn.Module):
    """A torchvision-style encoder block: nn.MultiheadAttention(batch_first=True)."""

    def __init__(self, d=24, heads=3):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class _MHAViT(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, d, 8, stride=8)
        self.pos = nn.Parameter(0.02 * torch.randn(1, 16, d))
        self.block = _MHABlock(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).permute(0, 2, 1) + self.pos
        return self.head(self.block(x).mean(1))


def test_multihead_attention_model_streams_exactly():
    torch.manual_seed(0)
    gm = _gated(_MHAViT().eval())
    assert len(list(ds.layers.sparsity_layers(gm))) == 2
    eng = ds.DeltaEngine(gm)
    with torch.no_grad(), ds.streaming(gm):
        for f in _footage(10, seed=9):
            want, got = gm(f), eng.step(f)
            assert float((want - got).abs().max()) <= 1e-5 * float(want.abs().max())


class _FunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.vit = _vit()
        self.w = nn.Parameter(torch.randn(5, 5))

    def forward(self, x):
        return F.linear(self.vit(x), self.w)


class _MaskedAttention(nn.Module):
    """timm-like attributes, but a causal mask: not what the token engine computes."""

    def __init__(self, d=32, heads=2):
        super().__init__()
        self.num_heads, self.scale = heads, (d // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def test_what_the_token_engine_cannot_run_is_a_clear_error():
    with pytest.raises(UnsupportedOpError, match="functional op"):
        ds.DeltaEngine(_FunctionalLinear().eval())
    m = _vit()
    m.blocks[0].attn = _MaskedAttention()
    eng = ds.DeltaEngine(_gated(m))
    with pytest.raises(UnsupportedOpError, match="computes something else"):
        eng.step(_footage(1)[0])
    with pytest.raises(ValueError, match="backend 'torch'"):
        ds.DeltaEngine(_gated(_vit()), backend="cpp")


def test_bfloat16_token_engine_follows_the_bfloat16_model():
    """Half precision: state in the model's dtype; every frame close to the bf16 dense
    streaming model (bf16 rounding, not a drift), the same top-1, and the engine's own replay
    equal to its output."""
    gm = _gated(_vit(5)).to(torch.bfloat16)
    eng = ds.DeltaEngine(gm)
    with torch.no_grad(), ds.streaming(gm):
        for f in _footage(15, seed=11):
            f = f.to(torch.bfloat16)
            want, got = gm(f).float(), eng.step(f).float()
            assert float((want - got).abs().max()) <= 3e-2 * float(want.abs().max())
            r = eng.tokens.replay().float()
            assert float((got - r).abs().max()) <= 3e-2 * float(r.abs().max())
    assert eng.stats.density < 1


def test_incremental_attention_scores_are_exact_and_counted():
    """Few tokens sent: QK^T is updated in the changed queries' rows and the changed keys'
    columns only (stored scores), softmax and AV for every query; every frame equals the dense
    streaming model, and the qk MACs counted are those rows and columns."""
    gm = _gated(_vit(6), policy="topk", k=2)
    eng = ds.DeltaEngine(gm)
    eng.tokens.scores_cap = 1 << 30
    with torch.no_grad(), ds.streaming(gm):
        for t, f in enumerate(_footage(12, seed=13)):
            want, got = gm(f), eng.step(f)
            assert float((want - got).abs().max()) <= 1e-5 * float(want.abs().max()), t
    ops = {o["name"]: o for o in eng.stats.layers}
    qk, av = ops["blocks.0.attn.qk"], ops["blocks.0.attn.av"]
    # 16 tokens, at most 2 sent per sample (the union over the 2 streams: <= 4 columns)
    frames = 12
    steady = qk["effective_macs"] - qk["dense_macs"] / frames  # after the dense first frame
    assert 0 < steady <= (frames - 1) * 2 * 2 * 4 * 16 * 32  # samples x 2 x cols x L x D
    assert av["effective_macs"] == av["dense_macs"]  # AV: every query, every frame
    assert eng.tokens.scores  # the scores were kept


class _OddBlocks(nn.Module):
    """What a real transformer zoo has and the plain ViT does not: a GLU MLP (chunk: a tuple
    of views), an in-place LayerScale (mul_), a token-mixing MLP on transposed tokens (a
    non-contiguous intermediate), and an fc_norm head on pooled tokens (an (N, D) gate)."""

    def __init__(self, d=32, tokens=16):
        super().__init__()
        self.embed = nn.Conv2d(3, d, 8, stride=8)
        self.norm1 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))
        self.norm2 = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.act = nn.GELU()
        self.tok = nn.Linear(tokens, tokens)
        self.fc_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        a, b = self.fc1(self.norm1(x)).chunk(2, -1)
        x = x + self.fc2(a * F.silu(b)).mul_(self.gamma)
        m = self.act(self.mix(self.norm2(x)).transpose(1, 2))  # (N, D, L), not contiguous
        x = x + self.tok(m).transpose(1, 2)
        return self.head(self.fc_norm(x.mean(1)))


@pytest.mark.parametrize("policy", [dict(), dict(policy="topk", k=3)])
def test_tuples_in_place_ops_transposes_and_pooled_gates_stream_exactly(policy):
    torch.manual_seed(0)
    gm = _gated(_OddBlocks().eval(), thr=0.02, **policy)
    assert "fc_norm_token" in dict(ds.layers.sparsity_layers(gm))
    eng = ds.DeltaEngine(gm)
    base = _footage(1, batch=3, seed=2)[0]
    outs, wants = [], []
    with torch.no_grad(), ds.streaming(gm):
        for t in range(10):
            f = base.clone()
            f[0] += 0.05 * t  # sample 0 changes everywhere, 1 in one patch, 2 never
            f[1, :, :8, :8] += 0.1 * (t % 3)
            wants.append(gm(f))
            outs.append(eng.step(f))
            r = eng.tokens.replay()
            assert float((outs[-1] - r).abs().max()) <= 1e-5 * float(r.abs().max()), t
    for t, (want, got) in enumerate(zip(wants, outs, strict=True)):  # outputs kept intact
        assert float((want - got).abs().max()) <= 1e-5 * float(want.abs().max()), t


def test_mha_with_weights_and_matmul_methods_are_refused():
    class Weights(_MHAViT):
        def forward(self, x):
            x = self.conv_proj(x).flatten(2).permute(0, 2, 1) + self.pos
            y, w = self.block.self_attention(x, x, x)
            return self.head(y.mean(1)) + w.mean()

    class MatMul(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = _vit()
            self.register_buffer("w", torch.randn(5, 5))

        def forward(self, x):
            return self.vit(x).matmul(self.w)

    eng = ds.DeltaEngine(Weights().eval())
    with pytest.raises(UnsupportedOpError, match="need_weights=False"):
        eng.step(_footage(1)[0])
    with pytest.raises(UnsupportedOpError, match="method call"):
        ds.DeltaEngine(MatMul().eval())


def test_budget_policies_skip_a_static_scene():
    gm = _gated(_vit(), policy="fraction", fraction=0.2)
    eng = ds.DeltaEngine(gm)
    f = _footage(1)[0]
    eng.step(f)
    dense = eng.stats.effective_macs
    for _ in range(3):
        eng.step(f)
    assert eng.stats.effective_macs == dense
