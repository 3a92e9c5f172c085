"""The simple loss: zero for the exact denoiser of a point mass, E[ε²] for a zero predictor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffjax import losses, schedules


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_exact_denoiser_of_point_mass_has_zero_loss(target):
    """For x_0 ≡ c, x_t determines ε exactly, so the ideal prediction of every target is known."""
    s = schedules.make_schedule("linear", 1000)
    c = jnp.full((64, 4, 4, 2), 0.3)

    def oracle(x_t, t, cond=None):
        a = s.sqrt_alpha_bar[t][:, None, None, None]
        b = s.sqrt_one_minus_alpha_bar[t][:, None, None, None]
        eps = (x_t - a * c) / b
        return {"eps": eps, "x0": c, "v": a * eps - b * c}[target]

    loss = losses.simple_loss(s, oracle, c, jax.random.key(0), target)
    assert loss.shape == (64,)
    np.testing.assert_allclose(loss, 0.0, atol=2e-3)


def test_zero_predictor_loss_is_second_moment_of_target():
    s = schedules.make_schedule("linear", 1000)
    x0 = jnp.zeros((256, 8, 8, 1))
    loss = losses.simple_loss(s, lambda x, t, c: jnp.zeros_like(x), x0, jax.random.key(1), "eps")
    # E[ε²] = 1; each example averages 64 values, so the batch mean has sd √(2/(64·256)).
    np.testing.assert_allclose(loss.mean(), 1.0, atol=5 * np.sqrt(2 / (64 * 256)))
    x0 = jnp.ones((256, 8, 8, 1)) * 0.5
    np.testing.assert_allclose(
        losses.simple_loss(s, lambda x, t, c: jnp.zeros_like(x), x0, jax.random.key(2), "x0"),
        0.25,
        rtol=1e-6,
    )


def test_unknown_target():
    s = schedules.make_schedule("linear", 10)
    with pytest.raises(ValueError, match="unknown prediction target 'score'"):
        losses.simple_loss(
            s, lambda x, t, c: x, jnp.zeros((2, 2, 2, 1)), jax.random.key(0), "score"
        )


# --- the variational bound ----------------------------------------------------------------------

MU, SIG = 0.1, 0.2  # Gaussian data well inside [-1, 1]: P(|x| > 1) < 1e-5


def test_normal_kl_against_numerical_integration():
    x = np.linspace(-12, 12, 200001)
    for m1, v1, m2, v2 in [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0), (1.0, 0.01, 0.9, 0.04)]:
        p, q = stats.norm.pdf(x, m1, np.sqrt(v1)), stats.norm.pdf(x, m2, np.sqrt(v2))
        ok = p > 1e-300
        numeric = np.trapezoid(p[ok] * (np.log(p[ok]) - np.log(q[ok])), x[ok])
        np.testing.assert_allclose(
            losses.normal_kl(m1, np.log(v1), m2, np.log(v2)), numeric, atol=1e-5
        )


@pytest.mark.parametrize(
    "mean,scale", [(0.3, 0.05), (0.0, 3.0), (0.99, 1e-3), (-2.0, 0.01), (0.5, 1e-4)]
)
def test_discretized_gaussian_sums_to_one_over_the_256_bins(mean, scale):
    bins = jnp.linspace(-1, 1, 256)
    log_p = losses.discretized_gaussian_log_likelihood(bins, mean, np.log(scale))
    np.testing.assert_allclose(float(jnp.sum(jnp.exp(log_p))), 1.0, atol=1e-5)
    # An interior bin against the CDF difference, computed independently in float64.
    k = 128
    expected = stats.norm.cdf(bins[k] + 1 / 255, mean, scale) - stats.norm.cdf(
        bins[k] - 1 / 255, mean, scale
    )
    if expected > 1e-30:
        np.testing.assert_allclose(float(log_p[k]), np.log(expected), rtol=1e-3, atol=1e-5)


def _gaussian_model(s, learned_variance=True):
    """ε̂ and the v that make p(x_{t-1}|x_t) the true reverse kernel, for x_0 ~ N(μ, σ²)."""

    def denoise(x_t, t, cond=None):
        ab = schedules.extract(s.alpha_bar, t, x_t.ndim)
        x0 = MU + jnp.sqrt(ab) * SIG**2 / (ab * SIG**2 + 1 - ab) * (x_t - jnp.sqrt(ab) * MU)
        eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
        if not learned_variance:
            return eps
        var = schedules.extract(s.posterior_variance, t, x_t.ndim) + schedules.extract(
            s.posterior_mean_coef_x0, t, x_t.ndim
        ) ** 2 * SIG**2 * (1 - ab) / (ab * SIG**2 + 1 - ab)
        lo = schedules.extract(s.posterior_log_variance_clipped, t, x_t.ndim)
        hi = schedules.extract(jnp.log(s.betas), t, x_t.ndim)
        return jnp.concatenate(
            [eps, jnp.broadcast_to(2 * (jnp.log(var) - lo) / (hi - lo) - 1, eps.shape)], -1
        )

    return denoise


def _quantized_gaussian(n):
    x = np.random.default_rng(0).normal(MU, SIG, (n, 1, 1, 1))
    return jnp.asarray(np.clip(np.round((x + 1) * 127.5), 0, 255) / 127.5 - 1, jnp.float32)


def _entropy_bits():
    edges = (np.arange(257) - 0.5) / 127.5 - 1
    edges[0], edges[-1] = -np.inf, np.inf
    p = np.diff(stats.norm.cdf(edges, MU, SIG))
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def test_vlb_of_the_exact_model_is_the_data_nll():
    """For Gaussian data the true reverse kernels are Gaussian, so the exact model makes the
    bound tight: E[bits/dim] = the entropy of the 8-bit quantized data (6.72 bits). Left over:
    Monte Carlo (one x_t per t; standard error ≈ 0.014 bits at 16384 examples), the decoder's
    bin integral vs the continuous kernel (~0.03 bits: the t=0 kernel's sd ≈ 1.3 bins), and the
    prior mismatch (~1e-6 bits)."""
    s = schedules.make_schedule("linear", 1000)
    x0 = _quantized_gaussian(16384)
    out = jax.jit(
        lambda x, k: losses.bits_per_dim(s, _gaussian_model(s), x, k, learned_variance=True)
    )(x0, jax.random.key(0))
    total = float(out["total"].mean())
    np.testing.assert_allclose(total, _entropy_bits(), atol=0.08)
    assert float(out["prior"].mean()) < 1e-4
    # Fixed variances are not the true kernels: the bound is strictly looser.
    fixed = jax.jit(
        lambda x, k: losses.bits_per_dim(s, _gaussian_model(s, False), x, k, variance="posterior")
    )(x0, jax.random.key(0))
    assert float(fixed["total"].mean()) > total + 0.2


def test_hybrid_loss_stops_the_vlb_gradient_on_the_mean():
    s = schedules.make_schedule("linear", 100)
    x0 = _quantized_gaussian(8)
    t, noise = jnp.arange(8) * 12, jax.random.normal(jax.random.key(0), x0.shape)

    def grads(loss, out):
        f = lambda o: losses.training_losses(
            s, lambda x, tt, c: o, x0, t, noise, loss=loss, learned_variance=True
        )["loss"].sum()
        return jax.grad(f)(out)

    out = jax.random.normal(jax.random.key(1), (8, 1, 1, 2)) * 0.1
    g_hybrid, g_simple, g_vlb = grads("hybrid", out), grads("simple", out), grads("vlb", out)
    np.testing.assert_allclose(g_hybrid[..., :1], g_simple[..., :1], rtol=1e-6)
    assert float(jnp.abs(g_hybrid[..., 1:]).sum()) > 0  # the variance is trained by L_vlb
    assert float(jnp.abs(g_vlb[..., :1] - g_simple[..., :1]).sum()) > 0


def test_min_snr_weights():
    s = schedules.make_schedule("linear", 1000)
    t = jnp.array([0, 300, 999])
    snr = np.exp(np.asarray(s.log_snr)[[0, 300, 999]])
    g = 5.0
    np.testing.assert_allclose(
        losses.min_snr_weight(s, t, "eps", g), np.minimum(snr, g) / snr, rtol=1e-5
    )
    np.testing.assert_allclose(losses.min_snr_weight(s, t, "x0", g), np.minimum(snr, g), rtol=1e-5)
    np.testing.assert_allclose(
        losses.min_snr_weight(s, t, "v", g), np.minimum(snr, g) / (snr + 1), rtol=1e-5
    )
    np.testing.assert_array_equal(losses.min_snr_weight(s, t, "eps", 0.0), 1.0)


def test_loss_history_with_repeated_timesteps():
    h = losses.init_loss_history(5, size=3)
    h = losses.update_loss_history(
        h, jnp.array([2, 2, 2, 2, 4]), jnp.array([1.0, 2.0, 3.0, 4.0, 9.0])
    )
    np.testing.assert_array_equal(h.count, [0, 0, 4, 0, 1])
    # Four values for t=2 in a ring of 3: slots 0, 1, 2, then 0 again (the newest wins).
    assert sorted(np.asarray(h.values[2]).tolist()) in ([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(h.values[4], [9.0, 0.0, 0.0])


def test_importance_sampling_is_unbiased():
    """Once every t has a full history, p_t ∝ √E[L_t²] and E[w L_t] = mean_t L_t."""
    losses_per_t = jnp.linspace(0.1, 5.0, 20) ** 2
    h = losses.LossHistory(
        values=jnp.tile(losses_per_t[:, None], (1, 10)), count=jnp.full((20,), 10, jnp.int32)
    )
    t, w = losses.sample_timesteps(jax.random.key(0), 200000, h, "importance")
    est = float(jnp.mean(w * losses_per_t[t]))
    np.testing.assert_allclose(est, float(losses_per_t.mean()), rtol=0.01)
    assert float(jnp.mean(t >= 15)) > 0.4  # the large-loss steps are drawn more often
    empty = losses.init_loss_history(20)
    t, w = losses.sample_timesteps(jax.random.key(0), 1000, empty, "importance")
    np.testing.assert_allclose(w, 1.0, rtol=1e-5)  # uniform until the history is full


def test_stratified_timesteps_cover_the_range_evenly_and_each_is_uniform():
    """VDM's low-discrepancy draw: one stratum of width T/B per example, each t_i uniform."""
    h = losses.init_loss_history(1000)
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = lambda b: jax.vmap(lambda k: losses.sample_timesteps(k, b, h, "stratified"))(keys)
    t, w = (np.asarray(a) for a in draw(8))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() < 1000
    np.testing.assert_array_equal(w, 1.0)
    # B divides T: every batch is spaced exactly T/B apart.
    np.testing.assert_array_equal(np.diff(np.sort(t, axis=1), axis=1), 125)
    # Marginally uniform: the first example's t over 4000 keys, in 10 bins of 100 steps, passes a
    # chi-square test (9 degrees of freedom; 27.9 is the 0.001 upper quantile).
    counts = np.bincount(t[:, 0] // 100, minlength=10)
    assert np.sum((counts - 400.0) ** 2 / 400.0) < 27.9, counts
    # And in a random order: the first example is not always the smallest t.
    assert 0.05 < np.mean(t[:, 0] == t.min(axis=1)) < 0.25
    # B does not divide T: 3 examples are still one per third of [0, T), a circular lattice.
    gaps = np.diff(np.sort(np.asarray(draw(3)[0]), axis=1), axis=1)
    assert np.all((gaps >= 333) & (gaps <= 334)), gaps


def test_zero_terminal_snr_schedule():
    base = schedules.make_schedule("linear", 1000)
    s = schedules.make_schedule("linear", 1000, zero_terminal_snr=True)
    assert float(s.alpha_bar[-1]) == 0.0 and np.isneginf(float(s.log_snr[-1]))
    np.testing.assert_allclose(s.alpha_bar[0], base.alpha_bar[0], rtol=1e-6)
    # √ᾱ is an affine function of the original √ᾱ (Lin et al. 2024, Algorithm 1).
    a, b = np.asarray(base.sqrt_alpha_bar, np.float64), np.asarray(s.sqrt_alpha_bar, np.float64)
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    np.testing.assert_allclose(b, slope * (a - a[-1]), atol=2e-6)
    # v-prediction is well defined at t = T: x_T = ε and v = -x_0.
    x0 = jnp.full((2, 1, 1, 1), 0.5)
    np.testing.assert_allclose(
        schedules.x0_from_v(s, jnp.ones_like(x0), jnp.array([999, 999]), -x0), x0
    )
