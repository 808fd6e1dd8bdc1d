"""Synthetic temporal streams for tests and benchmarks: a static scene with moving objects.

A smooth textured background (fixed), a few textured patches that move a few pixels per
frame, and optional per-frame sensor noise: the temporal structure delta inference exploits
(most pixels static, changes local and moving), with no data set to download.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["synthetic_stream"]


def _smooth(gen: torch.Generator, c: int, h: int, w: int, cells: int) -> torch.Tensor:
    coarse = torch.randn(1, c, max(2, h // cells), max(2, w // cells), generator=gen)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]


def synthetic_stream(
    frames: int,
    shape: tuple[int, int, int, int],
    *,
    objects: int = 2,
    object_size: float = 0.2,
    speed: float = 1.5,
    noise: float = 0.0,
    seed: int = 0,
):
    """Yield ``frames`` frames of shape ``(B, C, H, W)`` (float32), each stream independent.

    ``object_size`` is the side of each moving patch as a fraction of ``min(H, W)``;
    ``speed`` is pixels per frame; ``noise`` the std of i.i.d. per-frame sensor noise.
    """
    b, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    bg = torch.stack([_smooth(gen, c, h, w, 8) + 0.3 * _smooth(gen, c, h, w, 2)
                      for _ in range(b)])  # fmt: skip
    side = max(2, int(object_size * min(h, w)))
    tex = torch.stack([torch.stack([_smooth(gen, c, side, side, 2) + 1.0 for _ in range(objects)])
                       for _ in range(b)]) if objects else None  # fmt: skip
    pos = torch.rand(b, objects, 2, generator=gen) * torch.tensor([h - side, w - side])
    ang = torch.rand(b, objects, generator=gen) * 6.2832
    vel = torch.stack([ang.sin(), ang.cos()], -1) * speed
    lim = torch.tensor([h - side, w - side], dtype=torch.float32)
    for _ in range(frames):
        x = bg.clone()
        for i in range(b):
            for j in range(objects):
                y0, x0 = (int(v) for v in pos[i, j].round())
                x[i, :, y0 : y0 + side, x0 : x0 + side] = tex[i, j]
        if noise:
            x += noise * torch.randn(x.shape, generator=gen)
        yield x
        pos += vel
        bounce = (pos < 0) | (pos > lim)
        vel[bounce] = -vel[bounce]
        pos.clamp_(min=torch.zeros(2), max=lim)
