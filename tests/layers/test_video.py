"""Clip and frame layouts (DESIGN.md §1 "Clips and frames") and VideoModel averaging."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltasparse as ds
from deltasparse.layers import sparsity_layers


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


def _converted(**kw):
    model = Tiny()
    gm = ds.convert(model, ds.DeltaConfig(threshold_init=0.2, **kw))
    gm(torch.randn(1, 2, 4, 4))  # materialise theta
    with torch.no_grad():
        layer = gm.get_submodule("act_delta")
        layer.theta.copy_(torch.tensor([0.1, 0.25, 0.4]))
    return model, gm, gm.get_submodule("act_delta")


def test_frame_by_frame_is_the_quantiser_without_counts():
    model, gm, layer = _converted()
    for _ in range(3):
        f = torch.randn(2, 2, 4, 4)
        a = F.relu(model.conv(f))
        thr = torch.tensor([0.1, 0.25, 0.4]).reshape(3, 1, 1)
        want = model.fc(torch.flatten(torch.round(a / thr) * thr, 1))
        torch.testing.assert_close(gm(f), want)
        assert layer.stats.total == 0 and layer.stats.nonzero == 0
        assert layer.loss is None
        assert ds.sparsity_loss(gm).item() == 0.0


def test_deltas_within_clips_never_across():
    _, gm, layer = _converted()
    video = ds.VideoModel(gm, average="none")
    clip0 = torch.zeros(1, 3, 2, 4, 4) - 1.0  # relu -> conv bias only: a static clip
    clip1 = torch.randn(1, 3, 2, 4, 4) * 50.0  # huge change at the clip boundary
    clip1[:, 1:] = clip1[:, :1]  # ... but static within the clip as well
    batch = torch.cat([clip0, clip1])
    out = video(batch)
    assert layer.stats.nonzero == 0  # only the boundary differs, and it is not a delta
    assert layer.stats.total == 2 * 2 * 3 * 4 * 4

    # now moving clips: counts equal the sum of per-clip counts
    batch = torch.randn(2, 4, 2, 4, 4)
    batch[1] += 100.0
    video(batch)
    both = layer.stats.nonzero
    per_clip = 0
    for i in range(2):
        video(batch[i : i + 1])
        per_clip += layer.stats.nonzero
    assert both == per_clip
    # the naive flattened-batch count would include the boundary (a discriminating test)
    q = layer.quantize(F.relu(gm.conv(batch.flatten(0, 1))))
    flat = int(torch.count_nonzero(q[1:] - q[:-1]))
    assert flat > both
    assert out.shape == (2, 3, 5)


def test_clip_len_is_reset_even_after_an_error():
    _, gm, layer = _converted()
    video = ds.VideoModel(gm)
    with pytest.raises(ValueError, match="time axis"):
        video(torch.randn(2, 1, 2, 4, 4))
    assert layer.clip_len is None
    video(torch.randn(2, 3, 2, 4, 4))
    assert layer.clip_len is None and layer.stats.total == 2 * 2 * 3 * 16


def test_video_outputs_equal_frame_outputs():
    _, gm, _ = _converted()
    x = torch.randn(2, 3, 2, 4, 4)
    per_frame = torch.stack(
        [torch.stack([gm(x[b, t : t + 1])[0] for t in range(3)]) for b in range(2)]
    )
    torch.testing.assert_close(ds.VideoModel(gm, average="none")(x), per_frame)
    torch.testing.assert_close(ds.VideoModel(gm, average="logits")(x), per_frame.mean(1))
    torch.testing.assert_close(
        ds.VideoModel(gm, average="softmax")(x), per_frame.softmax(-1).mean(1)
    )
    with pytest.raises(ValueError, match="average"):
        ds.VideoModel(gm, average="max")


def test_frame_layout_delta_output_in_video():
    _, gm, layer = _converted(delta_output=True)
    x = torch.randn(1, 3, 2, 4, 4)
    ds.VideoModel(gm, average="none")(x)
    a = F.relu(gm.conv(x[0]))
    q = layer.quantize(a)
    d = q[1:] - q[:-1]
    assert layer.stats.nonzero == int(torch.count_nonzero(d))
    # the fc sees [q0, q1-q0, q2-q1]
    seen = []
    h = gm.fc.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    ds.VideoModel(gm, average="none")(x)
    h.remove()
    torch.testing.assert_close(seen[0], torch.cat([q[:1], d]).flatten(1))


def test_video_model_bad_input():
    video = ds.VideoModel(Tiny())
    with pytest.raises(ValueError, match=r"clips \(B, T, C, ...\).*\(2, 4\)"):
        video(torch.randn(2, 4))
    _, gm, _ = _converted()
    with pytest.raises(ValueError, match="at least 2 dims"):
        gm.get_submodule("act_delta")(torch.randn(3))


def test_clip_context_only_touches_frame_layers():
    _, gm, layer = _converted()
    clip_layer = ds.DeltaActivation()
    holder = nn.ModuleDict({"gm": gm, "clip": clip_layer})
    with ds.layers.clip_context(holder, 4):
        assert layer.clip_len == 4 and clip_layer.clip_len is None
    assert layer.clip_len is None
    assert [n for n, _ in sparsity_layers(holder)] == ["gm.act_delta", "clip"]
