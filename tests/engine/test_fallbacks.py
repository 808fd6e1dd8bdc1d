"""Every slower path the engine takes is warned about and listed in ``engine.stats.fallbacks``:
a dense fallback op, the torch backend where ``auto`` wanted the C++ op, no CUDA-graph step."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from engine_helpers import (
    AllOps,
    GlobalPoolNet,
    LayerNorm2d,
    TinyResNet,
    UpsampleCat,
    converted,
)
from torch import nn

from deltasparse.data.streams import synthetic_stream
from deltasparse.engine import DeltaEngine
from deltasparse.engine.kernels import TorchBackend, cpp
from deltasparse.engine.kernels.triton_graph import decline_reason
from deltasparse.engine.stats import FallbackWarning


def _plain() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()


def test_no_fallback_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        eng = DeltaEngine(_plain(), "torch")
        eng.step(torch.randn(1, 3, 8, 8))
    assert eng.stats.fallbacks == [] and eng.stats.to_dict()["fallbacks"] == []


def test_dense_fallback_op_is_warned_and_recorded():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 2, 1)).eval()
    with pytest.warns(FallbackWarning, match=r"module '1' \(Softplus\) has no delta kernel") as rec:
        eng = DeltaEngine(net, "torch", fallback="dense")
    assert len([w for w in rec if w.category is FallbackWarning]) == 1
    assert rec[0].filename == __file__
    frames = list(synthetic_stream(3, (1, 3, 8, 8), seed=0))
    for f in frames:
        torch.testing.assert_close(eng.step(f), net(f), rtol=0, atol=1e-5)
    (reason,) = eng.stats.fallbacks
    assert "Softplus" in reason and "densely" in reason
    d = json.loads(json.dumps(eng.stats.to_dict(), allow_nan=False))
    assert d["fallbacks"] == [reason]
    eng.reset()  # a property of the engine, not of the stream
    assert eng.stats.fallbacks == [reason]


def test_failed_cpp_build_is_warned_and_recorded(monkeypatch):
    import torch.utils.cpp_extension as ext

    def broken(**kw):
        raise RuntimeError("no compiler here")

    monkeypatch.delenv("DELTASPARSE_NO_CPP", raising=False)
    monkeypatch.setattr(cpp, "_state", {})  # forget the op this process may have built
    monkeypatch.setattr(ext, "load_inline", broken)
    assert cpp.load() is None
    assert cpp.build_error() == "RuntimeError: no compiler here"
    with pytest.warns(FallbackWarning, match=r"C\+\+ engine op could not be built.*no compiler") as w:
        eng = DeltaEngine(_plain(), "auto")
    assert w[0].filename == __file__  # points at the caller's line, not into the engine
    assert eng.backend.name == "torch"
    (reason,) = eng.stats.fallbacks
    assert "no compiler here" in reason
    with pytest.raises(RuntimeError, match="'cpp'.*no compiler here"):
        DeltaEngine(_plain(), "cpp")
    # an explicit backend='torch' is what was asked for: not a fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        assert DeltaEngine(_plain(), "torch").stats.fallbacks == []


def test_cpp_disabled_on_purpose_is_not_a_fallback(monkeypatch):
    monkeypatch.setenv("DELTASPARSE_NO_CPP", "1")
    monkeypatch.setattr(cpp, "_state", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        eng = DeltaEngine(_plain(), "auto")
    assert eng.backend.name == "torch" and eng.stats.fallbacks == []


def _runtime(model, frame):
    eng = DeltaEngine(model, "torch")
    eng.step(frame)
    return eng._runtime


def test_graph_decline_reason_on_cpu():
    x = torch.randn(1, 3, 16, 16)
    supported = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 6, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).eval()  # fmt: skip
    assert decline_reason(_runtime(supported, x)) is None
    assert decline_reason(_runtime(supported.double(), x.double())) is None
    grouped = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2)).eval()
    assert decline_reason(_runtime(grouped, x)) is None
    normed = nn.Sequential(nn.Conv2d(3, 8, 1), LayerNorm2d(8)).eval()
    assert decline_reason(_runtime(normed, x)) is None
    twice = nn.Sequential(nn.Conv2d(3, 8, 1), LayerNorm2d(8), LayerNorm2d(8)).eval()
    # unconverted, the runtime makes the second LayerNorm a pointwise op of its own
    assert decline_reason(_runtime(twice, x)) is None
    # pooling, adds, products, concatenations of 2-4 maps, upsampling have device kernels
    for ops in (TinyResNet(), GlobalPoolNet(), UpsampleCat(), _Cat(3)):
        assert decline_reason(_runtime(ops.eval(), torch.randn(2, 3, 32, 32))) is None
    five = _runtime(_Cat(5).eval(), x)
    assert decline_reason(five) == "cat 'cat' of 5 tensors (2-4 have a kernel)"
    gm = converted(AllOps(), torch.randn(2, 3, 28, 44))
    assert decline_reason(_runtime(gm, torch.randn(2, 3, 28, 44))) is None  # every op kind


class _Cat(nn.Module):
    """A concatenation of ``n`` maps: two convs' and the input ``n - 2`` times."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)] + [x] * (self.n - 2), dim=1)


class _GraphBackend(TorchBackend):
    """The torch backend with a graph_step hook, as TritonBackend has one (CPU-testable)."""

    name = "graph-test"
    graph_declined = None
    calls = 0

    graph_decline_reason = staticmethod(decline_reason)

    def graph_step(self, runtime):
        type(self).calls += 1
        self.graph_declined = "capture failed in this test"
        return None


def test_engine_warns_and_records_a_declined_graph_step():
    x = torch.randn(1, 3, 16, 16)
    eng = DeltaEngine(_Cat(5).eval(), _GraphBackend())
    with pytest.warns(FallbackWarning, match=r"no CUDA-graph step \(cat 'cat' of 5") as w:
        eng.step(x)
    assert w[0].filename == __file__
    assert _GraphBackend.calls == 0  # declined up front, never attempted
    why = decline_reason(eng._runtime)
    assert eng.stats.fallbacks == [
        f"no CUDA-graph step ({why}): every step runs the per-op driver, one host "
        "synchronisation per op (slower)"
    ]
    net = _plain()
    plain = DeltaEngine(net, _GraphBackend())
    with pytest.warns(FallbackWarning, match=r"no CUDA-graph step \(capture failed in this test"):
        plain.step(x)
    assert _GraphBackend.calls == 1
    assert len(plain.stats.fallbacks) == 1
    plain.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # recorded once, warned once
        plain.step(x)
    assert len(plain.stats.fallbacks) == 1 and _GraphBackend.calls == 2
    torch.testing.assert_close(plain.step(x), net(x), rtol=0, atol=1e-5)  # per-op driver
