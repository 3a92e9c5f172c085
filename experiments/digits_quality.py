"""Scores sampled digits with diffjax.quality, beside real digits (and, optionally, bad ones).

    python experiments/digits_quality.py runs/digits/samples/step_0004000.npz
    python experiments/digits_quality.py samples.npz --image-size 16 --noise

Prints a markdown table: the samples, real digits at the same N (the best reachable: fd_real,
and the classifier's view of the real test split), and with --noise two floors at the same N,
uniform noise in [-1, 1] and real train digits blurred (Gaussian, sigma 1 px at 8x8 scale). The
image size defaults to the samples' side; the real digits go through `preprocess_image` at it.
A few seconds on one CPU core (the classifier is fitted once, ~1-2 s).
"""

import argparse

import numpy as np
from scipy.ndimage import gaussian_filter

from diffjax import quality

_BLUR_SIGMA = 1.0  # in 8x8 pixels; scaled with the image side
_SEED = 0  # the noise images and the blurred subsample


def _row(name: str, n: int, confidence, coverage, class_kl, fd) -> str:
    return f"| {name} | {n} | {confidence:.3f} | {coverage}/10 | {class_kl:.3f} | {fd:.3f} |"


def _result_row(name: str, result: dict) -> str:
    keys = ("confidence", "coverage", "class_kl", "fd")
    return _row(name, result["n"], *(result[key] for key in keys))


def _floors(n: int, image_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(_SEED)
    noise = rng.uniform(-1.0, 1.0, size=(n, image_size, image_size, 1))
    real, _ = quality.real_digits("train", image_size)
    picked = real[rng.choice(len(real), min(n, len(real)), replace=False)]
    sigma = _BLUR_SIGMA * image_size / quality.GRID
    blurred = gaussian_filter(picked, sigma=(0, sigma, sigma, 0))
    return {"uniform noise": noise, f"blurred real (sigma {_BLUR_SIGMA:g}px @8)": blurred}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", help=".npz from --mode=sample, key 'images' [N, H, H, 1].")
    parser.add_argument("--image-size", type=int, default=None, help="Default: the samples' H.")
    parser.add_argument("--noise", action="store_true", help="Add noise and blur floor rows.")
    args = parser.parse_args()

    with np.load(args.samples) as npz:
        samples = npz["images"]
    image_size = args.image_size or samples.shape[1]
    result = quality.digits_quality(samples, image_size)
    print(
        f"classifier test accuracy (8x8): {quality.classifier_accuracy():.4f}; "
        f"real digits through the {image_size}px path\n"
    )
    print("| images | N | confidence | coverage | class KL | FD |")
    print("|---|---|---|---|---|---|")
    print(_result_row(args.samples, result))
    print(
        _row(
            "real (test split; FD: train draws at N)",
            result["n"],
            result["confidence_real"],
            result["coverage_real"],
            result["class_kl_real"],
            result["fd_real"],
        )
    )
    if args.noise:
        for name, images in _floors(len(samples), image_size).items():
            print(_result_row(name, quality.digits_quality(images, image_size)))


if __name__ == "__main__":
    main()
