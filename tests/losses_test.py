"""The simple loss: zero for the exact denoiser of a point mass, E[ε²] for a zero predictor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import losses, schedules


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_exact_denoiser_of_point_mass_has_zero_loss(target):
    """For x_0 ≡ c, x_t determines ε exactly, so the ideal prediction of every target is known."""
    s = schedules.make_schedule("linear", 1000)
    c = jnp.full((64, 4, 4, 2), 0.3)

    def oracle(x_t, t):
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
    loss = losses.simple_loss(s, lambda x, t: jnp.zeros_like(x), x0, jax.random.key(1), "eps")
    # E[ε²] = 1; each example averages 64 values, so the batch mean has sd √(2/(64·256)).
    np.testing.assert_allclose(loss.mean(), 1.0, atol=5 * np.sqrt(2 / (64 * 256)))
    x0 = jnp.ones((256, 8, 8, 1)) * 0.5
    np.testing.assert_allclose(
        losses.simple_loss(s, lambda x, t: jnp.zeros_like(x), x0, jax.random.key(2), "x0"),
        0.25, rtol=1e-6)


def test_unknown_target():
    s = schedules.make_schedule("linear", 10)
    with pytest.raises(ValueError, match="unknown prediction target 'score'"):
        losses.simple_loss(s, lambda x, t: x, jnp.zeros((2, 2, 2, 1)), jax.random.key(0),
                           "score")
