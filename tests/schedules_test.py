"""Schedules, q(x_t | x_0) and the posterior against the papers' formulas and numerics."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import schedules


def test_linear_endpoints_and_alpha_bar_T():
    s = schedules.make_schedule("linear", 1000)
    np.testing.assert_allclose(s.betas[0], 1e-4, rtol=1e-6)
    np.testing.assert_allclose(s.betas[-1], 0.02, rtol=1e-6)
    # ᾱ_T = Π(1 - β_t) for β linear in [1e-4, 0.02]: computed here by a log-sum in float64.
    betas = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999
    np.testing.assert_allclose(s.alpha_bar[-1], math.exp(np.sum(np.log1p(-betas))), rtol=1e-4)
    assert 4.0e-5 < float(s.alpha_bar[-1]) < 4.1e-5  # the well-known value 4.04e-5


def test_cosine_alpha_bar_matches_paper_formula():
    T, s_off = 1000, 0.008
    s = schedules.make_schedule("cosine", T)
    f = lambda t: math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2
    expected = np.array([f(t) / f(0) for t in range(1, T + 1)])
    unclipped = np.asarray(s.betas) < 0.999 - 1e-6
    unclipped = unclipped & (np.cumsum(~unclipped) == 0)  # before the first clipped β
    assert unclipped.sum() > 990
    np.testing.assert_allclose(np.asarray(s.alpha_bar)[unclipped], expected[unclipped],
                               rtol=2e-5, atol=1e-7)
    assert float(s.betas.max()) <= 0.999 + 1e-6


def test_scaled_linear_and_sigmoid():
    s = schedules.make_schedule("scaled_linear", 1000)
    np.testing.assert_allclose(s.betas[0], 0.00085, rtol=1e-5)
    np.testing.assert_allclose(s.betas[-1], 0.012, rtol=1e-5)
    np.testing.assert_allclose(np.diff(np.sqrt(np.asarray(s.betas, np.float64))).std(), 0,
                               atol=1e-7)
    g = schedules.make_schedule("sigmoid", 1000)
    sig = lambda z: 1 / (1 + math.exp(-z))
    a = lambda u: (sig(3) - sig(6 * u - 3)) / (sig(3) - sig(-3))
    np.testing.assert_allclose(g.alpha_bar[499], a(0.5), rtol=1e-5)
    assert np.all(np.diff(np.asarray(g.alpha_bar)) < 0)


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_derived_quantities(name):
    s = schedules.make_schedule(name, 100)
    ab = np.asarray(s.alpha_bar, np.float64)
    np.testing.assert_allclose(s.log_snr, np.log(ab / (1 - ab)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(s.sqrt_alpha_bar) ** 2 + np.asarray(
        s.sqrt_one_minus_alpha_bar) ** 2, 1.0, rtol=1e-6)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown schedule 'cosin'.*cosine"):
        schedules.make_schedule("cosin")


def test_q_sample_matches_iterated_one_step_chain():
    """Closed-form q(x_t|x_0) vs running x_s = √(1-β_s) x_{s-1} + √β_s ε for s ≤ t (float64)."""
    T, n = 200, 40000
    s = schedules.make_schedule("linear", T)
    betas = np.asarray(schedules.linear_betas(T))
    rng = np.random.default_rng(0)
    x0 = np.array([-1.0, 0.3, 1.0])
    for t in (0, 20, 120, T - 1):
        x = np.broadcast_to(x0, (n, 3)).copy()
        for b in betas[: t + 1]:
            x = math.sqrt(1 - b) * x + math.sqrt(b) * rng.standard_normal(x.shape)
        mean, var = schedules.q_mean_variance(s, jnp.asarray(x0)[None], jnp.array([t]))
        # Standard errors: sd/√n for the mean, √(2/n)·var for the variance; allow 5 of them.
        np.testing.assert_allclose(x.mean(0), mean[0], atol=5 * math.sqrt(var.item() / n))
        np.testing.assert_allclose(x.var(0), var.item(), atol=5 * math.sqrt(2 / n) * var.item())
        xs = schedules.q_sample(s, jnp.broadcast_to(jnp.asarray(x0), (n, 3)),
                                jnp.full((n,), t), jnp.asarray(rng.standard_normal((n, 3))))
        np.testing.assert_allclose(np.asarray(xs).mean(0), mean[0],
                                   atol=5 * math.sqrt(var.item() / n))


def test_posterior_equals_bayes_rule_numerically():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), integrated on a fine grid."""
    s = schedules.make_schedule("linear", 100)
    betas = schedules.linear_betas(100)
    ab = np.cumprod(1 - betas)
    x0, xt = 0.7, -0.4
    for t in (1, 10, 60, 99):
        grid = np.linspace(-8, 8, 200001)
        log_lik = -(xt - math.sqrt(1 - betas[t]) * grid) ** 2 / (2 * betas[t])
        log_prior = -(grid - math.sqrt(ab[t - 1]) * x0) ** 2 / (2 * (1 - ab[t - 1]))
        w = np.exp(log_lik + log_prior - np.max(log_lik + log_prior))
        w /= w.sum()
        mean_num = np.sum(w * grid)
        var_num = np.sum(w * (grid - mean_num) ** 2)
        mean, var, log_var = schedules.q_posterior(s, jnp.array([x0]), jnp.array([xt]),
                                                   jnp.array([t]))
        np.testing.assert_allclose(mean[0], mean_num, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var[0], var_num, rtol=1e-3)
        np.testing.assert_allclose(np.exp(log_var[0]), var_num, rtol=1e-3)
    # At t = 0 the posterior is a point mass at x_0; its log-variance is clipped to β̃ of t = 1.
    mean, var, log_var = schedules.q_posterior(s, jnp.array([x0]), jnp.array([xt]),
                                               jnp.array([0]))
    np.testing.assert_allclose(mean[0], x0, rtol=1e-6)
    assert float(var[0]) == 0.0
    np.testing.assert_allclose(log_var[0], np.log(s.posterior_variance[1]), rtol=1e-6)


def test_parameterizations_round_trip():
    s = schedules.make_schedule("cosine", 1000)
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.uniform(-1, 1, (5, 4, 4, 3)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((5, 4, 4, 3)), jnp.float32)
    t = jnp.array([0, 10, 500, 900, 990])
    xt = schedules.q_sample(s, x0, t, eps)
    v = schedules.v_from_x0_eps(s, x0, t, eps)
    for target, pred in (("eps", eps), ("x0", x0), ("v", v)):
        x0_hat, eps_hat = schedules.to_x0_eps(s, xt, t, pred, target)
        np.testing.assert_allclose(x0_hat, x0, atol=2e-3 if target == "eps" else 1e-4)
        np.testing.assert_allclose(eps_hat, eps, atol=2e-3 if target == "x0" else 1e-4)
