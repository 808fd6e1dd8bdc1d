"""The model registry and MobileNet v1; torchvision models need the ``vision`` extra."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import deltasparse as ds
from deltasparse.models import MobileNetV1


def test_registry_lists_and_creates():
    names = ds.models.list_models()
    assert {"mobilenet_v1", "resnet18", "resnet50", "mobilenet_v2"} <= set(names)
    assert names == sorted(names)
    m = ds.models.create("mobilenet_v1", num_classes=7, width_mult=0.25)
    assert isinstance(m, MobileNetV1) and m.classifier.out_features == 7
    with pytest.raises(KeyError, match="unknown model 'mobilenet_v9'.*mobilenet_v1"):
        ds.models.create("mobilenet_v9")
    with pytest.raises(ValueError, match="registered twice"):
        ds.models.register_model("mobilenet_v1")(lambda: None)


@pytest.mark.parametrize("width,features", [(0.25, 256), (0.5, 512), (1.0, 1024)])
def test_mobilenet_v1_shapes(width, features):
    m = ds.models.mobilenet_v1(num_classes=11, width_mult=width).eval()
    assert m.num_features == features
    with torch.no_grad():
        y = m(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 11) and torch.isfinite(y).all()
    with torch.no_grad():
        assert m.features(torch.randn(1, 3, 64, 64)).shape == (1, features, 2, 2)  # stride 32


def test_mobilenet_v1_parameter_count_and_bad_width():
    m = ds.models.mobilenet_v1(num_classes=1000)
    # the published MobileNet v1 1.0 has 4.2M parameters
    assert 4.1e6 < sum(p.numel() for p in m.parameters()) < 4.3e6
    with pytest.raises(ValueError, match="width_mult"):
        ds.models.mobilenet_v1(width_mult=0)


def test_every_parameter_trains_when_converted():
    video = ds.convert(ds.VideoModel(ds.models.mobilenet_v1(num_classes=5, width_mult=0.25)))
    x = torch.randn(2, 2, 3, 32, 32)
    loss = F.cross_entropy(video(x), torch.tensor([0, 4])) + ds.sparsity_loss(video)
    loss.backward()
    for name, p in video.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(1 for n, _ in video.named_parameters() if n.endswith("theta")) == 27


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_torchvision_models_need_the_vision_extra(name):
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed")
    with pytest.raises(ImportError, match=r"torchvision.*deltasparse\[vision\]"):
        ds.models.create(name, num_classes=10)
