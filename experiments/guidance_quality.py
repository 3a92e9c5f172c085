"""Class-conditional digits against the guidance scale w: the quality/diversity curve, one table.

    python -m diffjax.main --config configs/digits_class.py --workdir runs/digits_class
    python experiments/guidance_quality.py --workdir runs/digits_class

Draws `--per_class` samples of every class from the workdir's EMA parameters at each w (one
compiled sampler serves every w) and scores them with `diffjax.quality`'s classifier, which was
trained on real digits: accuracy (the classifier names the class that was asked for), the worst
class's accuracy, coverage and mean confidence, and FD against the real test split (at the same
N, beside real digits' own FD at that N). DDIM with 50 leading steps by default (`--sampler`,
`--steps`); w > 1 doubles the network's batch.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's configs/ package

from configs import digits_class  # noqa: E402
from diffjax import infer, quality, sharding  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default="", help="variant of configs/digits_class.py")
    p.add_argument("--scales", default="0,1,2,3,5,8", help="comma-separated guidance scales")
    p.add_argument("--per_class", type=int, default=50)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--spacing", default="leading")
    args = p.parse_args()

    config = digits_class.get_config(args.config or None)
    config.sampler.update(
        name=args.sampler, steps=args.steps, max_steps=args.steps, spacing=args.spacing, eta=0.0
    )
    config.sampler.batch_size = 10 * min(args.per_class, 10)
    setup, params, step = infer.load_ema(config, args.workdir)
    n = 10 * args.per_class
    print(f"workdir {args.workdir}, step {step}; {args.sampler} {args.steps} steps, N = {n}")
    print("| w | accuracy | worst class | coverage | confidence | FD | s |")
    print("|---|---|---|---|---|---|---|")
    for w in (float(x) for x in args.scales.split(",")):
        config.sampler.guidance_scale = w  # read at each call: no new compilation
        t0 = time.perf_counter()
        images = _draw(setup, params, n)
        took = time.perf_counter() - t0
        labels = np.arange(n) % 10
        predicted = quality.classifier().predict(quality.to_digit_grid(images))
        per_class = [np.mean(predicted[labels == c] == c) for c in range(10)]
        r = quality.digits_quality(images, config.data.image_size)
        print(
            f"| {w:g} | {np.mean(predicted == labels):.3f} | {min(per_class):.2f} | "
            f"{r['coverage']}/10 | {r['confidence']:.3f} | {r['fd']:.2f} | {took:.0f} |"
        )
    real = quality.digits_quality(quality.real_digits("test", config.data.image_size)[0][:n])
    print(
        f"| real test digits | | | {real['coverage']}/10 | {real['confidence']:.3f} | "
        f"{real['fd_real']:.2f} (train vs test) | |"
    )


def _draw(setup, params, n: int) -> np.ndarray:
    bs = setup.config.sampler.batch_size
    fn = setup.sample_fn(bs)
    out = []
    for b in range(n // bs):
        labels = np.arange(b * bs, (b + 1) * bs) % 10
        key = jax.random.fold_in(setup.sample_key, b)
        out.append(sharding.to_host(fn(params, key, setup.labels_cond(labels))))
    return np.concatenate(out)


if __name__ == "__main__":
    main()
