"""Edits on held-out digits: inpainting the lower half (RePaint settings) and an SDEdit sweep.

    python experiments/edit_quality.py --workdir runs/digits_latent [--num 296]
    python experiments/edit_quality.py --workdir runs/digits_latent_inpaint --method trained

The model is a trained digits run at 32x32 (pixel or latent, e.g. `configs/digits_latent.py`).
Inputs are the 296 held-out test digits at 32x32 (`quality.real_digits`).
- Inpainting: the lower half is regenerated (mask rows 16..31), the upper half kept. Per
  setting: how often the project's digits classifier gives the completion the original's class,
  its confidence, the Fréchet distance of the completions' features to the real test digits
  (beside real train digits' at the same N), network calls and seconds per image.
- SDEdit: blocky inputs (each digit averaged to 4x4 and enlarged by pixel repetition: a crude
  "stroke painting") edited at strengths 0 … 1 with DDIM 50: PSNR to the input (faithfulness),
  classifier confidence and FD (realism) and class agreement with the input's label.
With `--method trained` (a `spatial.kind="inpaint"` run, e.g. `configs/digits_latent.py:inpaint`)
the same inpainting rows are drawn by the trained model, without resampling, and the SDEdit
sweep is skipped. Prints markdown tables with the CPU's name.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments", "bench"))

from bench_text import _cpu_model  # noqa: E402

from diffjax import editing, latent_setup, quality, samplers  # noqa: E402
from diffjax.ae_losses import psnr  # noqa: E402
from diffjax.editor import Editor  # noqa: E402

INPAINT = (  # (sampler, steps, resamplings, jump length)
    ("ddim", 50, 1, 1),
    ("ddim", 50, 10, 5),
    ("ddpm", 250, 1, 1),
    ("ddpm", 250, 10, 10),
    ("ddpm", 1000, 1, 1),
)
TRAINED = (("ddim", 50, 1, 1), ("ddpm", 250, 1, 1), ("ddpm", 1000, 1, 1))


def _scores(out, labels):
    grid = quality.to_digit_grid(out)
    probs = quality.classifier().predict_proba(grid)
    _, test, _ = quality._reference(32)
    return {
        "agree": float(np.mean(probs.argmax(1) == labels)),
        "conf": float(probs.max(1).mean()),
        "fd": quality.feature_distance(quality.features(grid), test),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/digits_latent")
    parser.add_argument("--num", type=int, default=296)
    parser.add_argument("--skip", default="", help="comma list of inpainting rows to skip (0..)")
    parser.add_argument("--method", default="repaint", choices=("repaint", "trained"))
    args = parser.parse_args()
    config = latent_setup.read_run_config(args.workdir)
    ed = Editor.load(config, args.workdir)
    images, labels = quality.real_digits("test", 32)
    images, labels = np.asarray(images[: args.num]), labels[: args.num]
    n = len(images)
    mask = np.zeros((n, 32, 32, 1), np.float32)
    mask[:, 16:] = 1
    s = config.sampler
    print(f"\n{_cpu_model()}, jax {jax.__version__}, {jax.device_count()} device, {args.workdir}, "
          f"N = {n}\n")  # fmt: skip
    print("| inpainting (lower half) | network calls | class agrees | confidence | FD | s/image |")
    print("|---|---|---|---|---|---|")
    skip = {int(i) for i in args.skip.split(",") if i}
    method = args.method
    for row, (name, steps, r, j) in enumerate(TRAINED if method == "trained" else INPAINT):
        if row in skip:
            continue
        s.update(
            name=name, steps=steps, spacing="leading" if name == "ddim" else "uniform", eta=0.0
        )
        walk, moves = editing.repaint_table(samplers.timestep_table(1000, steps), steps, j, r)
        calls = editing.network_calls(walk, moves)
        kw = dict(method=method, jump_length=j, resamplings=r)
        ed.inpaint(images[:1], mask[:1], jax.random.key(0), **kw)  # compile
        t0 = time.perf_counter()
        out = ed.inpaint(images, mask, jax.random.key(1), **kw)
        dt = (time.perf_counter() - t0) / n
        q = _scores(out, labels)
        what = f"{name.upper()} {steps}" + (f", r = {r}, j = {j}" if r > 1 else ", no resampling")
        what = f"trained, {name.upper()} {steps}" if method == "trained" else what
        print(f"| {what} | {calls} | {q['agree']:.3f} | {q['conf']:.3f} | {q['fd']:.2f} "
              f"| {dt:.2f} |", flush=True)  # fmt: skip
    real = _scores(images, labels)
    print(f"| the held-out digits themselves | | {real['agree']:.3f} | {real['conf']:.3f} "
          f"| {real['fd']:.2f} | |")  # fmt: skip
    print(f"\n(real train digits at this N: FD {quality.real_distance(n, 32):.2f})\n")
    if method == "trained":
        return

    coarse = images.reshape(n, 4, 8, 4, 8, 1).mean(axis=(2, 4))  # 4x4 blocks of 8x8 pixels
    blocky = np.repeat(np.repeat(coarse, 8, 1), 8, 2)
    s.update(name="ddim", steps=50, spacing="leading", eta=0.0)
    print("| SDEdit strength | PSNR to the input (dB) | confidence | FD | class agrees |")
    print("|---|---|---|---|---|")
    for strength in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        out = ed.img2img(blocky, strength, jax.random.key(2))
        q = _scores(out, labels)
        p = float(np.mean(psnr(blocky, out)))
        print(f"| {strength:.1f} | {p:.2f} | {q['conf']:.3f} | {q['fd']:.2f} | {q['agree']:.3f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
