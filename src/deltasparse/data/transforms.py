"""Clip transforms in plain torch (no torchvision): resize, crop, flip, normalise.

Clips are ``(T, C, H, W)`` tensors. ``normalize`` turns a uint8 clip (or a float clip in
[0, 1]) into the float32 ``(x / 255 - mean) / std`` that the models expect; the default
mean/std are the ImageNet statistics (``IMAGENET_MEAN``, ``IMAGENET_STD``) that
pretrained MobileNet/ResNet weights were trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Size = int | tuple[int, int]


def _check_clip(clip: torch.Tensor) -> None:
    if not isinstance(clip, torch.Tensor) or clip.dim() != 4:
        shape = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise ValueError(f"expected a clip tensor of shape (T, C, H, W), got {shape}")


def resized_hw(h: int, w: int, size: Size) -> tuple[int, int]:
    """Output (H, W) of ``resize``: an int is the short side (aspect kept), a pair is exact."""
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"resize short side must be >= 1, got {size}")
        if h <= w:
            return size, max(1, round(w * size / h))
        return max(1, round(h * size / w)), size
    th, tw = size
    if th < 1 or tw < 1:
        raise ValueError(f"resize size must be positive, got {size}")
    return int(th), int(tw)


def resize(clip: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear (antialiased) resize of a clip; keeps the dtype (uint8 is rounded back)."""
    _check_clip(clip)
    th, tw = resized_hw(clip.shape[-2], clip.shape[-1], size)
    if (th, tw) == tuple(clip.shape[-2:]):
        return clip
    out = F.interpolate(clip.float(), size=(th, tw), mode="bilinear", align_corners=False,
                        antialias=True)
    if clip.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(clip.dtype)


def crop_box(h: int, w: int, size: tuple[int, int], *, rng: np.random.Generator | None = None
             ) -> tuple[int, int]:
    """Top-left corner of a ``size`` crop: centred, or uniformly random when ``rng`` is given."""
    ch, cw = size
    if ch > h or cw > w:
        raise ValueError(f"crop {ch}x{cw} is larger than the frame {h}x{w}; "
                         "resize to at least the crop size first")
    if rng is None:
        return (h - ch) // 2, (w - cw) // 2
    return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))


def center_crop(clip: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    _check_clip(clip)
    y, x = crop_box(clip.shape[-2], clip.shape[-1], size)
    return clip[..., y:y + size[0], x:x + size[1]]


def random_crop(clip: torch.Tensor, size: tuple[int, int],
                rng: np.random.Generator) -> torch.Tensor:
    """The same random crop for every frame of the clip."""
    _check_clip(clip)
    y, x = crop_box(clip.shape[-2], clip.shape[-1], size, rng=rng)
    return clip[..., y:y + size[0], x:x + size[1]]


def hflip(clip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right. Beware: on SyntheticActions this swaps MoveLeft and MoveRight."""
    _check_clip(clip)
    return clip.flip(-1)


def normalize(clip: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """float32 ``(x - mean) / std`` per channel; uint8 input is scaled to [0, 1] first."""
    _check_clip(clip)
    c = clip.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries but the clip has "
                         f"{c} channels")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    x = clip.float()
    if clip.dtype == torch.uint8:
        x = x / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    return (x - m) / s


def normalize_frames(frames: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 numpy frames ``(T, H, W, 3)`` -> normalised float32 clip ``(T, 3, H, W)``.

    Same result as ``normalize(frames_to_clip(frames))`` but in single-threaded numpy:
    small per-item tensor ops in torch are dominated by thread-pool overhead, which hurts
    most in DataLoader workers on a busy machine."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {frames.shape}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean/std need 3 entries and std > 0, got {tuple(mean)}, {tuple(std)}")
    std_arr = np.asarray(std, dtype=np.float32)
    x = frames.astype(np.float32)
    x *= 1.0 / (255.0 * std_arr)
    x -= np.asarray(mean, dtype=np.float32) / std_arr
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def frames_to_clip(frames: np.ndarray) -> torch.Tensor:
    """uint8 numpy frames ``(T, H, W, 3)`` -> uint8 tensor ``(T, 3, H, W)`` (copies once)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {frames.shape}")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
