"""Conditional digits against the guidance scale w: does the model draw the digit asked for?

    python -m diffjax.main --config configs/digits_class.py --workdir runs/digits_class
    python experiments/guidance_quality.py --workdir runs/digits_class
    python experiments/guidance_quality.py --config configs/digits_text.py:minilm --workdir W

Draws `--per_class` samples of every class from the workdir's EMA parameters at each w (one
compiled sampler serves every w) and scores them with `diffjax.quality`'s classifier, which was
trained on real digits: accuracy (the classifier names the class that was asked for), the worst
class's accuracy, coverage and mean confidence, and FD against the real test split (at the same
N; real digits' own train-vs-test FD at that N is the last row). A class-conditional model is
asked by label; a text model by prompt, once with the training phrasings and once with the
held-out ones (`diffjax.data.captions`), the samples spread evenly over the phrasings. DDIM with
50 leading steps by default (`--sampler`, `--steps`); w ≠ 0, 1 doubles the network's batch.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's configs/ package

from diffjax import cli, infer, quality, sharding  # noqa: E402
from diffjax.data import captions  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "digits_class.py"))
    p.add_argument("--scales", default="0,1,2,3,5,8", help="comma-separated guidance scales")
    p.add_argument("--per_class", type=int, default=50)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--spacing", default="leading")
    args = p.parse_args()

    cli.add_config_root([f"--config={args.config}"])
    config = cli.load_config_file(args.config)
    config.sampler.update(
        name=args.sampler, steps=args.steps, max_steps=args.steps, spacing=args.spacing, eta=0.0
    )
    config.sampler.batch_size = 100
    setup, params, step = infer.load_ema(config, args.workdir)
    n = 10 * args.per_class
    print(f"{args.config} at step {step}; {args.sampler} {args.steps} steps, N = {n} per row")
    sets = {"labels": None}
    if setup.conditioner.text:
        setup.load_text(args.workdir)
        sets = {"train phrasings": captions.TRAIN_PHRASINGS}
        sets["held-out phrasings"] = captions.HELD_OUT_PHRASINGS
    print("| asked by | w | accuracy | worst class | coverage | confidence | FD | s |")
    print("|---|---|---|---|---|---|---|---|")
    labels = np.arange(n) % 10
    for name, phrasings in sets.items():
        prompts = None
        if phrasings is not None:
            prompts = [
                captions.digit_caption(c, phrasings[i // 10 % len(phrasings)])
                for i, c in enumerate(labels)
            ]
        for w in (float(x) for x in args.scales.split(",")):
            config.sampler.guidance_scale = w  # read at each call: no new compilation
            t0 = time.perf_counter()
            images = _draw(setup, params, labels, prompts)
            took = time.perf_counter() - t0
            predicted = quality.classifier().predict(quality.to_digit_grid(images))
            per_class = [np.mean(predicted[labels == c] == c) for c in range(10)]
            r = quality.digits_quality(images, config.data.image_size)
            print(
                f"| {name} | {w:g} | {np.mean(predicted == labels):.3f} | "
                f"{min(per_class):.2f} | {r['coverage']}/10 | {r['confidence']:.3f} | "
                f"{r['fd']:.2f} | {took:.0f} |"
            )
    print(f"| real digits (train vs test) | | | | | | {r['fd_real']:.2f} | |")


def _draw(setup, params, labels: np.ndarray, prompts: list[str] | None) -> np.ndarray:
    bs = setup.config.sampler.batch_size
    fn = setup.sample_fn(bs)
    null = infer.null_cond(setup, bs, None) if prompts is not None else None
    out = []
    for b in range(len(labels) // bs):
        part = slice(b * bs, (b + 1) * bs)
        if prompts is None:
            c = setup.labels_cond(labels[part])
        else:
            c = setup.prompt_cond(setup.text_side, prompts[part])
        key = jax.random.fold_in(setup.sample_key, b)
        out.append(sharding.to_host(fn(params, key, c, null)))
    return np.concatenate(out)


if __name__ == "__main__":
    main()
