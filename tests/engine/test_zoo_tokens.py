"""torchvision's vit_b_16 and timm's ViTs through token gates and the token engine (where those
packages import: the GPU machine has both; the CPU wheel here cannot load torchvision)."""

from __future__ import annotations

import importlib

import pytest
import torch

import deltasparse as ds
from deltasparse.data.streams import synthetic_stream


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # an install can be present and still fail to load
        return False
    return True


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _stream_like_dense(model, size: int, gates: int) -> None:
    dev = _device()
    gm = ds.convert(model.eval(), ds.DeltaConfig(kind="token", threshold_init=0.05)).eval()
    assert len(list(ds.layers.sparsity_layers(gm))) == gates
    gm = gm.to(dev)
    eng = ds.DeltaEngine(gm)
    frames = synthetic_stream(6, (2, 3, size, size), objects=1, object_size=0.2, noise=0.01,
                              seed=3)  # fmt: skip
    with torch.no_grad(), ds.streaming(gm):
        for t, f in enumerate(frames):
            f = f.to(dev)
            want, got = gm(f), eng.step(f)
            assert float((want - got).abs().max()) <= 1e-4 * float(want.abs().max()), t
            r = eng.tokens.replay()
            assert float((got - r).abs().max()) <= 1e-4 * float(r.abs().max()), t
    assert eng.stats.density < 1


@pytest.mark.skipif(not _importable("torchvision"), reason="torchvision does not import here")
def test_torchvision_vit_b_16_streams_through_token_gates():
    from torchvision.models import vit_b_16

    torch.manual_seed(0)
    _stream_like_dense(vit_b_16(num_classes=10), 224, gates=24)


@pytest.mark.skipif(not _importable("timm"), reason="timm does not import here")
def test_timm_vit_streams_through_token_gates():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    _stream_like_dense(model, 224, gates=24)
