"""Helpers for the engine tests: random converted models that cover every supported op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import deltasparse as ds
from deltasparse.engine.kernels import OP_KINDS


class AllOps(nn.Module):
    """Every op kind the engine supports, in one fx-traceable per-frame model."""

    def __init__(self, c_in: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.act_dw = nn.ReLU()
        self.pw = nn.Conv2d(8, 16, 1)
        self.bn_pw = nn.BatchNorm2d(16)
        self.act_pw = nn.Hardtanh(0.0, 3.0)
        self.grouped = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.tall = nn.Conv2d(16, 16, (3, 1), padding=(1, 0))
        self.bn_res = nn.BatchNorm2d(16)
        self.avg = nn.AvgPool2d(2, stride=2, ceil_mode=True, count_include_pad=False)
        self.wide = nn.Conv2d(32, 12, 5, stride=1, padding=2)
        self.drop = nn.Dropout(0.5)
        self.adapt = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(12 * 4, 24)
        self.bn_fc = nn.BatchNorm1d(24)
        self.fc2 = nn.Linear(24, classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act_dw(self.bn_dw(self.dw(x)))
        x = self.act_pw(self.bn_pw(self.pw(x)))
        x = F.relu(self.grouped(x))
        x = self.pool(x)
        y = self.bn_res(self.tall(x))
        x = F.relu(x + y)  # residual add
        x = torch.cat([x, F.max_pool2d(x, 3, 1, 1)], dim=1)
        x = self.avg(x)
        x = torch.clamp(self.wide(x), 0.0, 4.0)
        x = self.adapt(self.drop(x))
        x = torch.flatten(x, 1)
        x = F.relu(self.bn_fc(self.fc1(x)))
        return self.fc2(x)


class GlobalPoolNet(nn.Module):
    """Global pooling by ``mean`` + ``nn.Flatten`` of a (B, C, 1, 1) map, ReLU as a method."""

    def __init__(self, c_in: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.bn(self.conv(x)).relu()
        y = F.relu6(self.conv2(x))
        a = self.flat(self.gap(y))
        b = x.mean((2, 3))
        return self.fc(torch.cat([a, b], dim=1))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial batch-norm statistics and affine parameters (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.8 + 0.4 * torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


def converted(model: nn.Module, example: torch.Tensor, *, thr: float = 0.1,
              granularity: str = "channel", seed: int = 0, **cfg) -> nn.Module:  # fmt: skip
    """Convert, create the thresholds, and spread them around ``thr``."""
    model = randomize(model, seed)
    gm = ds.convert(model, ds.DeltaConfig(granularity=granularity, threshold_init=thr, **cfg),
                    example_input=example)  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    for m in gm.modules():
        if isinstance(m, ds.DeltaActivation):
            m.theta.data.mul_(0.5 + torch.rand(m.theta.shape, generator=g))
    return gm.eval()


def quantised_layers(gm) -> list[str]:
    return [n for n, m in gm.named_modules() if isinstance(m, ds.DeltaActivation)]


class DenseRecorder:
    """Dense forward that also records every DeltaActivation output (by fx node name)."""

    def __init__(self, gm) -> None:
        self.gm = gm
        self.nodes = {
            str(n.target): n.name
            for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ds.DeltaActivation)
        }

    @torch.no_grad()
    def __call__(self, x):
        out: dict[str, torch.Tensor] = {}
        hooks = [
            self.gm.get_submodule(t).register_forward_hook(
                lambda m, i, o, name=name: out.__setitem__(name, o.detach().clone())
            )
            for t, name in self.nodes.items()
        ]
        try:
            y = self.gm(x)
        finally:
            for h in hooks:
                h.remove()
        return y, out


def compare(engine, rec: DenseRecorder, frame) -> tuple[float, int, int]:
    """``(max |logit diff|, differing quantised activations, total)`` for one frame."""
    y = engine.step(frame)
    yd, acts = rec(frame)
    vals = engine.values(set(acts))
    diff = sum(int((vals[k] != v).sum()) for k, v in acts.items())
    total = sum(v.numel() for v in acts.values())
    return float((y - yd).abs().max()), diff, total


def compare_rel(engine, rec: DenseRecorder, frame) -> tuple[float, int, int]:
    """:func:`compare` with the logit error relative to the dense model's largest logit:
    ``(max |engine - dense| / max |dense|, differing quantised activations, total)``."""
    y = engine.step(frame)
    yd, acts = rec(frame)
    vals = engine.values(set(acts))
    diff = sum(int((vals[k] != v).sum()) for k, v in acts.items())
    total = sum(v.numel() for v in acts.values())
    err = float((y - yd).abs().max())
    scale = float(yd.abs().max())
    return (err / scale if scale > 0 else err), diff, total


def assert_streams_like_dense(engine, rec: DenseRecorder, frames, tol: float,
                              relative: bool = False) -> None:  # fmt: skip
    """Every frame's logit error within ``tol`` (relative to the largest dense logit with
    ``relative``), and at most 1e-4 of the quantised activations differing over the stream."""
    diffs = total = 0
    for f in frames:
        err, d, total = (compare_rel if relative else compare)(engine, rec, f)
        assert err <= tol
        diffs += d
    assert diffs <= 1e-4 * total * len(frames)


ALWAYS_SPARSE = dict.fromkeys(OP_KINDS, 1.0)


class TinyResNet(nn.Module):
    """torchvision-ResNet-shaped: 7x7/2 stem, max pool, basic blocks with ``out += identity``
    and a strided 1x1 downsample, global pooling, fc."""

    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.a1 = nn.Conv2d(8, 16, 3, 2, 1, bias=False)
        self.abn1 = nn.BatchNorm2d(16)
        self.a2 = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
        self.abn2 = nn.BatchNorm2d(16)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        identity = self.down(x)
        out = self.relu(self.abn1(self.a1(x)))
        out = self.abn2(self.a2(out))
        out += identity
        out = self.relu(out)
        return self.fc(torch.flatten(self.avgpool(out), 1))


# -- today's CNN blocks (torchvision's MobileNet v3 / EfficientNet / ConvNeXt / RegNet, YOLO) --


@torch.fx.wrap
def stochastic_depth(input, p: float, mode: str, training: bool = True):
    """torchvision.ops.stochastic_depth's signature (fx-wrapped as there): identity in eval."""
    if not training or p == 0.0:
        return input
    keep = torch.rand(input.shape[0], 1, 1, 1) >= p
    return input * keep / (1.0 - p)


class LayerNorm2d(nn.LayerNorm):
    """torchvision.models.convnext.LayerNorm2d: LayerNorm over the channels of an NCHW map."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: ``x * scale_act(fc2(act(fc1(avgpool(x)))))``."""

    def __init__(self, c: int, squeeze: int, act=nn.ReLU, scale_act=nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
        self.activation, self.scale_activation = act(), scale_act()

    def forward(self, x):
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


class CNBlock(nn.Module):
    """torchvision's ConvNeXt block: 7x7 depthwise, permute, LayerNorm, MLP with GELU, permute
    back, layer scale (a parameter read by get_attr), stochastic depth, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.layer_scale = nn.Parameter(0.5 + torch.rand(c, 1, 1))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        y = stochastic_depth(self.layer_scale * y, 0.1, "row", self.training)
        return y + x


class ModernOps(nn.Module):
    """Every op added for today's CNNs in one fx-traceable per-frame model: the activations of
    the registry, squeeze-excitation (Sigmoid and Hardsigmoid scales), a ConvNeXt stage
    (LayerNorm2d, permute, channels-last Linear/LayerNorm, layer scale), nearest and bilinear
    upsampling with concat (a YOLO-style neck), and a head with numbers and PReLU."""

    def __init__(self, c_in: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(c_in, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.SiLU()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn_dw = nn.BatchNorm2d(16)
        self.hs = nn.Hardswish()
        self.se = SqueezeExcitation(16, 8, nn.SiLU, nn.Sigmoid)
        self.se2 = SqueezeExcitation(16, 4, nn.ReLU, nn.Hardsigmoid)
        self.down = nn.Sequential(LayerNorm2d(16, eps=1e-6), nn.Conv2d(16, 24, 2, stride=2))
        self.block = CNBlock(24)
        self.lat = nn.Conv2d(24, 16, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = nn.Conv2d(32, 16, 3, padding=1)
        self.leaky = nn.LeakyReLU(0.1)
        self.mix = nn.Conv2d(16, 12, 1)
        self.prelu = nn.PReLU(12)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.norm = LayerNorm2d(12)
        self.fc = nn.Linear(12, 10)
        self.fc2 = nn.Linear(10, classes)

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        x = self.se(self.hs(self.bn_dw(self.dw(x))))
        x = self.se2(x)
        p = x
        y = self.block(self.down(x))
        y = torch.tanh(self.lat(y))
        y = torch.cat([self.up(y), p], dim=1)
        y = self.leaky(self.fuse(y))
        y = y + F.interpolate(F.max_pool2d(y, 2), scale_factor=2, mode="bilinear")
        y = self.prelu(self.mix(F.elu(y)))
        z = self.gap(y)
        z = torch.flatten(self.norm(z), 1)
        z = F.mish(self.fc(z)) * 0.5
        return self.fc2(F.gelu(z, approximate="tanh"))


class GraphOps(nn.Module):
    """The ops of the whole-step GPU graph beyond MobileNet's: every activation of its chain
    (SiLU, Hardswish, Sigmoid, Hardsigmoid, ReLU, ELU, Tanh, PReLU, LeakyReLU, GELU erf and
    tanh, Mish), squeeze-excitation products, average pooling (ceil mode, padding excluded),
    a product of two maps, a residual add and a pointwise op on its own."""

    def __init__(self, c_in: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(c_in, 16, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.se = SqueezeExcitation(16, 8, nn.SiLU, nn.Sigmoid)
        self.se2 = SqueezeExcitation(16, 4, nn.ReLU, nn.Hardsigmoid)
        self.avg = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
        self.c2, self.c3 = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3, padding=1)
        self.prelu, self.leaky = nn.PReLU(16), nn.LeakyReLU(0.1)
        self.fc, self.fc2 = nn.Linear(16, 12), nn.Linear(12, classes)

    def forward(self, x):
        x = F.silu(self.bn(self.stem(x)))
        x = self.se2(self.se(F.hardswish(self.bn2(self.dw(x)))))
        x = self.avg(x)
        a, b = F.elu(self.c2(x), 0.7), torch.tanh(self.c3(x))
        x = F.gelu(self.prelu(a * b) + self.leaky(x))
        z = F.mish(self.fc(x.mean((2, 3))))
        return self.fc2(F.gelu(z, approximate="tanh"))


class UpsampleCat(nn.Module):
    """A YOLO-style neck in small: nearest upsampling concatenated with two lateral maps, an
    SPPF block (three chained 5x5 max pools concatenated with their input: four maps), max
    pooling and bilinear upsampling added back (every op of it runs in the GPU graph)."""

    def __init__(self, c_in: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(c_in, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.lat = nn.Conv2d(8, 4, 1)
        self.fuse = nn.Conv2d(20, 8, 3, padding=1)
        self.sppf = nn.MaxPool2d(5, 1, 2)
        self.mix = nn.Conv2d(32, 8, 1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        y = F.relu(self.fuse(torch.cat([self.up(b), a, F.relu(self.lat(a))], 1)))
        p1 = self.sppf(y)
        p2 = self.sppf(p1)
        y = F.relu(self.mix(torch.cat([y, p1, p2, self.sppf(p2)], 1)))
        y = y + F.interpolate(F.max_pool2d(y, 2), scale_factor=2, mode="bilinear")
        return self.fc(y.mean((2, 3)))


class GroupedNet(nn.Module):
    """RegNet-style grouped convs (groups of 8 input channels, as RegNet's group width; one
    strided, one dilated) with a squeeze-excitation product: every op runs in the GPU graph."""

    def __init__(self, c_in: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(c_in, 16, 3, padding=1)
        self.g1 = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.g2 = nn.Conv2d(16, 24, 3, 2, 1, groups=2)
        self.g3 = nn.Conv2d(24, 24, 3, padding=2, dilation=2, groups=3)
        self.se = SqueezeExcitation(24, 8)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = F.relu(self.g2(F.relu(self.g1(y))))
        y = self.se(F.relu(self.g3(y)))
        return self.fc(y.mean((2, 3)))


class ConvNeXtLite(nn.Module):
    """ConvNeXt in small: a patchify stem (4x4 conv, stride 4) with its LayerNorm2d, a CNBlock,
    a downsampling LayerNorm2d + 2x2 conv after a residual add, and a LayerNorm head (a ReLU
    and a gate after it): LayerNorms in the chains of a conv, a pointwise op, an add and a
    global pool, every one in the GPU graph."""

    def __init__(self, c_in: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(c_in, 16, 4, stride=4), LayerNorm2d(16, eps=1e-6))
        self.block = CNBlock(16)
        self.down = nn.Sequential(LayerNorm2d(16, eps=1e-6), nn.Conv2d(16, 24, 2, stride=2))
        self.norm = nn.LayerNorm(24, eps=1e-6)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        y = self.down(self.block(self.stem(x)))
        return self.fc(F.relu(self.norm(y.mean((2, 3)))))


class WideNet(nn.Module):
    """Reductions of 1,024 and more (a 1x1 conv from 1,024 channels, a 3x3 conv from 128):
    the GPU graph splits them in parts (triton_gpu.split_k)."""

    def __init__(self, c_in: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(c_in, 32, 3, padding=1), nn.Conv2d(32, 1024, 1)
        self.c3, self.c4 = nn.Conv2d(1024, 64, 1), nn.Conv2d(64, 128, 3, 2, 1)
        self.c5, self.fc = nn.Conv2d(128, 128, 3, padding=1), nn.Linear(128, classes)

    def forward(self, x):
        y = F.relu(self.c2(F.relu(self.c1(x))))
        y = F.relu(self.c5(F.relu(self.c4(F.relu(self.c3(y))))))
        return self.fc(y.mean((2, 3)))
