"""Samplers driven by the exact denoiser of Gaussian data, where the right answer is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import samplers, sampling, schedules, sharding
from diffjax.cond import NONE
from diffjax.models.unet import UNet

MU, SIGMA = 0.4, 0.3
S = schedules.make_schedule("linear", 1000)
UNCLIPPED = samplers.Prediction(clip_x0=False)


def gaussian_model(s, target="eps", learned_variance=False):
    """The exact denoiser for x_0 ~ N(μ, σ²): E[x_0 | x_t] is linear in x_t.

    With `learned_variance`, it also outputs the v that makes p(x_{t-1} | x_t) the true reverse
    kernel: Var[x_{t-1} | x_t] = β̃_t + c_0² Var[x_0 | x_t] (c_0 the eq. 7 coefficient of x_0).
    """

    def denoise(x_t, t, cond=None):
        ab = schedules.extract(s.alpha_bar, t, x_t.ndim)
        x0 = MU + jnp.sqrt(ab) * SIGMA**2 / (ab * SIGMA**2 + 1 - ab) * (x_t - jnp.sqrt(ab) * MU)
        eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
        out = {"eps": eps, "x0": x0, "v": schedules.v_from_x0_eps(s, x0, t, eps)}[target]
        if not learned_variance:
            return out
        var_x0 = SIGMA**2 * (1 - ab) / (ab * SIGMA**2 + 1 - ab)
        var = (
            schedules.extract(s.posterior_variance, t, x_t.ndim)
            + schedules.extract(s.posterior_mean_coef_x0, t, x_t.ndim) ** 2 * var_x0
        )
        lo = schedules.extract(s.posterior_log_variance_clipped, t, x_t.ndim)
        hi = schedules.extract(jnp.log(s.betas), t, x_t.ndim)
        v = jnp.broadcast_to(2 * (jnp.log(var) - lo) / (hi - lo) - 1, out.shape)
        return jnp.concatenate([out, v], axis=-1)

    return denoise


def _run(name, steps_, spacing="uniform", target="eps", x_T=None, key=0, eta=0.0, **kw):
    x_T = jnp.array([0.0, 1.0]).reshape(2, 1, 1, 1) if x_T is None else x_T
    pred = kw.pop("pred", samplers.Prediction(target, clip_x0=False))
    table = samplers.timestep_table(S.num_steps, steps_, spacing, max(steps_, 200))
    return np.asarray(
        samplers.SAMPLERS[name](
            gaussian_model(S, target, pred.learned_variance),
            S,
            x_T,
            NONE,
            jax.random.key(key),
            table,
            np.int32(steps_),
            eta=eta,
            pred=pred,
            **kw,
        )
    )


def _affine_errors(name, steps_, spacing="uniform", target="eps"):
    """A deterministic sampler maps x_T linearly for Gaussian data: x_0 = a x_T + b, so with
    x_T ~ N(0, 1) its samples are exactly N(b, a²). Returns (|a - σ|, |b - μ|)."""
    out = _run(name, steps_, spacing, target).ravel()
    return abs(out[1] - out[0] - SIGMA), abs(out[0] - MU)


def test_timestep_spacings():
    np.testing.assert_array_equal(
        samplers.timesteps(1000, 10, "uniform"), [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    )
    np.testing.assert_array_equal(samplers.timesteps(1000, 10, "trailing"), np.arange(999, 0, -100))
    np.testing.assert_array_equal(samplers.timesteps(1000, 10, "leading"), np.arange(900, -1, -100))
    for spacing in samplers.SPACINGS:
        np.testing.assert_array_equal(samplers.timesteps(50, 50, spacing), np.arange(49, -1, -1))
    for T in (50, 100, 1000):  # every step count gives `steps` distinct timesteps in [0, T)
        for n in range(1, T + 1):
            for spacing in samplers.SPACINGS:
                t = samplers.timesteps(T, n, spacing)
                assert len(t) == n and len(set(t)) == n and t.min() >= 0 and t.max() < T
                assert np.all(np.diff(t) < 0)
    table = samplers.timestep_table(1000, 3, "trailing", 6)
    np.testing.assert_array_equal(table, [999, 666, 332, -1, -1, -1, -1])
    with pytest.raises(ValueError, match="max_steps"):
        samplers.timestep_table(1000, 8, "uniform", 6)
    with pytest.raises(ValueError, match="unknown spacing"):
        samplers.timesteps(1000, 8, "log")


def test_transition_of_adjacent_steps_is_the_schedule():
    t = np.arange(1, 1000)
    c = schedules.transition(S, jnp.asarray(t), jnp.asarray(t - 1))
    np.testing.assert_allclose(c["beta"], S.betas[t], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(c["coef_x0"], S.posterior_mean_coef_x0[t], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(c["coef_xt"], S.posterior_mean_coef_xt[t], rtol=1e-5)
    np.testing.assert_allclose(
        c["posterior_variance"], S.posterior_variance[t], rtol=1e-5, atol=1e-9
    )


# Errors of the exact affine map at 160 steps. The mean floor (~8e-4) is the prior mismatch:
# x_T ~ N(0, 1) while q(x_T) has mean √ᾱ_T μ ≈ 0.003.
@pytest.mark.parametrize("name,sd_tol", [("ddim", 0.01), ("dpm_solver_pp", 0.005), ("heun", 0.002)])
@pytest.mark.parametrize("spacing", samplers.SPACINGS)
def test_deterministic_samplers_converge_to_the_data(name, sd_tol, spacing):
    errs = [_affine_errors(name, n, spacing) for n in (40, 80, 160)]
    sd = [e[0] for e in errs]
    assert sd[0] > sd[1] > sd[2] or sd[2] < 0.1 * sd_tol, sd
    assert sd[2] < (sd_tol if spacing != "trailing" else 2 * sd_tol), sd
    assert max(e[1] for e in errs) < 3e-3


@pytest.mark.parametrize(
    "name,order,n", [("ddim", 1, 80), ("heun", 2, 40), ("dpm_solver_pp", 2, 80)]
)
def test_convergence_order(name, order, n):
    """Halving the step size divides the error by ~2^order (uniform spacing, n → 2n steps, in
    the asymptotic range: DPM-Solver++ reaches it late, as its λ-steps near t = 0 are large)."""
    sd = [_affine_errors(name, k)[0] for k in (n, 2 * n)]
    ratio = sd[0] / sd[1]
    assert 2**order * 0.75 < ratio < 2**order * 1.6, sd


@pytest.mark.parametrize("name", ["ddim", "dpm_solver_pp", "heun", "ddpm"])
@pytest.mark.parametrize("target", ["x0", "v"])
def test_every_parameterization_gives_the_same_samples(name, target):
    x_T = jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
    np.testing.assert_allclose(
        _run(name, 12, target=target, x_T=x_T), _run(name, 12, target="eps", x_T=x_T), atol=2e-4
    )


@pytest.mark.parametrize(
    "name,kw",
    [
        ("ddpm", dict(variance="beta")),
        ("ddpm", dict(variance="posterior")),
        ("ddpm", dict(pred=samplers.Prediction(clip_x0=False, learned_variance=True))),
        ("ddim", dict(eta=1.0)),
    ],
)
def test_stochastic_samplers_recover_gaussian_data(name, kw):
    x_T = jax.random.normal(jax.random.key(0), (4000, 1, 1, 2))
    out = _run(name, 1000, x_T=x_T, key=1, **kw).ravel()
    # 8000 draws: the mean's standard error is σ/√8000 ≈ 0.0034; the sd's ≈ σ/√16000 ≈ 0.0024.
    # Fixed variances make the reverse chain only approximately right at T = 1000 (a few %);
    # the learned (here exact) variance makes it exact.
    np.testing.assert_allclose(out.mean(), MU, atol=0.015)
    rtol = 0.02 if "pred" in kw else 0.05
    np.testing.assert_allclose(out.std(), SIGMA, rtol=rtol)


def test_respaced_ancestral_sampler_with_few_steps():
    """With 50 respaced jumps the true reverse variance lies between β̃ and β (for data variance
    below 1), so the two fixed choices bracket the data's spread (Improved DDPM §3.1, §4)."""
    x_T = jax.random.normal(jax.random.key(0), (4000, 1, 1, 2))
    low = _run("ddpm", 50, x_T=x_T, key=1, variance="posterior").ravel()
    high = _run("ddpm", 50, x_T=x_T, key=1, variance="beta").ravel()
    np.testing.assert_allclose([low.mean(), high.mean()], MU, atol=0.015)
    assert low.std() < SIGMA - 0.02 and high.std() > SIGMA + 0.01


def test_same_key_same_samples_and_clipping():
    x_T = jax.random.normal(jax.random.key(0), (8, 2, 2, 1)) * 3
    pred = samplers.Prediction()
    a, b, c = (_run("ddpm", 20, x_T=x_T, key=k, pred=pred) for k in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.abs(a).max() <= 1.0


def test_dynamic_thresholding():
    x0 = jnp.stack([jnp.linspace(-3.0, 3.0, 1000), jnp.linspace(-0.5, 0.5, 1000)])
    out = np.asarray(samplers.threshold_x0(x0, True, 0.9))
    assert np.abs(out[0]).max() <= 1.0 + 1e-6
    q = np.quantile(np.abs(np.linspace(-3, 3, 1000)), 0.9)
    np.testing.assert_allclose(out[0, 500], float(x0[0, 500]) / q, rtol=1e-5)
    np.testing.assert_allclose(out[1], x0[1])  # within [-1, 1]: unchanged (q floored at 1)


def test_ddim_inversion_round_trip():
    x0 = MU + SIGMA * jax.random.normal(jax.random.key(5), (64, 2, 2, 1))
    errors = []
    for n in (50, 200):
        table = samplers.timestep_table(S.num_steps, n, "uniform")
        model = gaussian_model(S)
        z = samplers.ddim_invert(model, S, x0, NONE, table, np.int32(n), pred=UNCLIPPED)
        back = samplers.ddim_sample(
            model, S, z, NONE, jax.random.key(0), table, np.int32(n), pred=UNCLIPPED
        )
        errors.append(float(jnp.sqrt(jnp.mean(jnp.square(back - x0)))))
    # The inversion is the η = 0 map run backwards with a one-step lag: first-order error
    # (RMS 0.041 at 50 steps, 0.0105 at 200).
    assert errors[1] < 0.35 * errors[0] and errors[1] < 0.015, errors
    # The latents are noise-like: the inverted data has roughly unit variance.
    assert 0.6 < float(jnp.std(z)) < 1.4


def test_one_compilation_serves_every_step_count_and_eta(compiles):
    mesh = sharding.make_mesh(8)
    model = UNet(
        base_channels=8,
        channel_mults=(1,),
        num_res_blocks=1,
        attention_resolutions=(),
        mid_attention=False,
        num_groups=4,
    )
    s = schedules.make_schedule("linear", 30)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,), jnp.int32))
    fn = sampling.make_sample_fn(model, s, mesh, sampler="ddim", pred=UNCLIPPED)
    x_T = sampling.make_noise_fn(mesh, (8, 4, 4, 1))(jax.random.key(2))
    outs = []
    key = jax.random.key(1)

    def run(n, spacing, eta):
        table = samplers.timestep_table(30, n, spacing, 30)
        outs.append(np.asarray(fn(params["params"], x_T, NONE, key, table, n, eta)))

    run(3, "uniform", 0.0)
    with compiles.none_expected("a new step count, spacing and η"):
        run(7, "trailing", 0.5)
        run(30, "leading", 1.0)
    assert all(np.isfinite(o).all() for o in outs) and not np.allclose(outs[0], outs[1])


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm_solver_pp", "heun"])
def test_zero_terminal_snr_with_v_prediction(name):
    """ᾱ_T = 0: the first step starts from pure noise; every sampler stays finite and lands on
    the data (first-order start, so looser than on the standard schedule)."""
    s = schedules.make_schedule("linear", 1000, zero_terminal_snr=True)
    table = samplers.timestep_table(1000, 50, "trailing")
    x_T = jax.random.normal(jax.random.key(0), (4000, 1, 1, 2))
    out = np.asarray(
        samplers.SAMPLERS[name](
            gaussian_model(s, "v"),
            s,
            x_T,
            NONE,
            jax.random.key(1),
            table,
            np.int32(50),
            pred=samplers.Prediction("v", clip_x0=False),
            variance="posterior",
        )
    ).ravel()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.mean(), MU, atol=0.02)
    np.testing.assert_allclose(out.std(), SIGMA, rtol=0.2)


@pytest.mark.parametrize("name", ["ddim", "dpm_solver_pp", "heun"])
def test_a_chain_cut_with_start_at_continues_the_full_one(name):
    """k steps, then `start_at(table, n, k)` from that point: the full n-step chain (DPM-Solver++
    restarts first order, so it matches only approximately)."""
    n, k = 40, 15
    table = samplers.timestep_table(S.num_steps, n, "uniform", 60)
    x_T = jax.random.normal(jax.random.key(3), (64, 1, 1, 1))
    run = lambda x, tab, steps_: samplers.SAMPLERS[name](
        gaussian_model(S), S, x, NONE, jax.random.key(0), tab, np.int32(steps_), pred=UNCLIPPED
    )
    full = run(x_T, table, n)
    rest, remaining = samplers.start_at(table, n, k)
    assert remaining == n - k and rest[0] == table[k] and len(rest) == len(table)
    # The first k steps alone (the clean-image clip at the end is off: pred is unclipped).
    part = run(x_T, np.concatenate([table[: k + 1], np.full(len(table) - k - 1, -1)]), k)
    tol = 2e-3 if name == "dpm_solver_pp" else 1e-5
    np.testing.assert_allclose(run(part, rest, remaining), full, atol=tol)
    with pytest.raises(ValueError, match="start must be in"):
        samplers.start_at(table, n, n)
