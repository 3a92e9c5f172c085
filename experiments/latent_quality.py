"""Latent against pixel diffusion on 32x32 digits: seconds per sample and sample quality.

    python -m diffjax.main --config configs/vae_digits.py --workdir runs/vae_digits
    python -m diffjax.main --config configs/digits_latent.py --workdir runs/digits_latent
    python -m diffjax.main --config configs/digits.py --workdir runs/digits32 \
        --config.data.image_size=32 --config.train.num_steps=N   # N: the same training time
    python experiments/latent_quality.py --latent runs/digits_latent --pixel runs/digits32

Both workdirs are sampled with the same sampler (DDIM, `--steps`, leading spacing, η = 0) at
batch `--batch`; the latent model's time includes decoding. Each run's training time is read
from its metrics.jsonl (the sum of the logged intervals' steps / rate). Quality is
`diffjax.quality.digits_quality` at N = `--num` (classifier confidence, coverage, class KL,
Fréchet distance of the classifier's features against the real test digits at 32x32).
Prints a markdown table.
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's configs/ package

from diffjax import infer, latent_setup, quality, sharding  # noqa: E402


def _train_seconds(workdir: str) -> tuple[int, float]:
    steps, seconds, last = 0, 0.0, 0
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        record = json.loads(line)
        if "train/steps_per_s" in record:
            n = record["step"] - last
            steps, seconds, last = (
                record["step"],
                seconds + n / record["train/steps_per_s"],
                record["step"],
            )
    return steps, seconds


def _sample(workdir: str, args) -> tuple[np.ndarray, float]:
    config = latent_setup.read_run_config(workdir)
    config.sampler.update(name="ddim", steps=args.steps, spacing="leading", eta=0.0,
                          batch_size=args.batch)  # fmt: skip
    setup, params, _ = infer.load_ema(config, workdir)
    fn = setup.sample_fn(args.batch)
    cond = setup.labels_cond(np.zeros(args.batch))
    jax.block_until_ready(setup.decode(fn(params, jax.random.key(99), cond)))  # compile
    out, t0 = [], time.perf_counter()
    for b in range(-(-args.num // args.batch)):
        x = setup.decode(fn(params, jax.random.fold_in(setup.sample_key, b), cond))
        out.append(sharding.to_host(x))
    seconds = time.perf_counter() - t0
    images = np.concatenate(out)[: args.num]
    return images, seconds / len(images)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", default="runs/digits_latent")
    parser.add_argument("--pixel", default="runs/digits32")
    parser.add_argument("--num", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    print("| model | trained | training time | steps/s | s per sample | confidence | coverage "
          "| class KL | FD |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, workdir in (("latent 8x8x4", args.latent), ("pixel 32x32", args.pixel)):
        steps, seconds = _train_seconds(workdir)
        images, per_sample = _sample(workdir, args)
        np.savez_compressed(
            os.path.join(workdir, "samples", f"study_ddim{args.steps}.npz"), images=images
        )
        q = quality.digits_quality(images, 32)
        print(f"| {name} | {steps} steps | {seconds / 60:.1f} min | {steps / seconds:.2f} | "
              f"{per_sample * 1e3:.1f} ms | {q['confidence']:.3f} | {q['coverage']:g}/10 | "
              f"{q['class_kl']:.3f} | {q['fd']:.2f} |")  # fmt: skip
    real = (q["confidence_real"], q["coverage_real"], q["class_kl_real"], q["fd_real"])
    print(f"| real digits ({args.num}) | | | | | {real[0]:.3f} | {real[1]:g}/10 | {real[2]:.3f} "
          f"| {real[3]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
