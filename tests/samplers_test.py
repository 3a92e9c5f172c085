"""The DDPM ancestral sampler driven by the exact denoiser of Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import samplers, schedules

MU, SIGMA = 0.4, 0.3


def gaussian_eps(s):
    """E[ε | x_t] for x_0 ~ N(μ, σ²): x_t ~ N(√ᾱ μ, ᾱσ² + 1 - ᾱ), Cov(ε, x_t) = √(1-ᾱ)."""
    def denoise(x_t, t):
        ab = s.alpha_bar[t].reshape(-1, 1, 1, 1)
        return jnp.sqrt(1 - ab) * (x_t - jnp.sqrt(ab) * MU) / (ab * SIGMA**2 + 1 - ab)
    return denoise


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ancestral_sampler_recovers_gaussian_data(variance):
    s = schedules.make_schedule("linear", 1000)
    n = 4000
    x_T = jax.random.normal(jax.random.key(0), (n, 1, 1, 2))
    out = jax.jit(lambda x, k: samplers.ddpm_sample(gaussian_eps(s), s, x, k, variance=variance,
                                                    clip_x0=False))(x_T, jax.random.key(1))
    out = np.asarray(out).ravel()
    # 8000 draws: the mean's standard error is σ/√8000 ≈ 0.0034. The variance of the reverse
    # chain is only approximately right at T = 1000 (a few %), hence the looser sd tolerance.
    np.testing.assert_allclose(out.mean(), MU, atol=0.015)
    np.testing.assert_allclose(out.std(), SIGMA, rtol=0.05)


def test_same_key_same_samples_and_x0_prediction_target():
    s = schedules.make_schedule("cosine", 50)
    x_T = jax.random.normal(jax.random.key(0), (8, 2, 2, 1))

    def x0_pred(x_t, t):  # the same Gaussian oracle, expressed as an x_0 prediction
        return schedules.x0_from_eps(s, x_t, t, gaussian_eps(s)(x_t, t))

    run = jax.jit(lambda k: samplers.ddpm_sample(x0_pred, s, x_T, k, target="x0"))
    a, b, c = run(jax.random.key(3)), run(jax.random.key(3)), run(jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert float(jnp.abs(a).max()) <= 1.0


def test_unknown_variance():
    s = schedules.make_schedule("linear", 10)
    with pytest.raises(ValueError, match="unknown variance"):
        samplers.reverse_log_variance(s, jnp.array([1]), 4, "learned")
