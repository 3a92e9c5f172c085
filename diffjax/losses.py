"""Per-example diffusion losses [B]: the simple ε / x_0 / v regression loss."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffjax import schedules

Array = jnp.ndarray
DenoiseFn = Callable[[Array, Array], Array]


def regression_target(s: schedules.Schedule, x0: Array, t: Array, noise: Array,
                      target: str) -> Array:
    """What the network is trained to predict at (x_0, t, ε): ε, x_0 or v."""
    if target == "eps":
        return noise
    if target == "x0":
        return x0
    if target == "v":
        return schedules.v_from_x0_eps(s, x0, t, noise)
    raise ValueError(
        f"unknown prediction target {target!r}; choose one of {schedules.PREDICTION_TARGETS}")


def simple_loss(s: schedules.Schedule, denoise_fn: DenoiseFn, x0: Array, key: Array,
                target: str = "eps") -> Array:
    """L_simple (DDPM eq. 14) on the chosen target, t ~ U{0, …, T-1}.

    Args:
      s: the noise schedule.
      denoise_fn: `(x_t [B, H, W, C], t [B] int32) -> prediction [B, H, W, C]`.
      x0: clean images [B, H, W, C] in [-1, 1].
      key: PRNG key for t and ε.
      target: "eps", "x0" or "v".

    Returns:
      The per-example mean squared error, [B].
    """
    t_key, noise_key = jax.random.split(key)
    t = jax.random.randint(t_key, x0.shape[:1], 0, s.num_steps)
    noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    x_t = schedules.q_sample(s, x0, t, noise)
    prediction = denoise_fn(x_t, t).astype(jnp.float32)
    err = prediction - regression_target(s, x0, t, noise, target)
    return jnp.mean(jnp.square(err), axis=tuple(range(1, x0.ndim)))
