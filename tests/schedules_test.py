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
    np.testing.assert_allclose(
        np.asarray(s.alpha_bar)[unclipped], expected[unclipped], rtol=2e-5, atol=1e-7
    )
    assert float(s.betas.max()) <= 0.999 + 1e-6


def test_scaled_linear_and_sigmoid():
    s = schedules.make_schedule("scaled_linear", 1000)
    np.testing.assert_allclose(s.betas[0], 0.00085, rtol=1e-5)
    np.testing.assert_allclose(s.betas[-1], 0.012, rtol=1e-5)
    np.testing.assert_allclose(
        np.diff(np.sqrt(np.asarray(s.betas, np.float64))).std(), 0, atol=1e-7
    )
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
    np.testing.assert_allclose(
        np.asarray(s.sqrt_alpha_bar) ** 2 + np.asarray(s.sqrt_one_minus_alpha_bar) ** 2,
        1.0,
        rtol=1e-6,
    )


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
@pytest.mark.parametrize("k", [0.25, 4.0])
def test_snr_scale_multiplies_every_steps_snr(name, k):
    """log-SNR shifted by log k at every t (Hoogeboom et al. 2023), computed from the closed-form
    ᾱ of the unscaled schedule, in float64; the zero-terminal-SNR end stays at ᾱ_T = 0."""
    base = np.cumprod(1 - schedules.SCHEDULES[name](1000))
    shifted = np.cumprod(1 - schedules.scale_snr(schedules.SCHEDULES[name](1000), k))
    np.testing.assert_allclose(
        np.log(shifted) - np.log1p(-shifted),
        np.log(base) - np.log1p(-base) + math.log(k),
        atol=1e-9,
    )
    s = schedules.make_schedule(name, 1000, snr_scale=k)
    np.testing.assert_allclose(s.log_snr, np.log(base / (1 - base)) + math.log(k), atol=2e-4)
    assert np.all((np.asarray(s.betas) > 0) & (np.asarray(s.betas) < 1))
    z = schedules.make_schedule(name, 1000, zero_terminal_snr=True, snr_scale=k)
    assert float(z.alpha_bar[-1]) == 0.0 and float(z.betas[-1]) == 1.0
    unit = schedules.make_schedule(name, 1000, snr_scale=1.0)
    np.testing.assert_array_equal(unit.betas, schedules.make_schedule(name, 1000).betas)
    with pytest.raises(ValueError, match="snr_scale must be a positive number, got 0"):
        schedules.make_schedule(name, 1000, snr_scale=0.0)


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
        xs = schedules.q_sample(
            s,
            jnp.broadcast_to(jnp.asarray(x0), (n, 3)),
            jnp.full((n,), t),
            jnp.asarray(rng.standard_normal((n, 3))),
        )
        np.testing.assert_allclose(
            np.asarray(xs).mean(0), mean[0], atol=5 * math.sqrt(var.item() / n)
        )


def test_posterior_equals_bayes_rule_numerically():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), integrated on a fine grid."""
    s = schedules.make_schedule("linear", 100)
    betas = schedules.linear_betas(100)
    ab = np.cumprod(1 - betas)
    x0, xt = 0.7, -0.4
    for t in (1, 10, 60, 99):
        grid = np.linspace(-8, 8, 200001)
        log_lik = -((xt - math.sqrt(1 - betas[t]) * grid) ** 2) / (2 * betas[t])
        log_prior = -((grid - math.sqrt(ab[t - 1]) * x0) ** 2) / (2 * (1 - ab[t - 1]))
        w = np.exp(log_lik + log_prior - np.max(log_lik + log_prior))
        w /= w.sum()
        mean_num = np.sum(w * grid)
        var_num = np.sum(w * (grid - mean_num) ** 2)
        mean, var, log_var = schedules.q_posterior(
            s, jnp.array([x0]), jnp.array([xt]), jnp.array([t])
        )
        np.testing.assert_allclose(mean[0], mean_num, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var[0], var_num, rtol=1e-3)
        np.testing.assert_allclose(np.exp(log_var[0]), var_num, rtol=1e-3)
    # At t = 0 the posterior is a point mass at x_0; its log-variance is clipped to β̃ of t = 1.
    mean, var, log_var = schedules.q_posterior(s, jnp.array([x0]), jnp.array([xt]), jnp.array([0]))
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


def _bayes_jumps(betas: np.ndarray, t: np.ndarray, t_s: np.ndarray) -> dict:
    """The jump t → t_s by Bayes' rule in float64: q(x_s | x_t, x_0) ∝ q(x_t | x_s) q(x_s | x_0),
    a product of two Gaussians in x_s (t_s = -1: the point mass at x_0)."""
    with np.errstate(divide="ignore"):  # log 0 = -inf at zero terminal SNR
        log_ab = np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])  # index t + 1
    la_t, la_s = log_ab[t + 1], log_ab[t_s + 1]
    var_prior = -np.expm1(la_s)  # q(x_s | x_0) = N(√ᾱ_s x_0, 1 - ᾱ_s)
    var_lik = -np.expm1(la_t - la_s)  # q(x_t | x_s) = N(√(ᾱ_t/ᾱ_s) x_s, 1 - ᾱ_t/ᾱ_s)
    a_lik = np.exp(0.5 * (la_t - la_s))
    clean = t_s < 0
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(clean, 0.0, 1.0 / (1.0 / var_prior + a_lik**2 / var_lik))
        coef_x0 = np.where(clean, 1.0, var * np.exp(0.5 * la_s) / var_prior)
        coef_xt = np.where(clean, 0.0, var * a_lik / var_lik)
    return {"beta": var_lik, "posterior_variance": var, "coef_x0": coef_x0, "coef_xt": coef_xt}


def _naive_transition(s, t, t_s):
    """The plain float32 formulas from ᾱ (what diffjax computed before): for the sensitivity
    check below."""
    ab = lambda i: jnp.where(i >= 0, s.alpha_bar[jnp.maximum(i, 0)], 1.0)
    ab_t, ab_s = ab(t), ab(t_s)
    beta = 1.0 - ab_t / ab_s
    return {
        "beta": beta,
        "posterior_variance": beta * (1.0 - ab_s) / (1.0 - ab_t),
        "coef_x0": beta * jnp.sqrt(ab_s) / (1.0 - ab_t),
        "coef_xt": (1.0 - ab_s) * jnp.sqrt(1.0 - beta) / (1.0 - ab_t),
    }


def _jump_tables(T: int):
    """(t, t_s) pairs: every adjacent step (and t = 0 → clean), and sub-sequence jumps."""
    from diffjax import samplers

    pairs = [(np.arange(T), np.arange(T) - 1)]
    for steps, spacing in ((50, "uniform"), (10, "trailing"), (25, "leading"), (1, "uniform")):
        table = samplers.timestep_table(T, steps, spacing)
        pairs.append((table[:-1], table[1:]))
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


SCHEDULE_CASES = [(name, False) for name in sorted(schedules.SCHEDULES)] + [
    ("linear", True),
    ("cosine", True),
]


@pytest.mark.parametrize("name,zero_snr", SCHEDULE_CASES)
def test_sampler_jump_coefficients_are_exact_in_float32(name, zero_snr):
    """Every sampler-path coefficient in float32 within 1e-6 of float64 Bayes, at every t."""
    T = 1000
    betas = schedules.SCHEDULES[name](T)
    if zero_snr:
        betas = schedules.rescale_zero_terminal_snr(betas)
    s = schedules.schedule_from_betas(betas, jnp.float32)
    t, t_s = _jump_tables(T)
    want = _bayes_jumps(np.asarray(betas, np.float64), t, t_s)
    got = schedules.transition(s, jnp.asarray(t), jnp.asarray(t_s))
    for key, value in want.items():
        np.testing.assert_allclose(
            np.asarray(got[key], np.float64), value, rtol=0, atol=1e-6, err_msg=f"{key}, {name}"
        )
        assert np.asarray(got[key]).dtype == np.float32
    if not zero_snr:  # the test can fail: the plain float32 formulas are 1e-5 … 1e-4 off
        naive = _naive_transition(s, jnp.asarray(t), jnp.asarray(t_s))
        worst = max(np.max(np.abs(np.asarray(naive[k], np.float64) - want[k])) for k in want)
        assert worst > 1e-5, worst
