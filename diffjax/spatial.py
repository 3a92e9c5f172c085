"""Spatial conditions made from the images themselves: low-res inputs (SR3) and random masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jnp.ndarray
# "inpaint_encoded": Stable Diffusion's inpainting layout, [the mask on the latent grid, the
# masked image's latents] (`encoded_inpaint_condition`), for imported SD inpainting U-Nets.
KINDS = ("upscale", "inpaint", "inpaint_encoded")


def low_res(images: Array, factor: int) -> Array:
    """[B, H, W, C] → [B, H/f, W/f, C] by averaging f × f blocks (a box filter: the antialiased
    downsampling that SR3's pairs are made with, and what `image_io.fit` and PIL's BOX do)."""
    b, h, w, c = images.shape
    return images.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def upsample(low: Array, size: tuple[int, int]) -> Array:
    """Bicubic upsampling of [B, h, w, C] to [B, *size, C], clipped to [-1, 1] (SR3 §2.3: the
    network sees the bicubic interpolation of the low-res input, concatenated to x_t)."""
    b, _, _, c = low.shape
    up = jax.image.resize(low, (b, *size, c), method="bicubic", antialias=False)
    return jnp.clip(up, -1.0, 1.0)


def upscale_condition(images: Array, factor: int) -> Array:
    """The SR condition of high-res training images: their low-res version, upsampled back."""
    return upsample(low_res(images, factor), images.shape[1:3])


def inpaint_condition(images: Array, mask: Array) -> Array:
    """[the image with the regenerated region blanked (0, mid-grey), the mask]: C + 1 channels,
    the input of a trained inpainting U-Net (as Stable Diffusion's inpainting model takes)."""
    return jnp.concatenate([images * (1.0 - mask), mask], axis=-1)


def encoded_inpaint_condition(mask: Array, masked_latents: Array, factor: int) -> Array:
    """Stable Diffusion's inpainting input (Rombach et al. 2022, §4.5; diffusers'
    StableDiffusionInpaintPipeline): the mask [B, H, W, 1] taken to the latent grid by nearest
    neighbour (each f × f block's top-left pixel, as torch's `interpolate` does), then the
    latents [B, H/f, W/f, z] of the image with the regenerated region blanked: 1 + z channels."""
    return jnp.concatenate([mask[:, ::factor, ::factor], masked_latents], axis=-1)


def fold(x: Array, factor: int) -> Array:
    """Space-to-depth: [B, H, W, C] → [B, H/f, W/f, f·f·C], each f × f block's pixels stacked on
    the channel axis (row-major within the block). A latent model's spatial condition reaches
    the latent grid this way: nothing is lost, and no encoder pass is needed."""
    if factor == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // factor, w // factor, factor * factor * c)


def random_masks(key: Array, batch: int, size: tuple[int, int]) -> Array:
    """[B, H, W, 1] training masks, 1 = regenerate: per example one of a box (¼ to ¾ of each
    side), a border band (one side, ⅛ to ½ of the image) or three brush strokes (thick segments
    between random points). Jit-able, one draw per key."""
    h, w = size
    kind_key, box_key, border_key, stroke_key = jax.random.split(key, 4)
    yy, xx = jnp.meshgrid(jnp.arange(h) + 0.5, jnp.arange(w) + 0.5, indexing="ij")
    kind = jax.random.randint(kind_key, (batch, 1, 1), 0, 3)

    u = jax.random.uniform(box_key, (4, batch, 1, 1))
    bh, bw = (0.25 + 0.5 * u[0]) * h, (0.25 + 0.5 * u[1]) * w
    top, left = u[2] * (h - bh), u[3] * (w - bw)
    box = (yy >= top) & (yy < top + bh) & (xx >= left) & (xx < left + bw)

    v = jax.random.uniform(border_key, (2, batch, 1, 1))
    side = jnp.floor(v[0] * 4)
    depth = (0.125 + 0.375 * v[1]) * jnp.where(side < 2, w, h)
    border = jnp.where(
        side == 0, xx < depth,
        jnp.where(side == 1, xx > w - depth, jnp.where(side == 2, yy < depth, yy > h - depth)),
    )  # fmt: skip

    p = jax.random.uniform(stroke_key, (3, 5, batch, 1, 1))
    strokes = jnp.zeros((batch, h, w), bool)
    for i in range(3):
        y0, x0, y1, x1 = p[i, 0] * h, p[i, 1] * w, p[i, 2] * h, p[i, 3] * w
        width = (0.06 + 0.1 * p[i, 4]) * min(h, w)
        dy, dx = y1 - y0, x1 - x0
        s = jnp.clip(((yy - y0) * dy + (xx - x0) * dx) / (dy * dy + dx * dx + 1e-6), 0.0, 1.0)
        dist = jnp.hypot(yy - (y0 + s * dy), xx - (x0 + s * dx))
        strokes = strokes | (dist < width)

    mask = jnp.where(kind == 0, box, jnp.where(kind == 1, border, strokes))
    return mask[..., None].astype(jnp.float32)
