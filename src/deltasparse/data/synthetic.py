"""SyntheticActions: a procedurally generated video action-recognition set (no download).

Each video shows one textured object moving over a cluttered, static background (smooth
colour fields and soft blobs), filmed by a slightly shaky camera (integer random-walk
jitter of at most ``camera_jitter`` pixels) with Gaussian sensor noise. Object edges are
anti-aliased, so sub-pixel motion changes few pixels a little; most pixels change only by
noise between frames. That is the temporal redundancy of real footage that the Delta
Activation Layer (Yousefzadeh & Sifalakis, arXiv 2107.07305) exploits.

**Classes.** Class ``k`` is a *motion* (``MOTIONS[k]``: move right/left/down/up, rotate
cw/ccw, approach, recede, swing horizontally/vertically, orbit, move diagonally; at most 12
classes) **and** an object family: a shape (``SHAPES[k]`` in ``_shapes.py``) with a texture
kind (plain, stripes, checker or dots). A per-frame model averaged over time -- the paper's
MobileNet v1 on UCF101 -- cannot see motion direction in a single frame; on UCF101 it relies
on scene context. The object family plays that role here, so a per-frame CNN can learn the
task while the motion gives realistic temporal statistics. To keep the per-frame cue
imperfect, as context is, each family varies within the class (aspect ratio, orientation
within +-30 degrees, a shape parameter, texture frequency and phase), and with probability
``shape_noise`` a video borrows another class's family (only its motion then tells the
class). Colours, size, start position, speed and background are drawn independently of the
class, so nothing else in a frame gives the class away.

**Determinism.** Video ``i`` of a split depends only on ``(seed, split, i)`` and the
dataset parameters; its label is ``i % num_classes`` (balanced classes).

**Output.** ``dataset[i]`` is ``(clip, label)`` with ``clip`` float32 ``(T, 3, H, W)``
normalised as ``(x / 255 - mean) / std`` (default ImageNet mean/std, see ``transforms``).
``dataset.render(i)`` gives the whole video as uint8 ``(F, H, W, 3)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ._shapes import SHAPES, TEXTURES, background, texture
from .sampling import clip_indices, clip_span, even_starts
from .transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_frames

logger = logging.getLogger(__name__)

MOTIONS: tuple[str, ...] = (
    "MoveRight", "MoveLeft", "MoveDown", "MoveUp", "RotateClockwise", "RotateCounterClockwise",
    "Approach", "Recede", "SwingHorizontal", "SwingVertical", "OrbitClockwise", "MoveDiagonal",
)
MAX_CLASSES = len(MOTIONS)
_SPLITS = {"train": 0, "test": 1}
_DIRECTIONS = {"MoveRight": (1.0, 0.0), "MoveLeft": (-1.0, 0.0), "MoveDown": (0.0, 1.0),
               "MoveUp": (0.0, -1.0), "MoveDiagonal": (0.7071, 0.7071)}


def _trajectory(motion: str, frames: int, h: int, w: int, r0: float, ext: float,
                rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Centre x, y, rotation and radius per frame (float64 arrays of length ``frames``).

    ``ext`` is the object's half-extent per unit radius; positions keep the whole object in
    view for the whole video."""
    side = float(min(h, w))
    t = np.arange(frames, dtype=np.float64)
    n = max(frames - 1, 1)
    radius = np.full(frames, r0)
    angle = np.zeros(frames)

    if motion in ("Approach", "Recede"):
        r_small = rng.uniform(0.11, 0.15) * side
        growth = rng.uniform(1.02, 1.05)
        growth = min(growth, (0.28 * side / r_small) ** (1.0 / n))
        radius = r_small * growth ** t
        if motion == "Recede":
            radius = radius[::-1].copy()
    elif motion in ("RotateClockwise", "RotateCounterClockwise"):
        # +angle turns clockwise on screen because image y points down.
        sign = 1.0 if motion == "RotateClockwise" else -1.0
        angle = sign * rng.uniform(0.05, 0.12) * t

    m = ext * float(radius.max()) + 1.0  # margin keeping the object inside the frame

    def start(lo: float, hi: float) -> float:
        return rng.uniform(lo, hi) if hi > lo else 0.5 * (lo + hi)

    if motion in _DIRECTIONS:
        dx, dy = _DIRECTIONS[motion]
        room = min(w - 2 * m if dx else np.inf, h - 2 * m if dy else np.inf)
        speed = min(rng.uniform(0.012, 0.025) * side, 0.95 * max(room, 0.0) / n)
        tx, ty = dx * speed * n, dy * speed * n
        x0 = start(m - min(tx, 0), w - m - max(tx, 0))
        y0 = start(m - min(ty, 0), h - m - max(ty, 0))
        cx, cy = x0 + dx * speed * t, y0 + dy * speed * t
    elif motion in ("SwingHorizontal", "SwingVertical"):
        horizontal = motion == "SwingHorizontal"
        amp = min(rng.uniform(0.08, 0.15) * side, max(((w if horizontal else h) - 2 * m) / 2, 0))
        phase = rng.uniform(0.0, 2.0 * np.pi)
        wave = amp * np.sin(2.0 * np.pi * t / rng.uniform(6.0, 12.0) + phase)
        ax, ay = (amp, 0.0) if horizontal else (0.0, amp)
        cx = start(m + ax, w - m - ax) + (wave if horizontal else 0.0)
        cy = start(m + ay, h - m - ay) + (0.0 if horizontal else wave)
    elif motion == "OrbitClockwise":
        rad = min(rng.uniform(0.08, 0.14) * side, max((min(h, w) - 2 * m) / 2, 0))
        phi = rng.uniform(0.0, 2.0 * np.pi) + rng.uniform(0.25, 0.5) * t
        cx = start(m + rad, w - m - rad) + rad * np.cos(phi)
        cy = start(m + rad, h - m - rad) + rad * np.sin(phi)
    else:  # rotation and scaling happen in place
        cx = np.full(frames, start(m, w - m))
        cy = np.full(frames, start(m, h - m))
    return np.broadcast_to(cx, (frames,)), np.broadcast_to(cy, (frames,)), angle, radius


def _camera_path(frames: int, jitter: int, rng: np.random.Generator) -> np.ndarray:
    """Integer camera offsets (frames, 2) as a bounded random walk: mostly still, an
    occasional one-pixel shake."""
    off = np.zeros((frames, 2), dtype=np.int64)
    if jitter <= 0:
        return off
    steps = rng.integers(-1, 2, size=(frames, 2)) * (rng.random((frames, 2)) < 0.2)
    for i in range(1, frames):
        off[i] = np.clip(off[i - 1] + steps[i], -jitter, jitter)
    return off


def render_video(index: int, *, num_classes: int = 10, frames: int = 16,
                 size: tuple[int, int] = (64, 64), split: str = "train", seed: int = 0,
                 shape_noise: float = 0.1, noise_std: float = 2.0,
                 camera_jitter: int = 1) -> tuple[np.ndarray, int]:
    """Render video ``index`` of a split: uint8 ``(frames, H, W, 3)`` and its label."""
    if split not in _SPLITS or not 1 <= num_classes <= MAX_CLASSES or index < 0 or seed < 0:
        raise ValueError(f"render_video: need split 'train'/'test', 1 <= num_classes <= "
                         f"{MAX_CLASSES}, index >= 0 and seed >= 0; got {split!r}, "
                         f"{num_classes}, {index}, {seed}")
    h, w = size
    label = index % num_classes
    rng = np.random.default_rng([seed, _SPLITS[split], index, num_classes])

    shape_id = label
    if num_classes > 1 and rng.random() < shape_noise:
        shape_id = (label + int(rng.integers(1, num_classes))) % num_classes
    shape_fn = SHAPES[shape_id][1]
    aspect = float(np.exp(rng.uniform(-0.25, 0.25)))
    sx, sy = np.sqrt(aspect), 1.0 / np.sqrt(aspect)
    ext = 1.1 * max(sx, sy)
    r0 = rng.uniform(0.14, 0.22) * min(h, w)
    cx, cy, angle, radius = _trajectory(MOTIONS[label], frames, h, w, r0, ext, rng)
    angle = angle + rng.uniform(-np.pi / 6, np.pi / 6)
    param = rng.uniform(-1.0, 1.0)

    j = max(int(camera_jitter), 0)
    canvas = background(h + 2 * j, w + 2 * j, rng)
    cam = _camera_path(frames, j, rng)
    rows = (j + cam[:, 0])[:, None] + np.arange(h)
    cols = (j + cam[:, 1])[:, None] + np.arange(w)
    video = canvas[rows[:, :, None], cols[:, None, :]]  # (F, H, W, 3)

    # Object in world coordinates, seen from the shifted camera.
    f32 = np.float32
    ox = (cx - cam[:, 1]).astype(f32)[:, None, None]
    oy = (cy - cam[:, 0]).astype(f32)[:, None, None]
    dx = np.arange(w, dtype=f32)[None, None, :] - ox
    dy = np.arange(h, dtype=f32)[None, :, None] - oy
    cos = np.cos(angle).astype(f32)[:, None, None]
    sin = np.sin(angle).astype(f32)[:, None, None]
    rad = radius.astype(f32)[:, None, None]
    u = (dx * cos + dy * sin) / (rad * f32(sx))
    v = (dy * cos - dx * sin) / (rad * f32(sy))
    level = shape_fn(u, v, param)
    alpha = np.clip(0.5 + (1.0 - level) * rad * f32(min(sx, sy)), 0.0, 1.0)[..., None]

    # Texture contrast is moderate so the silhouette (the per-frame class cue) stays whole.
    c1 = rng.uniform(20.0, 235.0, size=3).astype(f32)
    c2 = np.clip(c1 + rng.normal(0.0, 45.0, size=3), 0.0, 255.0).astype(f32)
    tex = texture(u, v, TEXTURES[shape_id], rng)[..., None]
    shade = np.clip(1.0 - 0.12 * v, 0.75, 1.25)[..., None]
    obj = (c1 + (c2 - c1) * tex) * shade
    video = video * (1.0 - alpha) + alpha * obj
    if noise_std > 0:
        video += f32(noise_std) * rng.standard_normal(video.shape, dtype=f32)
    return np.clip(video + 0.5, 0, 255).astype(np.uint8), label


class SyntheticActions(Dataset):
    """Procedural action-recognition videos; ``dataset[i] -> (clip (T,3,H,W) float32, label)``.

    ``clip_len`` frames (default: all ``frames``) are taken every ``clip_stride`` frames:
    at a random start in the train split (torch's RNG, so ``torch.manual_seed`` and
    DataLoader worker seeding apply), the centre clip in the test split. ``transform`` is
    applied to the normalised clip. Rendering costs about a millisecond per 64x64 frame;
    ``cache=True`` keeps rendered videos in memory (F*H*W*3 bytes each).
    """

    def __init__(self, num_videos: int = 200, num_classes: int = 10, frames: int = 16,
                 size: int | tuple[int, int] = (64, 64), split: str = "train", seed: int = 0,
                 clip_len: int | None = None, clip_stride: int = 1,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 shape_noise: float = 0.1, noise_std: float = 2.0, camera_jitter: int = 1,
                 cache: bool = False) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not 1 <= num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be in 1..{MAX_CLASSES} (one per motion in "
                             f"MOTIONS), got {num_classes}")
        if num_videos < 1 or frames < 1:
            raise ValueError(f"num_videos and frames must be >= 1, got {num_videos}, {frames}")
        hw = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(hw) != 2 or min(hw) < 8:
            raise ValueError(f"size must be an int or (H, W) with both >= 8, got {size}")
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if not 0.0 <= shape_noise <= 1.0:
            raise ValueError(f"shape_noise is a probability in [0, 1], got {shape_noise}")
        self.num_videos, self.num_classes, self.frames = num_videos, num_classes, frames
        self.size: tuple[int, int] = hw
        self.split, self.seed = split, seed
        self.clip_len = frames if clip_len is None else clip_len
        self.clip_stride = clip_stride
        clip_span(self.clip_len, clip_stride)  # validates
        self.transform, self.mean, self.std = transform, tuple(mean), tuple(std)
        self.shape_noise, self.noise_std, self.camera_jitter = shape_noise, noise_std, camera_jitter
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    @property
    def class_names(self) -> list[str]:
        return list(MOTIONS[: self.num_classes])

    @property
    def labels(self) -> list[int]:
        return [i % self.num_classes for i in range(self.num_videos)]

    def params(self) -> dict:
        """Keyword arguments that rebuild the same videos (used by ``write_ucf101_layout``)."""
        return dict(num_videos=self.num_videos, num_classes=self.num_classes,
                    frames=self.frames, size=self.size, split=self.split, seed=self.seed,
                    shape_noise=self.shape_noise, noise_std=self.noise_std,
                    camera_jitter=self.camera_jitter)

    def __len__(self) -> int:
        return self.num_videos

    def render(self, index: int) -> np.ndarray:
        """Video ``index`` as uint8 ``(frames, H, W, 3)``; identical on every call."""
        if not 0 <= index < self.num_videos:
            raise IndexError(f"video index {index} out of range for {self.num_videos} videos")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        video, _ = render_video(index, num_classes=self.num_classes, frames=self.frames,
                                size=self.size, split=self.split, seed=self.seed,
                                shape_noise=self.shape_noise, noise_std=self.noise_std,
                                camera_jitter=self.camera_jitter)
        if self._cache is not None:
            self._cache[index] = video
        return video

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += self.num_videos
        video = self.render(index)
        if self.split == "train":
            last = max(self.frames - clip_span(self.clip_len, self.clip_stride), 0)
            start = int(torch.randint(0, last + 1, ()).item())
        else:
            start = even_starts(self.frames, self.clip_len, self.clip_stride, 1)[0]
        idx = clip_indices(self.frames, self.clip_len, self.clip_stride, start)
        clip = normalize_frames(video[idx], self.mean, self.std)
        if self.transform is not None:
            clip = self.transform(clip)
        return clip, index % self.num_classes


__all__ = ["MOTIONS", "MAX_CLASSES", "SyntheticActions", "render_video"]
