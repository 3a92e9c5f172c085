"""Handwritten → printed digits with DDIB: does the class survive, does it look printed?

    python -m diffjax.main --config configs/digits.py --workdir runs/digits
    python -m diffjax.main --config configs/printed_digits.py --workdir runs/printed_digits
    python experiments/ddib_digits.py --source runs/digits --target runs/printed_digits

The 296 held-out handwritten digits (16x16) are DDIM-inverted under the handwritten model and
DDIM-sampled under the printed one (`Editor.transfer`, `--steps` each way). With
class-conditional models on both sides (configs/digits_class.py, configs/printed_digits_class.py)
`--label=auto` inverts and samples each digit under the class that the handwritten model reads
in it (`Editor.classify`, the diffusion classifier; its accuracy is printed too), and
`--label=true` under the true class (an oracle, for comparison). Judged at 8x8 by
two classifiers fitted here on the train splits (scikit-learn): a digit classifier on both
domains (is the class preserved?) and a handwritten-vs-printed one (does it look printed?), each
beside its score on the real test images. `--grid`: a PNG, each input beside its output.
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

from diffjax import image_io, latent_setup, quality  # noqa: E402
from diffjax.data import digits as digits_lib  # noqa: E402
from diffjax.data import printed_digits  # noqa: E402
from diffjax.data.pipeline import preprocess_image  # noqa: E402
from diffjax.editor import CLASSIFY_TRIALS, Editor  # noqa: E402


def _printed(split: str, size: int, resize: str = "bicubic"):
    images, labels = printed_digits.render_splits()[split]
    stored = digits_lib.to_uint8(images)[..., None]
    return np.stack([preprocess_image(im, size, 1, resize) for im in stored]), labels


def _classifiers():
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    hand, hand_y = quality.real_digits("train", 8)
    printed, printed_y = _printed("train", 8)
    x = np.concatenate([quality.to_digit_grid(hand), quality.to_digit_grid(printed)])
    digit = MLPClassifier((64,), max_iter=800, random_state=0).fit(
        x, np.concatenate([hand_y, printed_y])
    )
    domain = LogisticRegression(max_iter=2000).fit(
        x, np.r_[np.zeros(len(hand)), np.ones(len(printed))]
    )
    return digit, domain


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="runs/digits")
    parser.add_argument("--target", default="runs/printed_digits")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--grid", default="")
    parser.add_argument(
        "--label", default="none", choices=("none", "auto", "true"),
        help="class-conditional models: invert and sample under the class read from each input "
        "(auto) or its true class (true)",
    )  # fmt: skip
    parser.add_argument("--trials", type=int, default=CLASSIFY_TRIALS, help="auto: (t, ε) draws")
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="the transfer's CFG scale w, both ways (default: the source config's)",
    )
    args = parser.parse_args()
    src_cfg = latent_setup.read_run_config(args.source)
    src_cfg.sampler.update(steps=args.steps, spacing="leading")
    source = Editor.load(src_cfg, args.source)
    tgt_cfg = latent_setup.read_run_config(args.target)
    if args.guidance is not None:
        src_cfg.sampler.guidance_scale = args.guidance
    target = Editor.load(tgt_cfg, args.target)
    size = source.image_size[0]
    resize = src_cfg.data.resize  # the inputs as the source model saw digits
    hand, labels = quality.real_digits("test", size, resize)
    hand = np.asarray(hand)
    label, read = None, ""
    if args.label != "none":
        source.classify(hand[:1], trials=args.trials)  # compile
        t0 = time.perf_counter()
        found, _ = source.classify(hand, trials=args.trials)
        secs = (time.perf_counter() - t0) / len(hand)
        read = (f"; the handwritten model read {np.mean(found == labels):.1%} of the classes "
                f"right ({args.trials} trials, {secs * 1e3:.0f} ms per image)")  # fmt: skip
        label = found if args.label == "auto" else labels
    source.transfer(
        hand[:1], target, strength=args.strength, label=label[:1] if label is not None else None
    )  # compile
    t0 = time.perf_counter()
    out = source.transfer(hand, target, strength=args.strength, label=label)
    per_image = (time.perf_counter() - t0) / len(hand)
    digit, domain = _classifiers()
    printed_test, printed_y = _printed("test", size, resize)
    rows = {
        "transferred (handwritten → printed)": (out, labels),
        "real handwritten test digits": (hand, labels),
        "real printed test digits": (printed_test, printed_y),
    }
    print(f"\n{_cpu_model()}, jax {jax.__version__}, DDIM {args.steps} each way, strength "
          f"{args.strength}, "
          f"{per_image * 1e3:.0f} ms per image, labels: {args.label}{read}\n")  # fmt: skip
    print("| images | class (both-domain classifier) | judged printed |")
    print("|---|---|---|")
    for name, (images, y) in rows.items():
        grid = quality.to_digit_grid(images)
        agree = float(np.mean(digit.predict(grid) == y))
        printed = float(np.mean(domain.predict(grid)))
        print(f"| {name} | {agree:.3f} | {printed:.3f} |")
    if args.grid:
        pairs = np.stack([hand[:16], out[:16]], 1).reshape(-1, *hand.shape[1:])
        image_io.save_grid(pairs, args.grid, ncol=8)
        print(f"\nwrote {args.grid}")


if __name__ == "__main__":
    main()
