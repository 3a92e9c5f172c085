"""Images in and out of the model: image and mask files, [-1, 1] floats to uint8, grids, PNGs."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from diffjax.data.pipeline import RESIZE

log = logging.getLogger(__name__)


class ImageFileError(ValueError):
    """An input or output file that cannot be used."""


def _open(path: str, what: str, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert(mode), np.float32)
    except FileNotFoundError:
        raise ImageFileError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ImageFileError(f"{what} {path}: a directory, not an image file") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageFileError(f"{what} {path}: not a readable image ({err})") from None


def read_image(path: str, channels: int, what: str = "--input") -> np.ndarray:
    """An image file (PNG, JPEG, WebP, … anything PIL reads) → float32 [H, W, channels] in
    [-1, 1]: grey is repeated to RGB, RGB is averaged to grey (ITU-R 601-2 luma, PIL's "L"),
    alpha is dropped (the colour under it is used)."""
    x = _open(path, what, "L" if channels == 1 else "RGB")
    return (x.reshape(*x.shape[:2], channels) / 127.5) - 1.0


def read_mask(path: str, what: str = "--mask") -> np.ndarray:
    """A mask file → float32 [H, W, 1] of 0/1, 1 (white) = regenerate, 0 (black) = keep: its
    luma thresholded at half; a warning says so if it was not black and white."""
    x = _open(path, what, "L") / 255.0
    if np.any((x > 0) & (x < 1)):
        log.warning("%s %s is not black and white: thresholded at 0.5 (white = regenerate)",
                    what, path)  # fmt: skip
    return (x >= 0.5).astype(np.float32)[..., None]


def fit(image: np.ndarray, size: tuple[int, int], what: str, resize: str = "bicubic") -> np.ndarray:
    """`image` [H, W, C] at `size` (h, w): as it is when it has that size; resized with the
    filter `resize` (a name of `data.RESIZE`: the model's `data.resize` for images, nearest for
    masks) with a warning when only the scale differs; refused when the aspect ratio differs
    (crop or pad it first)."""
    h, w = image.shape[:2]
    if (h, w) == tuple(size):
        return image
    if h * size[1] != w * size[0]:
        raise ImageFileError(
            f"{what}: {h}x{w} has another aspect ratio than the model's {size[0]}x{size[1]}; "
            f"crop or pad it to that ratio"
        )
    log.warning("%s: resizing %dx%d to the model's %dx%d (%s)", what, h, w, *size, resize)
    planes = [
        np.asarray(
            Image.fromarray(image[..., k].astype(np.float32)).resize(size[::-1], RESIZE[resize])
        )
        for k in range(image.shape[-1])
    ]
    return np.clip(np.stack(planes, -1), -1.0, 1.0)


def output_paths(inputs: list[str], output: str, suffix: str, overwrite: bool) -> list[str]:
    """Where each input's result goes: `output` itself for one input (unless it is a directory),
    else `<output>/<stem><suffix>.png`. Refuses existing files (unless `overwrite`) and a missing
    parent directory, before anything is computed."""
    if not inputs:
        raise ImageFileError("--input: name at least one image file")
    if not output:
        raise ImageFileError("--output: name the file (or directory, for several inputs) to write")
    if len(inputs) == 1 and not os.path.isdir(output):
        outs = [output]
    else:
        os.makedirs(output, exist_ok=True)
        stems = [os.path.splitext(os.path.basename(p))[0] for p in inputs]
        outs = [os.path.join(output, f"{s}{suffix}.png") for s in stems]
    for p in outs:
        if os.path.exists(p) and not overwrite:
            raise ImageFileError(f"--output {p} exists; remove it or pass --overwrite")
    parent = os.path.dirname(os.path.abspath(outs[0]))
    if not os.path.isdir(parent):
        raise ImageFileError(f"--output {outs[0]}: the directory {parent} does not exist")
    return outs


def write_image(image: np.ndarray, path: str) -> str:
    """Writes a [-1, 1] image [H, W, C] as a PNG (or what the suffix names)."""
    img = to_uint8(image[None])[0]
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
    return path


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
