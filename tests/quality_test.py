"""Tests for diffjax.quality: Fréchet distance vs closed forms, the classifier, real vs noise."""

import numpy as np
import pytest
import scipy.linalg

from diffjax import quality

MU1, MU2 = np.array([0.0, 0.0, 0.0]), np.array([1.0, 0.0, -0.5])
SIGMA1 = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]])
SIGMA2 = np.array([[1.0, -0.4, 0.2], [-0.4, 1.5, 0.0], [0.2, 0.0, 0.8]])  # does not commute


def test_frechet_distance_diagonal_closed_form():
    """Diagonal covariances: FD = ||mu1 - mu2||² + Σ (√a - √b)²."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    actual = quality.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(actual, expected, rtol=1e-12)


def test_frechet_distance_matches_sqrtm_for_non_commuting_covariances():
    """Against the textbook form with scipy's general matrix square root of Σ1 Σ2."""
    cross = scipy.linalg.sqrtm(SIGMA1 @ SIGMA2).real
    expected = np.sum((MU1 - MU2) ** 2) + np.trace(SIGMA1 + SIGMA2 - 2 * cross)
    np.testing.assert_allclose(
        quality.frechet_distance(MU1, SIGMA1, MU2, SIGMA2), expected, rtol=1e-12
    )
    np.testing.assert_allclose(
        quality.frechet_distance(MU2, SIGMA2, MU1, SIGMA1), expected, rtol=1e-12
    )


def test_frechet_distance_is_zero_for_equal_singular_gaussians():
    """Rank-deficient covariances (fewer samples than features) stay real and give FD ≈ 0."""
    x = np.random.default_rng(1).normal(size=(10, 30))
    mu, sigma = quality.gaussian_fit(x)
    assert abs(quality.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_feature_distance_of_samples_converges_to_closed_form():
    """Fitted to N draws from each Gaussian, FD is within 5 standard errors of the exact value.

    The error is dominated by the mean term: m1 - m2 ~ N(mu1 - mu2, (Σ1 + Σ2) / N), so
    ||m1 - m2||² has std ≈ 2 sqrt(δᵀ(Σ1 + Σ2)δ / N) (delta method) and bias tr(Σ1 + Σ2) / N.
    Over 50 seeds the estimate's std was 0.0161 vs 0.0158 from this formula (FD = 1.93).
    """
    n = 50_000
    rng = np.random.default_rng(2)
    a, b = rng.multivariate_normal(MU1, SIGMA1, n), rng.multivariate_normal(MU2, SIGMA2, n)
    delta = MU1 - MU2
    std = 2 * np.sqrt(delta @ (SIGMA1 + SIGMA2) @ delta / n)
    bias = np.trace(SIGMA1 + SIGMA2) / n
    exact = quality.frechet_distance(MU1, SIGMA1, MU2, SIGMA2)
    assert abs(quality.feature_distance(a, b) - exact - bias) < 5 * std


def test_class_balanced_distance_removes_the_class_balance_part():
    """Two classes N(m_k, I) in 3-d: a draws them 80/20, the reference b 50/50.

    Plain FD reaches the closed form of the two mixtures' moments (mean p m0 + (1 - p) m1,
    covariance I + p (1 - p) δδᵀ); reweighted to b's shares, a is b's mixture, so the distance
    falls to the estimator's bias, ~tr(Σ_a + Σ_b) / N.
    """
    rng = np.random.default_rng(7)
    m = np.array([[3.0, 0.0, 0.0], [-1.0, 1.0, 0.5]])
    delta = m[0] - m[1]

    def draw(p0, n):
        labels = (rng.uniform(size=n) >= p0).astype(int)
        return m[labels] + rng.standard_normal((n, 3)), labels

    def moments(p0):
        return p0 * m[0] + (1 - p0) * m[1], np.eye(3) + p0 * (1 - p0) * np.outer(delta, delta)

    n = 200_000
    a, labels_a = draw(0.8, n)
    b, labels_b = draw(0.5, n)
    exact = quality.frechet_distance(*moments(0.8), *moments(0.5))
    assert exact > 1.0
    assert quality.feature_distance(a, b) == pytest.approx(exact, rel=0.02)
    assert quality.class_balanced_distance(a, labels_a, b, labels_b) < 1e-3  # bias ~1e-4


def test_class_balanced_distance_equals_fd_when_shares_already_match():
    """Equal shares give every row weight 1: the weighted fit is the plain one."""
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((300, 4)), rng.standard_normal((150, 4)) + 0.3
    labels_a, labels_b = np.arange(300) % 3, np.arange(150) % 3
    got = quality.class_balanced_distance(a, labels_a, b, labels_b)
    assert got == pytest.approx(quality.feature_distance(a, b), rel=1e-10)
    assert got > 0.2


def test_to_digit_grid_inverts_nearest_upsampling_and_clips():
    """A 16px image made by repeating 8x8 pixels averages back exactly; [-1, 1] maps to [0, 1]."""
    small = np.random.default_rng(3).uniform(-1, 1, size=(4, 8, 8, 1))
    big = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(quality.to_digit_grid(big), (small.reshape(4, 64) + 1) / 2)
    overshoot = np.full((1, 8, 8, 1), 3.0)
    np.testing.assert_array_equal(quality.to_digit_grid(overshoot), np.ones((1, 64)))
    with pytest.raises(ValueError, match="multiple of 8"):
        quality.to_digit_grid(np.zeros((1, 12, 12, 1)))


def test_classifier_accuracy_on_real_test_split():
    assert quality.classifier_accuracy() >= 0.95


def test_real_test_digits_through_16px_path_score_like_real_data():
    """The test split itself: confident, all classes, and FD ≈ 0 (same path as the reference)."""
    images, _ = quality.real_digits("test", 16)
    result = quality.digits_quality(images)
    assert result["confidence"] > 0.9 and result["coverage"] == 10
    assert result["class_kl"] < 0.01
    assert abs(result["fd"]) < 1e-4 * result["fd_real"]


def test_other_real_digits_score_fd_close_to_fd_real():
    """256 real train digits (not the reference's draws) land near the real reference at 256."""
    images, _ = quality.real_digits("train", 16)
    subset = images[np.random.default_rng(4).choice(len(images), 256, replace=False)]
    result = quality.digits_quality(subset)
    assert result["coverage"] == 10
    assert 0.5 * result["fd_real"] < result["fd"] < 2 * result["fd_real"]


@pytest.mark.parametrize("image_size", [8, 16])
def test_uniform_noise_scores_clearly_worse(image_size):
    noise = np.random.default_rng(5).uniform(-1, 1, size=(256, image_size, image_size, 1))
    result = quality.digits_quality(noise, image_size)
    assert result["fd"] > 10 * result["fd_real"]
    assert result["coverage"] <= 7 or result["confidence"] < result["confidence_real"] - 0.1


def test_features_feed_the_output_layer_to_the_classifier_probabilities():
    """softmax(features @ W_out + b_out) is the classifier's own predict_proba: same activations."""
    model = quality.classifier()
    grid = quality.to_digit_grid(quality.real_digits("test", 16)[0])
    logits = quality.features(grid) @ model.coefs_[-1] + model.intercepts_[-1]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, model.predict_proba(grid), atol=1e-10)


def test_real_draw_scores_are_real_digits_scored_like_samples():
    """The first REAL_DRAWS draws are real_distance's own subsamples; the whole split is one set."""
    draws = quality.real_draw_scores(256, 16, draws=quality.REAL_DRAWS + 2)
    fds = [d["fd"] for d in draws]
    assert len(draws) == quality.REAL_DRAWS + 2 and np.std(fds) > 0
    assert np.isclose(np.mean(fds[: quality.REAL_DRAWS]), quality.real_distance(256, 16))
    assert all(d["coverage"] == 10 and d["confidence"] > 0.95 for d in draws)
    whole = quality.real_draw_scores(5000, 16, draws=2)
    train, _ = quality.real_digits("train", 16)
    test, _ = quality.real_digits("test", 16)
    direct = quality.feature_distance(
        quality.features(quality.to_digit_grid(train)),
        quality.features(quality.to_digit_grid(test)),
    )
    assert whole[0]["n"] == whole[1]["n"] == len(train)  # the same set, in another order
    for key in ("confidence", "class_kl", "fd", "fd_balanced"):
        assert np.isclose(whole[0][key], whole[1][key], rtol=1e-5)
    assert np.isclose(whole[0]["fd"], direct)


def test_nearest_distances_match_brute_force():
    rng = np.random.default_rng(6)
    a, b = rng.uniform(size=(7, 64)), rng.uniform(size=(11, 64))
    brute = [min(np.linalg.norm(x - y) for y in b) for x in a]
    np.testing.assert_allclose(quality._nearest(a, b), brute, rtol=1e-9)


def test_nearest_real_of_slightly_faded_test_digits():
    """Test digits pulled 2% towards grey sit 0.02·‖g − ½‖ from themselves, their nearest test
    digit; train digits of the same number are farther away, so the gap is negative."""
    images, _ = quality.real_digits("test", 16)
    faded = 0.98 * images
    grid = quality.to_digit_grid(images)
    expected = np.mean(0.02 * np.linalg.norm(grid - 0.5, axis=1))
    result = quality.nearest_real(faded, 16)
    assert np.isclose(result["to_test"], expected, rtol=1e-6)
    assert result["to_train"] > 10 * expected and result["gap"] < 0
