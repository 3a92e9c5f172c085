"""README figure of the edits on held-out digits: inpainting, img2img and outpainting.

    python experiments/edit_figure.py --workdir runs/digits_latent
    python experiments/edit_figure.py --trained runs/digits_latent_sr,runs/digits_latent_inpaint

Columns of 8 held-out 32x32 digits. Rows: the input; the mask (grey = regenerate); RePaint
with DDIM 50, r = 10, j = 5; the crude 4x4-block input; its SDEdit at strength 0.3; then the
digits outpainted 16 px to the right (32x48 canvases, shown on their own rows).
With `--trained SR_RUN,INPAINT_RUN` (a `spatial.kind` "upscale" and an "inpaint" run), the
figure of the trained edits instead (`trained_edits_digits.png`): the originals; their 8x8
low-res inputs (shown enlarged); bicubic; the SR model's output (DDIM 50); the masked input
(grey = regenerate); the trained inpainting model's completion (DDIM 50).
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffjax import image_io, latent_setup, quality, spatial  # noqa: E402
from diffjax.editor import Editor  # noqa: E402


def _editor(workdir):
    config = latent_setup.read_run_config(workdir)
    config.sampler.update(name="ddim", steps=50, spacing="leading", eta=0.0)
    return Editor.load(config, workdir)


def _save(full, path, scale=3):
    from PIL import Image

    Image.fromarray(full.repeat(scale, 0).repeat(scale, 1)[..., 0]).save(path)
    print(f"wrote {path}")


def trained_figure(sr_workdir, inpaint_workdir, images, mask, key, out):
    sr, filler = _editor(sr_workdir), _editor(inpaint_workdir)
    f = sr.setup.config.spatial.factor
    low = np.asarray(spatial.low_res(jnp.asarray(images), f))
    enlarged = np.repeat(np.repeat(low, f, 1), f, 2)
    bicubic = np.asarray(spatial.upsample(jnp.asarray(low), images.shape[1:3]))
    upscaled = sr.upscale(low, key)
    filled = filler.inpaint(images, mask, key, method="trained")
    masked = np.where(mask > 0, 0.3, images)
    rows = [images, enlarged, bicubic, upscaled, masked, filled]
    _save(image_io.make_grid(image_io.to_uint8(np.concatenate(rows)), ncol=8), out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/digits_latent")
    parser.add_argument("--trained", default="", help="SR_RUN,INPAINT_RUN: the trained edits")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    images = np.asarray(quality.real_digits("test", 32)[0][::37][:8])
    mask = np.zeros((8, 32, 32, 1), np.float32)
    mask[:, 16:] = 1
    key = jax.random.key(0)
    if args.trained:
        out = args.out or "experiments/results/trained_edits_digits.png"
        return trained_figure(*args.trained.split(","), images, mask, key, out)
    ed = _editor(args.workdir)
    filled = ed.inpaint(images, mask, key, resamplings=10, jump_length=5)
    blocky = np.repeat(np.repeat(images.reshape(8, 4, 8, 4, 8, 1).mean((2, 4)), 8, 1), 8, 2)
    edited = ed.img2img(blocky, 0.3, key)
    rows = [images, mask * 1.3 - 1, filled, blocky, edited]  # the mask grey on the white grid
    wide = [ed.outpaint(im, {"right": 16, "left": 0, "top": 0, "bottom": 0}, key) for im in images]
    wide = np.stack(wide)  # [8, 32, 48, 1]: two per row, padded to the 32-wide cells
    cells = np.concatenate(rows)
    grid = image_io.make_grid(image_io.to_uint8(cells), ncol=8)
    strips = image_io.make_grid(image_io.to_uint8(wide), ncol=4)
    width = max(grid.shape[1], strips.shape[1])
    pad = lambda g: np.pad(g, ((0, 0), (0, width - g.shape[1]), (0, 0)), constant_values=255)
    _save(
        np.concatenate([pad(grid), pad(strips)]), args.out or "experiments/results/edits_digits.png"
    )


if __name__ == "__main__":
    main()
