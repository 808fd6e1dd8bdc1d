"""Shape families, object textures and backgrounds for the synthetic action videos.

Every shape is an *implicit level function* ``f(u, v)`` in the object's own coordinates
(unit radius): the shape is ``f <= 1`` and ``f`` grows roughly like the distance from the
centre, so ``0.5 + (1 - f) * radius_px`` is a one-pixel anti-aliased edge. Sub-pixel motion
then changes edge pixels a little each frame, the way real footage does, instead of popping
whole pixels. Everything is vectorised over ``(frames, H, W)`` arrays.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ShapeFn = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def _radius(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v)


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, inradius: float, phase: float) -> np.ndarray:
    out = None
    for k in range(sides):
        a = phase + 2.0 * np.pi * k / sides
        d = (u * np.cos(a) + v * np.sin(a)) / inradius
        out = d if out is None else np.maximum(out, d)
    return out


def _disc(u, v, p):
    return _radius(u, v)


def _square(u, v, p):
    return np.maximum(np.abs(u), np.abs(v)) / (0.8 + 0.05 * p)


def _triangle(u, v, p):
    return _polygon(u, v, 3, 0.55 + 0.05 * p, -np.pi / 2)


def _bar(u, v, p):
    return np.maximum(np.abs(u), np.abs(v) / (0.32 + 0.04 * p))


def _semicircle(u, v, p):
    return np.maximum(_radius(u, v + 0.3), (0.3 - v) / (0.6 + 0.05 * p) + 0.0)


def _star(u, v, p):
    theta = np.arctan2(v, u)
    return _radius(u, v) / (0.62 + (0.38 + 0.05 * p) * np.cos(5 * theta))


def _gear(u, v, p):
    theta = np.arctan2(v, u)
    return _radius(u, v) / (0.75 + 0.25 * np.tanh(4.0 * np.cos(6 * theta)))


def _ring(u, v, p):
    r = _radius(u, v)
    inner = 0.5 + 0.08 * p
    return np.maximum(r, 1.0 + inner - r)


def _crescent(u, v, p):
    r = _radius(u, v)
    r2 = _radius(u - 0.45 - 0.05 * p, v) / 0.8
    return np.maximum(r, 2.0 - r2)


def _cross(u, v, p):
    w = 0.33 + 0.04 * p
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au / w, av), np.maximum(au, av / w))


def _tee(u, v, p):
    w = 0.3 + 0.04 * p
    au = np.abs(u)
    bar = np.maximum(au, np.abs(v + 0.65) / w)
    stem = np.maximum(au / w, np.abs(v - 0.1) / 0.9)
    return np.minimum(bar, stem)


def _bowtie(u, v, p):
    au = np.abs(u)
    return np.maximum(au, np.abs(v) - (0.85 + 0.05 * p) * au + 0.85)


# Order matters: class k of SyntheticActions uses SHAPES[k] with texture kind TEXTURES[k].
# Shapes are chosen to stay distinct under the small random rotation and aspect change.
SHAPES: tuple[tuple[str, ShapeFn], ...] = (
    ("disc", _disc),
    ("square", _square),
    ("triangle", _triangle),
    ("ring", _ring),
    ("star", _star),
    ("tee", _tee),
    ("bar", _bar),
    ("cross", _cross),
    ("semicircle", _semicircle),
    ("crescent", _crescent),
    ("gear", _gear),
    ("bowtie", _bowtie),
)
TEXTURE_KINDS: tuple[str, ...] = ("plain", "stripes", "checker", "dots")
TEXTURES: tuple[int, ...] = (1, 3, 2, 0, 0, 1, 2, 3, 1, 2, 3, 0)


def texture(u: np.ndarray, v: np.ndarray, kind: int, rng: np.random.Generator) -> np.ndarray:
    """Object-attached texture in [0, 1] of kind ``TEXTURE_KINDS[kind]``; its frequency,
    angle and phase are random."""
    freq = float(rng.uniform(2.5, 4.5))
    a, b = rng.uniform(0.0, 2.0 * np.pi, size=2)
    if kind == 0:  # plain: a gentle gradient
        return 0.5 + 0.2 * np.sin(1.2 * (u * np.cos(a) + v * np.sin(a)) + b)
    if kind == 1:  # stripes
        return 0.5 + 0.5 * np.tanh(3.0 * np.sin(freq * np.pi * (u * np.cos(a) + v * np.sin(a))))
    if kind == 2:  # checker
        s = np.sin(freq * np.pi * u + b) * np.sin(freq * np.pi * v + a)
        return 0.5 + 0.5 * np.tanh(3.0 * s)
    s = np.sin(freq * np.pi * u + b) * np.sin(freq * np.pi * v + a)  # dots
    return np.clip(2.5 * (np.abs(s) - 0.45), 0.0, 1.0)


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation matrix (n_out, n_in) mapping a coarse grid onto n_out samples."""
    pos = np.linspace(0.0, n_in - 1, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
    frac = pos - lo
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] += 1.0 - frac
    m[np.arange(n_out), np.minimum(lo + 1, n_in - 1)] += frac
    return m


def smooth_noise(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth RGB noise (h, w, 3) in [-1, 1], bilinearly upsampled from a coarse grid."""
    ch = max(2, round(cells * h / max(h, w)))
    cw = max(2, round(cells * w / max(h, w)))
    coarse = rng.uniform(-1.0, 1.0, size=(3, ch, cw)).astype(np.float32)
    mh, mw = _interp_matrix(h, ch), _interp_matrix(w, cw)
    return np.einsum("hi,cij,wj->hwc", mh, coarse, mw)


def background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A cluttered static background (h, w, 3) float32 in [0, 255]: smooth colour fields
    at two scales plus a few soft elliptical blobs."""
    base = rng.uniform(40.0, 200.0, size=3).astype(np.float32)
    img = base + 45.0 * smooth_noise(h, w, 4, rng) + 18.0 * smooth_noise(h, w, 12, rng)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    side = float(min(h, w))
    for _ in range(int(rng.integers(3, 7))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.04, 0.18, size=2) * side
        a = rng.uniform(0.0, np.pi)
        dy, dx = ys - cy, xs - cx
        ca, sa = np.float32(np.cos(a)), np.float32(np.sin(a))
        q = ((dx * ca + dy * sa) / rx) ** 2 + ((dy * ca - dx * sa) / ry) ** 2
        alpha = 0.6 * np.exp(-q)[..., None]
        img = img * (1.0 - alpha) + alpha * rng.uniform(0.0, 255.0, size=3).astype(np.float32)
    return np.clip(img, 0.0, 255.0).astype(np.float32)
