"""README figure of the edits on held-out digits: inpainting, img2img and outpainting.

    python experiments/edit_figure.py --workdir runs/digits_latent

Columns of 8 held-out 32x32 digits. Rows: the input; the mask (grey = regenerate); RePaint
with DDIM 50, r = 10, j = 5; the crude 4x4-block input; its SDEdit at strength 0.3; then the
digits outpainted 16 px to the right (32x48 canvases, shown on their own rows).
"""

import argparse
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffjax import image_io, latent_setup, quality  # noqa: E402
from diffjax.editor import Editor  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/digits_latent")
    parser.add_argument("--out", default="experiments/results/edits_digits.png")
    args = parser.parse_args()
    config = latent_setup.read_run_config(args.workdir)
    config.sampler.update(name="ddim", steps=50, spacing="leading", eta=0.0)
    ed = Editor.load(config, args.workdir)
    images = np.asarray(quality.real_digits("test", 32)[0][::37][:8])
    mask = np.zeros((8, 32, 32, 1), np.float32)
    mask[:, 16:] = 1
    key = jax.random.key(0)
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
    full = np.concatenate([pad(grid), pad(strips)])
    scale = 3
    full = full.repeat(scale, 0).repeat(scale, 1)
    from PIL import Image

    Image.fromarray(full[..., 0]).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
