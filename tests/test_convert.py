"""convert()/revert(): placement, exact fan-outs from the graph, options and DeltaConfig."""

import dataclasses
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import deltasparse as ds
from deltasparse._graph import FanOutError
from deltasparse.layers import SparsityLayer, sparsity_layers


def _fan_outs(model):
    return {name: layer.fan_out for name, layer in sparsity_layers(model)}


# -- MobileNet v1, the paper's model -----------------------------------------------------------
# conv1 -> dw s1 (9); each block: dw -> pw (C_out); pw -> next dw (9 at stride 1, 9/4 at
# stride 2); the last pw -> pool -> flatten -> dropout -> classifier (num_classes).
MOBILENET_FAN_OUTS = [
    9,
    64, 2.25, 128, 9, 128, 2.25, 256, 9, 256, 2.25,
    512, 9, 512, 9, 512, 9, 512, 9, 512, 9, 512, 2.25,
    1024, 9, 1024, 101,
]  # fmt: skip


def test_mobilenet_v1_default_placement_and_fan_outs():
    model = ds.models.mobilenet_v1(num_classes=101)
    gm = ds.convert(model)
    layers = list(sparsity_layers(gm))
    assert len(layers) == 27
    assert all(isinstance(m, ds.DeltaActivation) for _, m in layers)
    assert [m.fan_out for _, m in layers] == MOBILENET_FAN_OUTS
    names = ["features.0.2_delta"] + [
        f"features.{i}.{j}.2_delta" for i in range(1, 14) for j in (0, 1)
    ]
    assert [n for n, _ in layers] == names
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], SparsityLayer):
            (src,) = node.args
            assert isinstance(modules[src.target], nn.ReLU6)  # right after every ReLU6
            assert list(src.users) == [node]  # and nothing bypasses it


def test_mobilenet_on_input():
    gm = ds.convert(ds.models.mobilenet_v1(num_classes=10), ds.DeltaConfig(on_input=True))
    fan = _fan_outs(gm)
    assert len(fan) == 28
    assert fan["input_delta"] == 9 * 32 / 4  # conv1 3x3 stride 2, 32 channels


# -- a tiny net with every supported op ---------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(4)
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)  # fan 9*4 = 36
        self.act1 = nn.ReLU()
        self.conv_b = nn.Conv2d(4, 6, 1)  # fan 6
        self.act2 = nn.ReLU6()
        self.conv_c = nn.Conv2d(4, 2, 3, stride=2, padding=1)  # fan 9*2/4 = 4.5
        self.bn1 = nn.BatchNorm2d(2)
        self.act3 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8 * 2 * 2, 5)  # fan 5

    def forward(self, x):
        h = F.relu(self.bn0(self.conv0(x)))  # -> conv_a, (+) -> conv_b, conv_c
        r = self.act1(self.conv_a(h))  # -> (+) -> conv_b
        u = self.act2(self.conv_b(h + r))  # -> maxpool -> cat -> avgpool -> flatten -> fc
        w = self.act3(self.bn1(self.conv_c(h)))  # -> cat -> ... -> fc
        c = self.avg(torch.cat([self.pool(u), w], dim=1))
        return self.fc(self.drop(torch.flatten(c, 1)))


MIXED_FAN_OUTS = {
    "relu_delta": 36 + 6 + 4.5,
    "act1_delta": 6.0,
    "act2_delta": 5.0,
    "act3_delta": 5.0,
}


def test_mixed_net_fan_outs():
    gm = ds.convert(Mixed())
    assert _fan_outs(gm) == MIXED_FAN_OUTS
    gm(torch.randn(2, 3, 8, 8))  # runs


def test_on_input_and_overrides_and_skip():
    cfg = ds.DeltaConfig(
        on_input=True,
        overrides={"act1": {"threshold_init": 0.5, "granularity": "layer"}, "act2": {"skip": True},
                   "input": {"fan_out": 2.0}},
    )  # fmt: skip
    gm = ds.convert(Mixed(), cfg)
    fan = _fan_outs(gm)
    assert fan == {"input_delta": 2.0, "relu_delta": 46.5, "act1_delta": 6.0, "act3_delta": 5.0}
    act1 = gm.get_submodule("act1_delta")
    assert act1.threshold_init == 0.5 and act1.granularity == "layer"
    assert gm.get_submodule("relu_delta").threshold_init == 0.1


def test_override_of_unknown_site_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="deltasparse.convert"):
        ds.convert(Mixed(), ds.DeltaConfig(overrides={"act9": {"skip": True}}))
    assert "act9" in caplog.text


def test_on_input_fan_out_is_the_first_conv():
    gm = ds.convert(Mixed(), ds.DeltaConfig(on_input=True))
    assert _fan_outs(gm)["input_delta"] == 9 * 4


def test_filter_fn_sees_name_and_module():
    seen = {}

    def keep(name, module):
        seen[name] = module
        return name != "act3"

    gm = ds.convert(Mixed(), filter_fn=keep)
    assert set(seen) == {"relu", "act1", "act2", "act3"}
    assert seen["relu"] is None and isinstance(seen["act1"], nn.ReLU)
    assert set(_fan_outs(gm)) == {"relu_delta", "act1_delta", "act2_delta"}


def test_kind_l1():
    gm = ds.convert(Mixed(), ds.DeltaConfig(kind="l1", sparsity_weight=0.2))
    layers = dict(sparsity_layers(gm))
    assert all(isinstance(m, ds.ActivationL1) for m in layers.values())
    assert {n: m.fan_out for n, m in layers.items()} == {
        k.replace("_delta", "_l1"): v for k, v in MIXED_FAN_OUTS.items()
    }
    assert all(m.sparsity_weight == 0.2 and m.input_layout == "frame" for m in layers.values())


def test_layer_options_reach_the_layers():
    cfg = ds.DeltaConfig(granularity="neuron", threshold_init=0.3, sparsity_weight=0.02,
                         activation="relu6", sigma=True, delta_output=True,
                         threshold_trainable=False)  # fmt: skip
    gm = ds.convert(Mixed(), cfg)
    for _, m in sparsity_layers(gm):
        assert (m.granularity, m.threshold_init, m.sparsity_weight, m.activation) == (
            "neuron",
            0.3,
            0.02,
            "relu6",
        )
        assert m.sigma and m.delta_output and not m.threshold_trainable
        assert m.input_layout == "frame"


# -- DeltaConfig -------------------------------------------------------------------------------
def test_config_json_roundtrip():
    cfg = ds.DeltaConfig(kind="l1", granularity="layer", threshold_init=0.2, after=["ReLU"],
                         on_input=True, fan_out=3.0,
                         overrides={"a.b": {"skip": True}, "c": {"threshold_init": 0.4}})  # fmt: skip
    assert cfg.after == ("ReLU",)
    text = cfg.to_json()
    d = json.loads(text)
    assert (
        d["version"] == 3  # 2: gate and mode; 3: token gates
        and d["after"] == ["ReLU"]
        and d["overrides"]["c"]["threshold_init"] == 0.4
    )
    back = ds.DeltaConfig.from_json(text)
    assert back == cfg
    assert ds.DeltaConfig.from_dict(ds.DeltaConfig().to_dict()) == ds.DeltaConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kind = "delta"


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown DeltaConfig fields \['colour'\]"):
        ds.DeltaConfig.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="version 4 is newer"):
        ds.DeltaConfig.from_dict({"version": 4})
    old = ds.DeltaConfig.from_dict({"version": 1, "kind": "l1"})  # before gate and mode
    assert (old.kind, old.gate, old.mode) == ("l1", "scalar", "grid")
    with pytest.raises(ValueError, match="kind"):
        ds.DeltaConfig(kind="sparse")
    with pytest.raises(ValueError, match=r"overrides\['x'\] has unknown options \['thresh'\]"):
        ds.DeltaConfig(overrides={"x": {"thresh": 1.0}})


# -- fan-out errors and fall-backs -------------------------------------------------------------
class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = self.act1(self.conv1(x))
        g = self.act2(self.conv2(h))
        return self.fc(torch.flatten(g * torch.sin(g), 1))


def test_untraceable_consumer_raises_naming_the_op():
    with pytest.raises(FanOutError, match=r"act2.*sin.*overrides=\{'act2'"):
        ds.convert(Gated())


def test_config_fan_out_only_fills_in_where_the_graph_cannot_tell():
    gm = ds.convert(Gated(), ds.DeltaConfig(fan_out=7.0))
    assert _fan_outs(gm) == {"act1_delta": 36.0, "act2_delta": 7.0}
    gm = ds.convert(Gated(), ds.DeltaConfig(overrides={"act2": {"fan_out": 3.0}}))
    assert _fan_outs(gm) == {"act1_delta": 36.0, "act2_delta": 3.0}
    gm = ds.convert(Gated(), ds.DeltaConfig(overrides={"act1": {"fan_out": 1.5}}, fan_out=2.0))
    assert _fan_outs(gm) == {"act1_delta": 1.5, "act2_delta": 2.0}


def test_untraceable_model_raises_type_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return torch.relu(x) if x.sum() > 0 else x

    with pytest.raises(TypeError, match="could not trace Branchy"):
        ds.convert(Branchy())


# -- the user's model, revert, VideoModel --------------------------------------------------------
def test_convert_leaves_the_users_model_alone_and_revert_restores():
    model = Mixed().eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    gm = ds.convert(model, ds.DeltaConfig(threshold_init=0.5)).eval()
    assert isinstance(gm, fx.GraphModule)
    assert not any(isinstance(m, SparsityLayer) for m in model.modules())
    assert torch.equal(model(x), before)
    assert gm.conv0.weight is model.conv0.weight  # parameters are shared
    converted = gm(x)
    assert not torch.allclose(converted, before)  # the quantiser is active
    with pytest.raises(ValueError, match="already holds sparsity layers"):
        ds.convert(gm)
    reverted = ds.revert(gm)
    assert reverted is gm
    assert not any(isinstance(m, SparsityLayer) for m in gm.modules())
    assert "deltasparse_config" not in gm.meta
    assert not any("_delta" in n.name for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), before, rtol=0, atol=0)
    assert ds.revert(model) is model  # a plain model passes through


def test_convert_a_video_model_converts_its_frame_model():
    video = ds.VideoModel(Mixed())
    out = ds.convert(video, example_input=torch.randn(1, 3, 8, 8))
    assert out is video
    assert isinstance(video.frame_model, fx.GraphModule)
    assert _fan_outs(video) == {"frame_model." + k: v for k, v in MIXED_FAN_OUTS.items()}
    assert all(m.theta is not None for _, m in sparsity_layers(video))  # example_input ran
    ds.revert(video)
    assert not any(isinstance(m, SparsityLayer) for m in video.modules())


def test_revert_refuses_a_hand_built_model():
    with pytest.raises(TypeError, match="GraphModule that convert"):
        ds.revert(nn.Sequential(nn.ReLU(), ds.DeltaActivation()))


def test_converted_model_trains_in_a_video_model():
    video = ds.convert(ds.VideoModel(Mixed()), ds.DeltaConfig(sparsity_weight=0.1))
    x = torch.randn(2, 3, 3, 8, 8)
    logits = video(x)
    loss = F.cross_entropy(logits, torch.tensor([1, 3])) + ds.sparsity_loss(video)
    loss.backward()
    for name, p in video.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_example_input_materialises_thresholds_without_touching_bn_stats():
    model = Mixed()
    model.bn1.eval()  # a user's frozen BN stays frozen, the others stay in training mode
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    gm = ds.convert(model, example_input=torch.randn(2, 3, 8, 8))
    assert all(m.theta is not None for _, m in sparsity_layers(gm))
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k
    assert gm.training and gm.bn0.training and not gm.bn1.training


def test_a_model_without_selected_activations_is_refused_with_the_fix():
    gelu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Conv2d(4, 4, 3), nn.GELU(),
                         nn.Conv2d(4, 2, 1), nn.SiLU())  # fmt: skip
    with pytest.raises(ValueError, match=(
        r"no activation of Sequential is in DeltaConfig.after \('ReLU', 'ReLU6', 'Hardtanh'\).*"
        r"GELU \(e.g. '1', 2 in all\), SiLU \(e.g. '5', 1 in all\).*"
        r"DeltaConfig\(after=\('ReLU', 'ReLU6', 'Hardtanh', 'GELU', 'SiLU'\)\)"
    )):  # fmt: skip
        ds.convert(gelu)
    # including the types the message names works (here only GELU: a layer after each)
    gm = ds.convert(gelu, ds.DeltaConfig(after=("GELU",)))
    assert set(_fan_outs(gm)) == {"1_delta", "3_delta"}

    class NoActivations(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return F.gelu(self.conv(x))

    with pytest.raises(ValueError, match="NoActivations has no activation modules.*nn.ReLU"):
        ds.convert(NoActivations())
    with pytest.raises(ValueError, match=r"skipped every activation site \(4 of 4\)"):
        ds.convert(Mixed(), filter_fn=lambda name, module: False)
    skip_all = {k: {"skip": True} for k in ("relu", "act1", "act2", "act3")}
    with pytest.raises(ValueError, match="skipped every activation site"):
        ds.convert(Mixed(), ds.DeltaConfig(overrides=skip_all))
    # a model with sites converts as before; a layer on the input alone is enough
    assert len(_fan_outs(ds.convert(Mixed()))) == 4
    only_input = ds.convert(Mixed(), ds.DeltaConfig(on_input=True, overrides=skip_all))
    assert set(_fan_outs(only_input)) == {"input_delta"}


# -- pixel gates take over the ReLU/ReLU6 before them (DeltaConfig.absorb_activation) ---------
class _Shared(nn.Module):
    """``relu_()`` as a method, and a pre-activation that also feeds a residual add."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv0(x).relu_()  # absorbable: conv0's output feeds only the relu_
        a = self.conv1(h)
        y = self.act(a) + a  # not absorbable: `a` also feeds the add
        return self.fc(y.mean((2, 3)))


def _pixel_pair(make, **kw):
    """The same model converted with and without absorption, sharing nothing, equal weights."""
    torch.manual_seed(0)
    base = make()
    out = []
    for absorb in (True, False):
        m = ds.VideoModel(_clone(base))
        cfg = ds.DeltaConfig(gate="pixel", threshold_init=0.05, sparsity_weight=0.1,
                             absorb_activation=absorb, **kw)  # fmt: skip
        out.append(ds.convert(m, cfg, example_input=torch.randn(1, 3, 8, 8)))
    out[1].load_state_dict(out[0].state_dict())
    return out


def _clone(m):
    import copy

    return copy.deepcopy(m)


def test_pixel_gates_absorb_the_activation_before_them():
    absorbed, plain = _pixel_pair(Mixed)
    acts = {n.split(".")[-1]: m.activation for n, m in sparsity_layers(absorbed)}
    assert acts == {"relu_delta": "relu", "act1_delta": "relu", "act2_delta": "relu6",
                    "act3_delta": "relu"}  # fmt: skip
    assert all(m.activation is None for _, m in sparsity_layers(plain))
    calls = {n.target for n in absorbed.frame_model.graph.nodes if n.op == "call_module"}
    assert not calls & {"act1", "act2", "act3"}
    assert F.relu not in {n.target for n in absorbed.frame_model.graph.nodes}
    assert _fan_outs(absorbed) == _fan_outs(plain)
    shared, _ = _pixel_pair(_Shared)
    acts = {n.split(".")[-1]: m.activation for n, m in sparsity_layers(shared)}
    assert acts == {"relu__delta": "relu", "act_delta": None}
    assert "act" in {n.target for n in shared.frame_model.graph.nodes if n.op == "call_module"}
    # the scalar layer keeps the paper's placement (DESIGN.md section 1)
    scalar = ds.convert(Mixed(), ds.DeltaConfig())
    assert all(m.activation is None for _, m in sparsity_layers(scalar))


@pytest.mark.parametrize("make", [Mixed, _Shared], ids=["mixed", "shared"])
@pytest.mark.parametrize("mode", ["grid", "hysteresis"])
def test_absorbed_activation_trains_like_the_activation_then_the_gate(make, mode):
    absorbed, plain = _pixel_pair(make, mode=mode)
    x = torch.randn(2, 4, 3, 8, 8) * 2
    results = []
    for video in (absorbed, plain):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # the same dropout mask
        logits = video(xi)
        loss = logits.square().sum() + ds.sparsity_loss(video)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in video.named_parameters()}
        results.append((logits.detach(), ds.sparsity_loss(video).detach(), xi.grad, grads))
    (la, sa, xa, ga), (lp, sp, xp, gp) = results
    assert torch.equal(la, lp)
    torch.testing.assert_close(sa, sp, rtol=1e-6, atol=0)
    torch.testing.assert_close(xa, xp, rtol=1e-5, atol=1e-7)
    assert ga.keys() == gp.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gp[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("make", [Mixed, _Shared], ids=["mixed", "shared"])
def test_revert_puts_the_absorbed_activation_back(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    def calls(g):  # the graph, its nodes' arguments as positions
        pos = {n: i for i, n in enumerate(g.graph.nodes)}
        return [(n.op, n.target, fx.node.map_arg(n.args, pos.get), n.kwargs)
                for n in g.graph.nodes]  # fmt: skip

    want = calls(ds._graph.trace(_clone(model)))
    gm = ds.convert(model, ds.DeltaConfig(gate="pixel")).eval()
    assert any(m.absorbed for _, m in sparsity_layers(gm))
    ds.revert(gm)
    assert calls(gm) == want
    torch.testing.assert_close(gm(x), before, rtol=0, atol=0)


def test_engine_streams_an_absorbed_model_as_the_unabsorbed_one():
    absorbed, plain = _pixel_pair(Mixed)
    engines = [ds.DeltaEngine(m.eval(), "torch") for m in (absorbed, plain)]
    frames = torch.randn(6, 1, 3, 8, 8).cumsum(0) * 0.3
    for f in frames:
        with torch.no_grad():
            want = absorbed.frame_model(f)
        outs = [e.step(f) for e in engines]
        assert torch.equal(outs[0], outs[1])
        torch.testing.assert_close(outs[0], want, rtol=1e-4, atol=1e-4)
    assert engines[0].stats.effective_macs == engines[1].stats.effective_macs
    # the dense model still materialises the activation: the same memory baseline
    assert engines[0].stats.dense_activation_bytes == engines[1].stats.dense_activation_bytes


class _InplaceOnView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 2, 1)
        self.c3 = nn.Conv2d(2, 2, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv(x)
        z = y[:, :2].relu_()  # changes y too, which c2 reads
        w = self.act(self.c3(z))  # in place on a conv's fresh output: absorbable
        return self.c2(y).mean((2, 3)) + w.mean((2, 3))


def test_an_inplace_activation_on_a_view_is_not_absorbed():
    torch.manual_seed(0)
    model = _InplaceOnView().eval()
    acts = {}
    outs = []
    for absorb in (True, False):
        gm = ds.convert(_clone(model), ds.DeltaConfig(gate="pixel", threshold_init=1e-4,
                                                      absorb_activation=absorb)).eval()
        acts[absorb] = {n: m.activation for n, m in sparsity_layers(gm)}
        outs.append(gm(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))))
    assert acts[True] == {"relu__delta": None, "act_delta": "relu"}
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_calibration_sees_what_the_quantiser_sees_with_an_absorbed_activation():
    from deltasparse.calibrate import _input_scales

    torch.manual_seed(0)
    model = Mixed().eval()
    batches = [torch.randn(2, 3, 3, 8, 8)]
    scales = []
    for absorb in (True, False):
        gm = ds.convert(_clone(model), ds.DeltaConfig(gate="pixel", absorb_activation=absorb))
        scales.append(_input_scales(gm.eval(), batches))
    assert scales[0].keys() == scales[1].keys()
    for k in scales[0]:
        torch.testing.assert_close(scales[0][k], scales[1][k], rtol=1e-6, atol=1e-7, msg=k)
