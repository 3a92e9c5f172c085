"""Super-resolution on held-out images: a trained SR model against bicubic upsampling.

    python experiments/sr_quality.py --workdir runs/sr_digits_latent [--num 296]

The workdir is a trained `spatial.kind="upscale"` run (pixel or latent: `configs/sr_digits.py`,
`configs/digits_latent.py:sr`, `configs/sr_photos.py`). The held-out images are the run's eval
split at its image size; the low-res inputs are made as in training (f × f box average). Per
method: PSNR and SSIM to the original, the consistency error (the output shrunk by f against the
low-res input: RMSE in 8-bit levels; SR3 reports the same as an MSE), and for digits the
classifier's agreement with the true class and the FD of the outputs' features to real test
digits (realism: bicubic is faithful on average but blurred). Prints a markdown table with
the CPU's name.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments", "bench"))

from bench_text import _cpu_model  # noqa: E402

from diffjax import build, latent_setup, quality, spatial  # noqa: E402
from diffjax.ae_losses import psnr, ssim  # noqa: E402
from diffjax.editor import Editor  # noqa: E402

SAMPLERS = (("ddim", 50, "leading"), ("ddpm", 250, "uniform"))


def _scores(out, images, low, factor, labels):
    r = {
        "psnr": float(np.mean(psnr(images, out))),
        "ssim": float(np.mean(ssim(images, out))),
        "consistency": float(
            np.sqrt(np.mean(np.square(np.asarray(spatial.low_res(jnp.asarray(out), factor)) - low)))
            * 127.5
        ),
    }
    if labels is not None:
        grid = quality.to_digit_grid(out)
        _, test, _ = quality._reference(images.shape[1])
        r["agree"] = float(np.mean(quality.classifier().predict(grid) == labels))
        r["fd"] = quality.feature_distance(quality.features(grid), test)
    return r


def _row(name, r, extra=""):
    digits = f" {r['agree']:.3f} | {r['fd']:.2f} |" if "agree" in r else ""
    return (f"| {name} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['consistency']:.2f} |{digits}"
            f"{extra}")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/sr_digits_latent")
    parser.add_argument("--num", type=int, default=296)
    args = parser.parse_args()
    config = latent_setup.read_run_config(args.workdir)
    ed = Editor.load(config, args.workdir)
    d, f = config.data, config.spatial.factor
    labels = None
    if d.name == "digits":
        images, labels = quality.real_digits("test", d.image_size)
        images, labels = np.asarray(images[: args.num]), np.asarray(labels[: args.num])
    else:
        source = build.open_split(config, d.eval_split)
        read = build.images_of(source, d.image_size, d.channels, resize=d.resize)
        images = read(0, min(args.num, len(source)))
    low = np.asarray(spatial.low_res(jnp.asarray(images), f))
    n, size = len(images), d.image_size
    print(f"\n{_cpu_model()}, jax {jax.__version__}, {jax.device_count()} device, {args.workdir}, "
          f"{d.name} {size // f}→{size}, N = {n}\n")  # fmt: skip
    head = "| method | PSNR (dB) | SSIM | consistency RMSE (8-bit) |"
    head += " class agrees | FD |" if labels is not None else ""
    print(head + " s/image |")
    print("|---" * (head.count("|") - 1 + 1) + "|")
    bicubic = np.asarray(spatial.upsample(jnp.asarray(low), (size, size)))
    print(_row("bicubic (the model's condition)", _scores(bicubic, images, low, f, labels), " |"))
    for name, steps, spacing in SAMPLERS:
        config.sampler.update(name=name, steps=steps, spacing=spacing, eta=0.0)
        ed.upscale(low[:1], jax.random.key(0))  # compile
        t0 = time.perf_counter()
        out = ed.upscale(low, jax.random.key(1))
        dt = (time.perf_counter() - t0) / n
        r = _scores(out, images, low, f, labels)
        print(_row(f"SR, {name.upper()} {steps}", r, f" {dt:.3f} |"), flush=True)
    if labels is not None:
        real = _scores(images, images, low, f, labels)
        print(_row("the held-out originals", real, " |"))


if __name__ == "__main__":
    main()
