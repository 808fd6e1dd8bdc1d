"""SyntheticActions: a procedurally generated video action-recognition set (no download).

Each video shows one textured object moving over a static scene filmed the way a real camera
films it: a natural photograph as the background (scikit-image's sample images), sub-pixel
camera shake, lighting flicker, Gaussian sensor noise, and lossy compression through libx264
at a typical CRF (23). Object edges are anti-aliased, so sub-pixel motion changes few pixels a
little. Most of a frame is temporally redundant -- what the Delta Activation Layer (Yousefzadeh
& Sifalakis, arXiv 2107.07305) exploits -- but, as on real footage, nearly every pixel changes
a little between frames (noise, shake, compression), so only gated, trained sparsity pays
(``bench/footage_realism.py`` compares the change statistics with real camera clips).

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

from ._photos import photo_background
from ._shapes import SHAPES, TEXTURES, texture
from ._shapes import background as procedural_background
from .encode import compress_video
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
        r_small = rng.uniform(0.09, 0.12) * side
        growth = rng.uniform(1.01, 1.03)
        growth = min(growth, (0.28 * side / r_small) ** (1.0 / n))
        radius = r_small * growth ** t
        if motion == "Recede":
            radius = radius[::-1].copy()
    elif motion in ("RotateClockwise", "RotateCounterClockwise"):
        # +angle turns clockwise on screen because image y points down.
        sign = 1.0 if motion == "RotateClockwise" else -1.0
        angle = sign * rng.uniform(0.03, 0.07) * t

    m = ext * float(radius.max()) + 1.0  # margin keeping the object inside the frame

    def start(lo: float, hi: float) -> float:
        return rng.uniform(lo, hi) if hi > lo else 0.5 * (lo + hi)

    if motion in _DIRECTIONS:
        dx, dy = _DIRECTIONS[motion]
        room = min(w - 2 * m if dx else np.inf, h - 2 * m if dy else np.inf)
        speed = min(rng.uniform(0.008, 0.016) * side, 0.95 * max(room, 0.0) / n)
        tx, ty = dx * speed * n, dy * speed * n
        x0 = start(m - min(tx, 0), w - m - max(tx, 0))
        y0 = start(m - min(ty, 0), h - m - max(ty, 0))
        cx, cy = x0 + dx * speed * t, y0 + dy * speed * t
    elif motion in ("SwingHorizontal", "SwingVertical"):
        horizontal = motion == "SwingHorizontal"
        amp = min(rng.uniform(0.08, 0.15) * side, max(((w if horizontal else h) - 2 * m) / 2, 0))
        phase = rng.uniform(0.0, 2.0 * np.pi)
        wave = amp * np.sin(2.0 * np.pi * t / rng.uniform(12.0, 24.0) + phase)
        ax, ay = (amp, 0.0) if horizontal else (0.0, amp)
        cx = start(m + ax, w - m - ax) + (wave if horizontal else 0.0)
        cy = start(m + ay, h - m - ay) + (0.0 if horizontal else wave)
    elif motion == "OrbitClockwise":
        rad = min(rng.uniform(0.08, 0.14) * side, max((min(h, w) - 2 * m) / 2, 0))
        phi = rng.uniform(0.0, 2.0 * np.pi) + rng.uniform(0.12, 0.25) * t
        cx = start(m + rad, w - m - rad) + rad * np.cos(phi)
        cy = start(m + rad, h - m - rad) + rad * np.sin(phi)
    else:  # rotation and scaling happen in place
        cx = np.full(frames, start(m, w - m))
        cy = np.full(frames, start(m, h - m))
    return np.broadcast_to(cx, (frames,)), np.broadcast_to(cy, (frames,)), angle, radius


def _camera_path(frames: int, jitter: float, shake: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Camera offsets (frames, 2) in pixels: a damped random walk (velocity ``v_t = 0.6 v_{t-1}
    + N(0, shake)``) kept within ``jitter`` pixels; fractional, so that the whole textured frame
    moves by a fraction of a pixel, as a camera on a pole or in a hand does."""
    off = np.zeros((frames, 2), dtype=np.float64)
    if jitter <= 0 or shake <= 0:
        return off
    vel = np.zeros(2)
    for i in range(1, frames):
        vel = 0.6 * vel + rng.normal(0.0, shake, size=2)
        off[i] = np.clip(off[i - 1] + vel, -jitter, jitter)
    return off


def _sample_shifted(canvas: np.ndarray, margin: int, off: np.ndarray, h: int,
                    w: int) -> np.ndarray:
    """Frames (F, h, w, 3) of ``canvas`` seen through the camera at offsets ``off``
    (bilinear interpolation, so sub-pixel shifts blend neighbouring pixels)."""
    out = np.empty((len(off), h, w, 3), dtype=np.float32)
    for t, (oy, ox) in enumerate(off):
        y0, x0 = int(np.floor(oy)), int(np.floor(ox))
        fy, fx = np.float32(oy - y0), np.float32(ox - x0)
        c = canvas[margin + y0 : margin + y0 + h + 1, margin + x0 : margin + x0 + w + 1]
        top = c[:h, :w] * (1 - fx) + c[:h, 1 : w + 1] * fx
        bot = c[1 : h + 1, :w] * (1 - fx) + c[1 : h + 1, 1 : w + 1] * fx
        out[t] = top * (1 - fy) + bot * fy
    return out


def _flicker(frames: int, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Per-frame global gain ``1 + amount * g_t`` (g: unit-variance AR(1), mains-lit scenes
    and auto exposure)."""
    g = np.zeros(frames)
    for i in range(frames):
        g[i] = (0.5 * g[i - 1] if i else 0.0) + rng.normal(0.0, 0.866 if i else 1.0)
    return (1.0 + amount * g).astype(np.float32)


BACKGROUNDS = ("photo", "procedural")


def render_video(index: int, *, num_classes: int = 10, frames: int = 16,
                 size: tuple[int, int] = (64, 64), split: str = "train", seed: int = 0,
                 shape_noise: float = 0.1, noise_std: float = 2.0,
                 camera_jitter: int = 1, camera_shake: float = 0.16, flicker: float = 0.01,
                 background: str = "photo",
                 crf: int | None = 23) -> tuple[np.ndarray, int]:
    """Render video ``index`` of a split: uint8 ``(frames, H, W, 3)`` and its label.

    What a real camera adds: a natural-photo background (``background="photo"``, else smooth
    procedural clutter), sub-pixel camera shake (``camera_shake`` px/frame, within
    ``camera_jitter`` px; both in pixels of a 64-pixel frame and scaled with the resolution,
    so that a scene shakes by the same fraction of the frame at any size), lighting flicker (a global gain of std ``flicker``), Gaussian sensor
    noise (``noise_std`` grey levels) and lossy compression through libx264 at ``crf``
    (``None``: uncompressed; even frame sizes only)."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
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
    r0 = rng.uniform(0.12, 0.2) * min(h, w)
    cx, cy, angle, radius = _trajectory(MOTIONS[label], frames, h, w, r0, ext, rng)
    angle = angle + rng.uniform(-np.pi / 6, np.pi / 6)
    param = rng.uniform(-1.0, 1.0)

    scale = min(h, w) / 64.0
    j = max(float(camera_jitter), 0.0) * scale
    margin = int(np.ceil(j)) + 1  # bilinear sampling reads one pixel beyond the window
    if background == "photo":
        canvas = photo_background(h + 2 * margin, w + 2 * margin, rng)
    else:
        canvas = procedural_background(h + 2 * margin, w + 2 * margin, rng)
    cam = _camera_path(frames, j, camera_shake * scale, rng)
    video = _sample_shifted(canvas, margin, cam, h, w)  # (F, H, W, 3)
    gain = _flicker(frames, flicker, rng)[:, None, None, None] if flicker > 0 else None

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

    # The object stands out from the scene behind it, as the subject of an action clip does
    # (50-120 grey levels per channel from the background's mean colour); texture contrast is
    # moderate so that the silhouette (the per-frame class cue) stays whole.
    bg = canvas.mean(axis=(0, 1))
    sign = np.where(rng.random(3) < 0.5, -1.0, 1.0)
    off = rng.uniform(50.0, 120.0, size=3)
    c1 = bg + sign * off
    c1 = np.where((c1 < 15.0) | (c1 > 240.0), bg - sign * off, c1)
    c1 = np.clip(c1, 15.0, 240.0).astype(f32)
    c2 = np.clip(c1 + rng.normal(0.0, 45.0, size=3), 0.0, 255.0).astype(f32)
    tex = texture(u, v, TEXTURES[shape_id], rng)[..., None]
    shade = np.clip(1.0 - 0.12 * v, 0.75, 1.25)[..., None]
    obj = (c1 + (c2 - c1) * tex) * shade
    video = video * (1.0 - alpha) + alpha * obj
    if gain is not None:
        video *= gain
    if noise_std > 0:
        video += f32(noise_std) * rng.standard_normal(video.shape, dtype=f32)
    video = np.clip(video + 0.5, 0, 255).astype(np.uint8)
    if crf is not None:
        video = compress_video(video, crf=crf)
    return video, label


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
                 camera_shake: float = 0.16, flicker: float = 0.01, background: str = "photo",
                 crf: int | None = 23, cache: bool = False) -> None:
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
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
        if crf is not None and (not 0 <= int(crf) <= 51 or hw[0] % 2 or hw[1] % 2):
            raise ValueError(f"crf must be None or in 0..51 with an even frame size (4:2:0 "
                             f"video), got crf={crf} for size {hw}")
        if min(noise_std, camera_shake, flicker, camera_jitter) < 0:
            raise ValueError("noise_std, camera_shake, flicker and camera_jitter must be >= 0")
        self.num_videos, self.num_classes, self.frames = num_videos, num_classes, frames
        self.size: tuple[int, int] = hw
        self.split, self.seed = split, seed
        self.clip_len = frames if clip_len is None else clip_len
        self.clip_stride = clip_stride
        clip_span(self.clip_len, clip_stride)  # validates
        self.transform, self.mean, self.std = transform, tuple(mean), tuple(std)
        self.shape_noise, self.noise_std, self.camera_jitter = shape_noise, noise_std, camera_jitter
        self.camera_shake, self.flicker, self.background = camera_shake, flicker, background
        self.crf = None if crf is None else int(crf)
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
                    camera_jitter=self.camera_jitter, camera_shake=self.camera_shake,
                    flicker=self.flicker, background=self.background, crf=self.crf)

    def __len__(self) -> int:
        return self.num_videos

    def render(self, index: int, *, compress: bool = True) -> np.ndarray:
        """Video ``index`` as uint8 ``(frames, H, W, 3)``; identical on every call.

        ``compress=False`` skips the libx264 round trip (for writers that encode themselves)."""
        if not 0 <= index < self.num_videos:
            raise IndexError(f"video index {index} out of range for {self.num_videos} videos")
        cached = self._cache is not None and compress
        if cached and index in self._cache:
            return self._cache[index]
        video, _ = render_video(index, num_classes=self.num_classes, frames=self.frames,
                                size=self.size, split=self.split, seed=self.seed,
                                shape_noise=self.shape_noise, noise_std=self.noise_std,
                                camera_jitter=self.camera_jitter,
                                camera_shake=self.camera_shake, flicker=self.flicker,
                                background=self.background,
                                crf=self.crf if compress else None)
        if cached:
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
