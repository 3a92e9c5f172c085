"""Sample quality of generated digits, judged by a scikit-learn MLP trained on real digits."""

import functools

import numpy as np

from diffjax.data import digits as digits_lib
from diffjax.data.pipeline import preprocess_image

NUM_CLASSES = 10
GRID = 8  # the classifier reads digits at scikit-learn's native 8x8
HIDDEN_LAYERS = (128, 64)  # the last hidden layer's activations are the Fréchet features
MAX_ITER = 300  # Adam epochs; it stops converged after 153, ~1 s on one core
SEED = 0  # the classifier's initialisation and batch order, and the real reference subsamples
MIN_SHARE = 0.02  # a class is covered when at least this share of the samples is labelled with it
REAL_DRAWS = 5  # fd_real averages this many train subsamples, so the reference is not one draw


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    return digits_lib.load_raw()


@functools.cache
def real_digits(
    split: str, image_size: int, resize: str = "bicubic"
) -> tuple[np.ndarray, np.ndarray]:
    """Real digits exactly as the model saw them: stored uint8, then `preprocess_image`.

    Args:
      split: 'train' or 'test' (`diffjax.data.digits.split_indices`).
      image_size: side S the model was trained at (8: the stored pixels; 16: upsampled).
      resize: the model's `data.resize` filter (bicubic by default; nearest: exact 2x2 blocks).

    Returns:
      images float32 [N, S, S, 1] in [-1, 1] and labels int [N], both read-only (cached).
    """
    images, labels = _raw()
    indices = digits_lib.split_indices(labels)[split]
    stored = digits_lib.to_uint8(images[indices])[..., None]
    out = np.stack([preprocess_image(image, image_size, 1, resize) for image in stored])
    out.setflags(write=False)
    return out, labels[indices]


def to_digit_grid(images: np.ndarray) -> np.ndarray:
    """Maps samples to the classifier's input: clip, area-average to 8x8, scale to [0, 1].

    A 16px real digit comes back close to, not exactly, its 8px original (bicubic up, then 2x2
    mean down), so compare samples with real digits sent through the same path (`real_digits`).

    Args:
      images: [N, H, H, 1] in [-1, 1], H a multiple of 8. Values outside are clipped first.

    Returns:
      float64 [N, 64] in [0, 1].
    """
    images = np.asarray(images, np.float64)
    if images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be [N, H, H, 1], got {images.shape}.")
    n, height = images.shape[:2]
    if height % GRID:
        raise ValueError(f"image side {height} is not a multiple of {GRID}.")
    factor = height // GRID
    clipped = np.clip(images[..., 0], -1.0, 1.0)
    grid = clipped.reshape(n, GRID, factor, GRID, factor).mean(axis=(2, 4))
    return ((grid + 1.0) / 2.0).reshape(n, GRID * GRID)


@functools.lru_cache(maxsize=1)
def classifier():
    """The MLP (ReLU) fitted to the real train split at 8x8, once per process (deterministic).

    Returns:
      A fitted `sklearn.neural_network.MLPClassifier`.
    """
    from sklearn.neural_network import MLPClassifier  # slow import; only needed here
    from threadpoolctl import threadpool_limits

    images, labels = real_digits("train", GRID)
    model = MLPClassifier(HIDDEN_LAYERS, max_iter=MAX_ITER, random_state=SEED)
    # The matrices are tiny: threaded BLAS only adds contention (12-30 s, not ~1 s, on 2 cores).
    with threadpool_limits(limits=1, user_api="blas"):
        return model.fit(to_digit_grid(images), labels)


def classifier_accuracy() -> float:
    """The classifier's accuracy on the real test split at 8x8 (~0.97)."""
    images, labels = real_digits("test", GRID)
    return float(classifier().score(to_digit_grid(images), labels))


def features(grid: np.ndarray) -> np.ndarray:
    """The classifier's last hidden-layer activations, ReLU(... ReLU(x W1 + b1) ... Wk + bk).

    Args:
      grid: [N, 64] from `to_digit_grid`.

    Returns:
      [N, HIDDEN_LAYERS[-1]].
    """
    model = classifier()
    hidden = grid
    for weights, bias in zip(model.coefs_[:-1], model.intercepts_[:-1], strict=True):
        hidden = np.maximum(hidden @ weights + bias, 0.0)
    return hidden


def gaussian_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of the rows of x [N, D]."""
    x = np.asarray(x, np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; rounding's tiny negative eigenvalues → 0."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ||mu1 - mu2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) (Dowson & Landau 1982; Heusel et al. 2017, FID).
    Tr (Σ1 Σ2)^½ = Tr (√Σ1 Σ2 √Σ1)^½, the sum of square roots of a symmetric PSD matrix's
    eigenvalues, which stays real and stable for singular covariances (N ≤ D).

    Args:
      mu1, mu2: [D] means.
      sigma1, sigma2: [D, D] symmetric PSD covariances.

    Returns:
      The distance, ≥ 0 up to rounding.
    """
    root1 = _psd_sqrt(np.asarray(sigma1, np.float64))
    cross = np.linalg.eigvalsh(root1 @ np.asarray(sigma2, np.float64) @ root1)
    trace_root = np.sqrt(np.clip(cross, 0.0, None)).sum()
    mean_term = np.sum((np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)) ** 2)
    return float(mean_term + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def feature_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]."""
    return frechet_distance(*gaussian_fit(a), *gaussian_fit(b))


def class_balanced_distance(
    a: np.ndarray, labels_a: np.ndarray, b: np.ndarray, labels_b: np.ndarray
) -> float:
    """Fréchet distance of a [N, D] to b [M, D] with a's rows reweighted to b's class shares.

    Splits a sample set's FD into how its images look within their classes and how its classes
    are balanced: a row of a with label k weighs share_b(k) / share_a(k), so a set that draws a
    class too often or too rarely scores as if it had drawn b's shares (labels absent from a add
    nothing; the rest renormalise). The weighted covariance is the unbiased reliability-weighted
    one (`np.cov(aweights=...)`); equal weights give `feature_distance` exactly.

    Args:
      a, labels_a: [N, D] features and their [N] integer labels (for samples: the classifier's).
      b, labels_b: [M, D] reference features and their [M] labels.

    Returns:
      The distance, ≥ 0 up to rounding.
    """
    num = int(max(np.max(labels_a), np.max(labels_b))) + 1
    share_a = np.bincount(labels_a, minlength=num) / len(labels_a)
    share_b = np.bincount(labels_b, minlength=num) / len(labels_b)
    weights = (share_b / np.where(share_a > 0, share_a, 1.0))[labels_a]
    a = np.asarray(a, np.float64)
    mean = np.average(a, axis=0, weights=weights)
    cov = np.cov(a, rowvar=False, aweights=weights).reshape(a.shape[1], a.shape[1])
    return frechet_distance(mean, cov, *gaussian_fit(b))


def label_stats(grid: np.ndarray) -> dict:
    """The classifier's view of a set of digits.

    Args:
      grid: [N, 64] from `to_digit_grid`.

    Returns:
      {'confidence': mean max class probability, 'coverage': classes with ≥ MIN_SHARE of the
      predicted labels (0..10), 'class_kl': KL(label histogram ‖ uniform) in nats, 0..log 10}.
    """
    return _stats_of(classifier().predict_proba(grid))


def _stats_of(probs: np.ndarray) -> dict:
    share = np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES) / len(probs)
    seen = share[share > 0]
    return {
        "confidence": float(probs.max(axis=1).mean()),
        "coverage": int(np.sum(share >= MIN_SHARE)),
        "class_kl": float(np.sum(seen * np.log(seen * NUM_CLASSES))),
    }


@functools.cache
def _reference(image_size: int, resize: str = "bicubic") -> tuple[np.ndarray, np.ndarray, dict]:
    """Train features, test features and test label stats of real digits at image_size."""
    train = to_digit_grid(real_digits("train", image_size, resize)[0])
    test = to_digit_grid(real_digits("test", image_size, resize)[0])
    return features(train), features(test), label_stats(test)


def real_distance(n: int, image_size: int, resize: str = "bicubic") -> float:
    """Mean FD of REAL_DRAWS real train subsamples of size n vs the real test split.

    FD is biased upwards by roughly O(D / n), so this is the value a perfect model reaches at n.

    Args:
      n: subsample size; capped at the train split's size (1501).
      image_size: side the real digits go through (see `real_digits`).

    Returns:
      The mean Fréchet distance.
    """
    train, test, _ = _reference(image_size, resize)
    draws = [train[idx] for idx in _train_picks(len(train), n, REAL_DRAWS)]
    return float(np.mean([feature_distance(draw, test) for draw in draws]))


def real_draw_scores(
    n: int, image_size: int, resize: str = "bicubic", draws: int = REAL_DRAWS
) -> list[dict]:
    """Real train digits scored exactly like a model's samples, `draws` subsamples of size n.

    What a perfect model's draws of n would score, draw by draw: at N = 512 the FD of real
    digits themselves moves by a few tenths from one draw to the next, so a single model draw
    is judged against this spread, not against its mean alone.

    Args:
      n: subsample size; capped at the train split's size (1501).
      image_size: side the real digits go through (see `real_digits`).
      resize: that path's filter.
      draws: how many subsamples (seeded by SEED, so the same on every call).

    Returns:
      [draws] dicts with the sample keys of `digits_quality` ('n', 'confidence', 'coverage',
      'class_kl', 'fd', 'fd_balanced').
    """
    images = real_digits("train", image_size, resize)[0]
    picks = _train_picks(len(images), n, draws)
    return [_sample_scores(to_digit_grid(images[idx]), image_size, resize) for idx in picks]


def nearest_real(samples: np.ndarray, image_size: int | None = None, resize: str = "bicubic"):
    """How close samples sit to the digits a model trained on, against held-out ones.

    Each sample's L2 distance on the 8x8 grid in [0, 1] (`to_digit_grid`) to its nearest real
    digit, averaged over the samples: to the test split, and to random train subsets of the
    test split's size (the nearest distance shrinks as the reference grows, so only equal sizes
    compare). A model that copies its training images sits closer to the train digits than to
    the test digits; one that generalizes sits as close to both.

    Args:
      samples: [N, H, H, 1] in [-1, 1], as for `digits_quality`.
      image_size: size the model was trained at (default: H).
      resize: the model's `data.resize`.

    Returns:
      {'to_test': mean nearest distance to the test digits, 'to_train': the same to a train
      subset of equal size, averaged over REAL_DRAWS subsets, 'gap': to_test - to_train}.
    """
    image_size = np.shape(samples)[1] if image_size is None else image_size
    grid = to_digit_grid(samples)
    test = to_digit_grid(real_digits("test", image_size, resize)[0])
    train = to_digit_grid(real_digits("train", image_size, resize)[0])
    subsets = [train[idx] for idx in _train_picks(len(train), len(test), REAL_DRAWS)]
    to_test = float(_nearest(grid, test).mean())
    to_train = float(np.mean([_nearest(grid, subset).mean() for subset in subsets]))
    return {"to_test": to_test, "to_train": to_train, "gap": to_test - to_train}


def _train_picks(total: int, n: int, draws: int) -> list[np.ndarray]:
    """The seeded train subsamples every real reference uses: `draws` index sets of
    min(n, total) of range(total), without replacement, the same on every call."""
    rng = np.random.default_rng(SEED)
    return [rng.choice(total, min(n, total), replace=False) for _ in range(draws)]


def _nearest(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N] L2 distance of each row of a [N, D] to its nearest row of b [M, D]."""
    squared = (a**2).sum(1)[:, None] - 2.0 * a @ b.T + (b**2).sum(1)[None, :]
    return np.sqrt(np.clip(squared.min(axis=1), 0.0, None))


def _sample_scores(grid: np.ndarray, image_size: int, resize: str) -> dict:
    """The sample side of `digits_quality` for grid [N, 64]."""
    _, test, _ = _reference(image_size, resize)
    feats, probs = features(grid), classifier().predict_proba(grid)
    return {
        "n": len(grid),
        **_stats_of(probs),
        "fd": feature_distance(feats, test),
        "fd_balanced": class_balanced_distance(
            feats, probs.argmax(axis=1), test, real_digits("test", image_size, resize)[1]
        ),
    }


def digits_quality(
    samples: np.ndarray, image_size: int | None = None, resize: str = "bicubic"
) -> dict:
    """Scores generated digits against the real test split, beside real data's own score.

    Args:
      samples: [N, H, H, 1] in [-1, 1], H a multiple of 8 (the .npz 'images' of --mode=sample).
      image_size: size the model was trained at; the real reference goes through
        `preprocess_image` at this size. Default: H.
      resize: the filter of that path, the model's `data.resize`.

    Returns:
      {'n', 'confidence', 'coverage', 'class_kl' (see `label_stats`), 'fd': FD of the samples'
      features vs real test features, 'fd_balanced': the same with the samples reweighted to
      the test split's class shares by their predicted labels (`class_balanced_distance`: FD
      less the part that class balance makes), 'fd_real': the same for real train digits at equal n
      (`real_distance`), 'confidence_real', 'coverage_real', 'class_kl_real': real test digits}.
    """
    image_size = np.shape(samples)[1] if image_size is None else image_size
    grid = to_digit_grid(samples)
    real_stats = _reference(image_size, resize)[2]
    return {
        **_sample_scores(grid, image_size, resize),
        "fd_real": real_distance(len(grid), image_size, resize),
        **{f"{key}_real": value for key, value in real_stats.items()},
    }
