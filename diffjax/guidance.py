"""Guidance as wrappers: each turns a conditional `denoise_fn(x_t, t, cond)` into a guided one.

Samplers and `samplers.ddim_invert` take the result like any other denoise_fn, so every sampler
is guided without an edit of its own. Scales are traced values: changing them never recompiles.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffjax import cond as cond_lib
from diffjax import schedules

Array = jnp.ndarray
DenoiseFn = Callable[[Array, Array, cond_lib.Cond], Array]


def combine(
    out_c: Array,
    out_u: Array,
    scale: Array,
    rescale: Array = 0.0,
    learned_variance: bool = False,
) -> Array:
    """ε̂ = ε̂_∅ + w (ε̂_c - ε̂_∅) (Ho & Salimans 2021, eq. 6) on the model's own target.

    The target conversions (ε ↔ x_0 ↔ v) are affine in the prediction with coefficients set by
    (x_t, t) alone, and the weights (1 - w, w) sum to one, so guiding ε, x_0 or v gives the same
    step. `rescale` φ > 0 (Lin et al. 2024, eqs. 15-16) pulls the guided output's per-example
    standard deviation back towards the conditional one: x = φ x_cfg σ_c / σ_cfg + (1 - φ) x_cfg.
    With learned variances the variance half comes from the conditional side.
    """
    pred_c, v = schedules.split_prediction(out_c, learned_variance)
    pred_u, _ = schedules.split_prediction(out_u, learned_variance)
    guided = pred_u + scale * (pred_c - pred_u)
    axes = tuple(range(1, guided.ndim))
    ratio = jnp.std(pred_c, axis=axes, keepdims=True) / jnp.maximum(
        jnp.std(guided, axis=axes, keepdims=True), 1e-12
    )
    guided = rescale * guided * ratio + (1.0 - rescale) * guided
    return guided if v is None else jnp.concatenate([guided, v], axis=-1)


def classifier_free(
    denoise_fn: DenoiseFn,
    null_cond: cond_lib.Cond,
    scale: Array,
    rescale: Array = 0.0,
    *,
    learned_variance: bool = False,
) -> DenoiseFn:
    """Classifier-free guidance of `denoise_fn` at strength w = `scale` (traced).

    The conditional and the null side run as **one** network call on the doubled batch
    [x_t; x_t] with [cond; null_cond]. `null_cond` is the unconditional condition for the same
    batch (`cond.null_like`), or a negative prompt's. w = 1 (without rescale) is the conditional
    model and w = 0 the unconditional one: those run at the plain batch (a `lax.switch`, so all
    three paths live in one compiled program and w stays traced).
    """

    def guided(x: Array, t: Array, c: cond_lib.Cond) -> Array:
        def doubled(_):
            both = cond_lib.concat_batch(c, null_cond)
            out = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
            out_c, out_u = jnp.split(out, 2)
            return combine(out_c, out_u, scale, rescale, learned_variance)

        branch = jnp.where(
            rescale > 0, 2, jnp.where(scale == 0, 0, jnp.where(scale == 1, 1, 2))
        ).astype(jnp.int32)
        return jax.lax.switch(
            branch,
            (lambda _: denoise_fn(x, t, null_cond), lambda _: denoise_fn(x, t, c), doubled),
            None,
        )

    return guided


def classifier(
    denoise_fn: DenoiseFn,
    grad_log_prob: Callable[[Array, Array, cond_lib.Cond], Array],
    s: schedules.Schedule,
    scale: Array,
    *,
    target: str = "eps",
    learned_variance: bool = False,
) -> DenoiseFn:
    """Classifier guidance (Dhariwal & Nichol 2021) at strength s = `scale` (traced).

    `grad_log_prob(x_t, t, cond)` is ∇_{x_t} log p_φ(y | x_t, t) for the labels in `cond`. The
    guided model predicts ε̂' = ε̂ - s √(1 - ᾱ_t) ∇ log p_φ(y | x_t) (their Algorithm 2): the score
    of p(x_t) p_φ(y | x_t)^s, so with s = 1 and the exact classifier every sampler draws from the
    class-conditional law. For the ancestral sampler this moves the mean by s β_t/√α_t ∇ log p_φ,
    their Algorithm 1's s Σ ∇ log p_φ with Σ = β_t up to the factor 1/√α_t → 1 as β_t → 0.
    """

    def guided(x: Array, t: Array, c: cond_lib.Cond) -> Array:
        out = denoise_fn(x, t, c)
        pred, v = schedules.split_prediction(out.astype(jnp.float32), learned_variance)
        x0, eps = schedules.to_x0_eps(s, x, t, pred, target)
        grad = grad_log_prob(x, t, c).astype(eps.dtype)
        eps = eps - scale * schedules.extract(s.sqrt_one_minus_alpha_bar, t, x.ndim) * grad
        pred = schedules.from_x0_eps(s, x, t, schedules.x0_from_eps(s, x, t, eps), eps, target)
        return pred if v is None else jnp.concatenate([pred, v], axis=-1)

    return guided


def log_prob_grad(
    logits_fn: Callable[[Array, Array], Array],
) -> Callable[[Array, Array, cond_lib.Cond], Array]:
    """∇_x log softmax(logits_fn(x, t))[y] for the labels y of the condition, per example."""

    def grad(x: Array, t: Array, c: cond_lib.Cond) -> Array:
        def total(x):
            logp = jax.nn.log_softmax(logits_fn(x, t).astype(jnp.float32), axis=-1)
            return jnp.sum(jnp.take_along_axis(logp, c.label[:, None], axis=-1))

        return jax.grad(total)(x)

    return grad
