"""Guidance on a two-class Gaussian mixture with exact scores, where each answer is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import cond, guidance, samplers, sampling, schedules, sharding
from diffjax.cond import Cond, Conditioner
from diffjax.models.unet import UNet

S = schedules.make_schedule("linear", 1000)
MUS, SIGMA, PRIOR = jnp.array([-0.6, 0.5]), 0.2, jnp.array([0.3, 0.7])
UNCLIPPED = samplers.Prediction(clip_x0=False)
NULL = 2  # the null label of the mixture model


def _levels(s, x_t, t):
    ab = schedules.extract(s.alpha_bar, t, x_t.ndim)
    return ab, ab * SIGMA**2 + 1 - ab  # ᾱ, Var[x_t | y]


def _x0_given(s, x_t, t, mu):
    """E[x_0 | x_t, y] for x_0 | y ~ N(μ_y, σ²): linear in x_t."""
    ab, var = _levels(s, x_t, t)
    return mu + jnp.sqrt(ab) * SIGMA**2 / var * (x_t - jnp.sqrt(ab) * mu)


def _log_joint(s, x_t, t):
    """log π_y + log N(x_t; √ᾱ μ_y, Var) per class: [..., 2]."""
    ab, var = _levels(s, x_t, t)
    mean = jnp.sqrt(ab)[..., None] * MUS
    return jnp.log(PRIOR) - 0.5 * (x_t[..., None] - mean) ** 2 / var[..., None]


def mixture_model(s):
    """The exact ε-prediction of the mixture, conditional on a label or (label NULL) not."""

    def denoise(x_t, t, c):
        post = jax.nn.softmax(_log_joint(s, x_t, t), axis=-1)  # p(y | x_t)
        per_class = jnp.stack([_x0_given(s, x_t, t, m) for m in MUS], axis=-1)
        uncond = jnp.sum(post * per_class, axis=-1)
        label = c.label.reshape((-1,) + (1,) * (x_t.ndim - 1))
        x0 = jnp.where(label == NULL, uncond, _x0_given(s, x_t, t, MUS[jnp.minimum(label, 1)]))
        ab = schedules.extract(s.alpha_bar, t, x_t.ndim)
        return (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)

    return denoise


def exact_classifier_grad(s):
    """∇_x log p(y | x_t) of the mixture, by autodiff of its closed form."""

    def logits(x, t):
        return _log_joint(s, x.reshape(x.shape[0]), t)

    return guidance.log_prob_grad(logits)


def _sample(name, denoise, labels, n_steps, key=0):
    x_T = jax.random.normal(jax.random.key(key), (labels.shape[0], 1, 1, 1))
    table = samplers.timestep_table(S.num_steps, n_steps, "uniform")
    out = samplers.SAMPLERS[name](
        denoise,
        S,
        x_T,
        Cond(label=labels),
        jax.random.key(key + 1),
        table,
        np.int32(n_steps),
        pred=UNCLIPPED,
        variance="posterior",
    )
    return np.asarray(out).ravel()


SAMPLER_STEPS = [("ddpm", 1000), ("ddim", 100), ("dpm_solver_pp", 200), ("heun", 50)]


@pytest.mark.parametrize("name,n", SAMPLER_STEPS)
def test_cfg_at_w1_is_the_class_law_and_at_w0_the_mixture(name, n):
    model = mixture_model(S)
    labels = jnp.repeat(jnp.array([0, 1]), 2000)
    null = cond.null_like(Cond(label=labels), NULL)
    for w, check in ((1.0, "conditional"), (0.0, "mixture")):
        out = _sample(name, guidance.classifier_free(model, null, jnp.float32(w)), labels, n)
        if check == "conditional":
            for y in (0, 1):
                part = out[np.asarray(labels) == y]
                np.testing.assert_allclose(part.mean(), MUS[y], atol=0.02)
                np.testing.assert_allclose(part.std(), SIGMA, rtol=0.1)
        else:
            mean = float(jnp.sum(PRIOR * MUS))
            var = SIGMA**2 + float(jnp.sum(PRIOR * (MUS - mean) ** 2))
            np.testing.assert_allclose(out.mean(), mean, atol=0.04)
            np.testing.assert_allclose(out.std(), np.sqrt(var), rtol=0.08)
            assert 0.22 < np.mean(out < 0) < 0.38  # class 0's share, 0.3


@pytest.mark.parametrize("name,n", SAMPLER_STEPS)
def test_classifier_guidance_with_the_exact_classifier_gives_the_class_law(name, n):
    labels = jnp.repeat(jnp.array([0, 1]), 2000)
    unconditional = mixture_model(S)
    model = lambda x, t, c: unconditional(x, t, Cond(label=jnp.full_like(c.label, NULL)))
    guided = guidance.classifier(model, exact_classifier_grad(S), S, jnp.float32(1.0))
    out = _sample(name, guided, labels, n)
    for y in (0, 1):
        part = out[np.asarray(labels) == y]
        np.testing.assert_allclose(part.mean(), MUS[y], atol=0.03)
        np.testing.assert_allclose(part.std(), SIGMA, rtol=0.12)


def test_doubled_batch_is_one_call_and_combines_the_two_sides():
    calls = []
    base = mixture_model(S)

    def model(x, t, c):
        jax.debug.callback(lambda b: calls.append(int(b)), x.shape[0])
        return base(x, t, c)

    x = jax.random.normal(jax.random.key(0), (6, 1, 1, 1))
    t = jnp.full((6,), 300, jnp.int32)
    c = Cond(label=jnp.array([0, 1, 0, 1, 1, 0]))
    null = cond.null_like(c, NULL)
    out = jax.jit(lambda w: guidance.classifier_free(model, null, w)(x, t, c))
    expected = base(x, t, null) + 3.0 * (base(x, t, c) - base(x, t, null))
    np.testing.assert_allclose(out(jnp.float32(3.0)), expected, rtol=1e-5, atol=1e-6)
    assert calls == [12]  # one network call, on the doubled batch
    calls.clear()
    np.testing.assert_allclose(out(jnp.float32(1.0)), base(x, t, c), rtol=1e-6)
    np.testing.assert_allclose(out(jnp.float32(0.0)), base(x, t, null), rtol=1e-6)
    assert calls == [6, 6]  # w = 1 and w = 0 at the plain batch


def test_guidance_rescale_matches_its_definition():
    rng = np.random.default_rng(0)
    c, u = (rng.normal(size=(3, 4, 4, 2)).astype(np.float32) for _ in range(2))
    w, phi = 4.0, 0.7
    cfg = u + w * (c - u)
    std = lambda a: a.reshape(3, -1).std(axis=1).reshape(3, 1, 1, 1)
    expected = phi * cfg * std(c) / std(cfg) + (1 - phi) * cfg
    got = guidance.combine(jnp.asarray(c), jnp.asarray(u), w, phi)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Learned variances: the guided mean, the conditional side's variance half.
    both = lambda a, b: jnp.concatenate([a, b], -1)
    got = guidance.combine(both(c, c), both(u, u + 1), w, learned_variance=True)
    np.testing.assert_allclose(got[..., :2], cfg, rtol=1e-5)
    np.testing.assert_allclose(got[..., 2:], c, rtol=1e-6)


def test_label_dropout_rate_within_binomial_bounds_and_repeatable():
    conditioner = Conditioner(num_classes=10, drop_prob=0.1)
    n = 20_000
    c = conditioner.labels(np.arange(n) % 10)
    dropped = conditioner.drop(c, jax.random.key(3))
    nulls = int(jnp.sum(dropped.label == 10))
    sd = np.sqrt(n * 0.1 * 0.9)
    assert abs(nulls - 0.1 * n) < 4.5 * sd, nulls
    kept = np.asarray(dropped.label) != 10
    np.testing.assert_array_equal(np.asarray(dropped.label)[kept], np.asarray(c.label)[kept])
    again = conditioner.drop(c, jax.random.key(3))
    np.testing.assert_array_equal(again.label, dropped.label)  # same key, same drops
    assert Conditioner(num_classes=10, drop_prob=0.0).drop(c, jax.random.key(3)) is c


def test_changing_the_guidance_scale_never_recompiles(compiles):
    mesh = sharding.make_mesh(8)
    model = UNet(
        base_channels=8,
        channel_mults=(1,),
        num_res_blocks=1,
        attention_resolutions=(),
        mid_attention=False,
        num_groups=4,
        num_classes=3,
    )
    conditioner = Conditioner(num_classes=3, drop_prob=0.1)
    s = schedules.make_schedule("linear", 20)
    params = model.init(
        jax.random.key(0),
        jnp.zeros((1, 4, 4, 1)),
        jnp.zeros((1,), jnp.int32),
        conditioner.example(),
    )["params"]
    # Away from the zero-initialised output layer, so the label changes the prediction.
    leaves, tree = jax.tree.flatten(params)
    noise = [jax.random.normal(jax.random.key(i), a.shape) for i, a in enumerate(leaves)]
    params = tree.unflatten([a + 0.2 * n for a, n in zip(leaves, noise, strict=True)])
    fn = sampling.make_sample_fn(
        model, s, mesh, sampler="ddim", pred=UNCLIPPED, conditioner=conditioner
    )
    x_T = sampling.make_noise_fn(mesh, (8, 4, 4, 1))(jax.random.key(1))
    c = sharding.from_global(conditioner.labels(np.arange(8) % 3), sharding.batch_sharded(mesh))
    table = samplers.timestep_table(20, 5, "uniform", 20)
    run = lambda w, phi=0.0: np.asarray(
        fn(params, x_T, c, jax.random.key(2), table, 5, 0.0, w, guidance_rescale=phi)
    )
    outs = {1.0: run(1.0)}
    with compiles.none_expected("another guidance scale or rescale"):
        for w in (0.0, 2.0, 5.0):
            outs[w] = run(w)
        outs["rescaled"] = run(5.0, 0.5)
    assert not np.allclose(outs[2.0], outs[5.0]) and not np.allclose(outs[5.0], outs["rescaled"])
