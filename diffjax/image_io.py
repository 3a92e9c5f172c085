"""Images out of the model: [-1, 1] floats to uint8, grids, and PNG files."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, PngImagePlugin


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats [N, H, W, C] → uint8 [0, 255], rounding to nearest."""
    scaled = np.round((np.asarray(images, np.float32) + 1.0) * 127.5)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image."""
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid


def save_grid(
    images: np.ndarray,
    path: str,
    min_cell: int = 48,
    ncol: int | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Writes [-1, 1] images [N, H, W, C] as one PNG grid, upscaling small images (nearest).

    `ncol`: images per row (default about square); `metadata`: text chunks stored in the PNG
    (e.g. the prompt and sampler settings, shown by image viewers and `PIL.Image.open(p).text`).
    Returns the path written.
    """
    imgs = to_uint8(images)
    scale = max(1, math.ceil(min_cell / imgs.shape[1]))
    imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = make_grid(imgs, ncol=ncol, pad=max(1, scale // 2))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_itxt(k, str(v))
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path, pnginfo=info)
    return path
