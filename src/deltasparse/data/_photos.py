"""Natural-image backgrounds for the synthetic videos: crops of the photographs that ship in
scikit-image's wheel (``skimage/data``; read as files, skimage itself is never imported).

Real footage is textured at every scale; smooth colour fields are not. With a photograph
behind the moving object, sub-pixel camera shake changes every edge a little each frame, as
it does on a real camera (the reason real footage defeats a delta engine that gates nothing).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from .errors import DatasetError

__all__ = ["PHOTOS", "load_photo", "photo_background"]

# Photographs and natural textures of skimage/data (public domain or CC0, see its README).
PHOTOS: tuple[str, ...] = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
    "grass.png", "gravel.png", "moon.png", "motorcycle_left.png", "rocket.jpg",
    "hubble_deep_field.jpg",
)  # fmt: skip


def _data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "the synthetic videos' photo backgrounds need scikit-image's sample images; "
            "install it (pip install scikit-image) or pass background='procedural'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@functools.lru_cache(maxsize=len(PHOTOS))
def load_photo(name: str) -> np.ndarray:
    """Photo ``name`` as float32 RGB ``(H, W, 3)`` in ``[0, 255]`` (read-only, cached)."""
    from PIL import Image  # matplotlib's dependency

    path = _data_dir() / name
    if not path.is_file():
        raise DatasetError(f"photo {path} is missing from the scikit-image install; reinstall "
                           "scikit-image or pass background='procedural'")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    arr.setflags(write=False)
    return arr


def photo_background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of a random photo, resized to ``(h, w, 3)`` float32 in ``[0, 255]``,
    with a random flip, colour tint and contrast (grey photos get a colour)."""
    from PIL import Image

    photo = load_photo(PHOTOS[int(rng.integers(len(PHOTOS)))])
    ph, pw = photo.shape[:2]
    scale = rng.uniform(0.35, 0.9)
    ch = max(8, int(round(min(ph, pw * h / w) * scale)))
    cw = max(8, int(round(ch * w / h)))
    ch, cw = min(ch, ph), min(cw, pw)
    y0 = int(rng.integers(0, ph - ch + 1))
    x0 = int(rng.integers(0, pw - cw + 1))
    crop = np.ascontiguousarray(photo[y0 : y0 + ch, x0 : x0 + cw])
    img = Image.fromarray(crop.astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    out = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    tint = rng.uniform(0.75, 1.2, size=3).astype(np.float32)
    contrast = np.float32(rng.uniform(0.4, 0.8))  # scenery, not the subject
    mean = out.mean()
    out = (out - mean) * contrast + mean * tint
    return np.clip(out, 0.0, 255.0).astype(np.float32)
