"""Reverse-process sampler steps and one compiled loop per sampler."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffjax import schedules

Array = jnp.ndarray
DenoiseFn = Callable[[Array, Array], Array]

VARIANCES = ("beta", "posterior")


def reverse_log_variance(s: schedules.Schedule, t: Array, ndim: int, variance: str) -> Array:
    """log σ_t² of p(x_{t-1} | x_t) for a fixed variance (DDPM §3.2).

    "beta": σ_t² = β_t (optimal for x_0 ~ N(0, I)); its first entry is replaced by β̃ of the second
    step, as in DDPM's reference code, so the last step does not add noise of variance β_1 on top of
    a data-scale image. "posterior": σ_t² = β̃_t (optimal for a point mass x_0), log clipped at t=0.
    """
    if variance == "beta":
        log_var = jnp.log(jnp.concatenate([s.posterior_variance[1:2], s.betas[1:]]))
    elif variance == "posterior":
        log_var = s.posterior_log_variance_clipped
    else:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
    return schedules.extract(log_var, t, ndim)


def ancestral_step(s: schedules.Schedule, prediction: Array, x_t: Array, t: Array, noise: Array,
                   *, target: str = "eps", variance: str = "beta",
                   clip_x0: bool = True) -> Array:
    """One DDPM step x_t → x_{t-1} ~ p(x_{t-1} | x_t) (DDPM Algorithm 2, via eq. 7's mean).

    Args:
      s: the noise schedule.
      prediction: the network output for (x_t, t), of kind `target`.
      x_t: [B, H, W, C]; t: [B] int32; noise: standard normal [B, H, W, C].
      target: what the network predicts, "eps", "x0" or "v".
      variance: "beta" or "posterior" (see `reverse_log_variance`).
      clip_x0: clip the implied x_0 to [-1, 1] before forming the posterior mean.
    """
    x0, _ = schedules.to_x0_eps(s, x_t, t, prediction.astype(x_t.dtype), target)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
    mean, _, _ = schedules.q_posterior(s, x0, x_t, t)
    log_var = reverse_log_variance(s, t, x_t.ndim, variance)
    nonzero = (t > 0).astype(x_t.dtype).reshape(t.shape + (1,) * (x_t.ndim - 1))
    return mean + nonzero * jnp.exp(0.5 * log_var) * noise


def ddpm_sample(denoise_fn: DenoiseFn, s: schedules.Schedule, x_T: Array, key: Array, *,
                target: str = "eps", variance: str = "beta", clip_x0: bool = True,
                progress: Callable[[Array], None] | None = None) -> Array:
    """Runs the whole T-step ancestral chain as one `lax.fori_loop`.

    Args:
      denoise_fn: `(x_t [B, H, W, C], t [B] int32) -> prediction`.
      s: the noise schedule.
      x_T: the starting noise [B, H, W, C].
      key: PRNG key; step i draws its noise from `fold_in(key, i)`.
      progress: optional host callback, called with the step index i after each step (through
        `jax.debug.callback`, so it may run once per device).

    Returns:
      x_0 samples [B, H, W, C] (float32; images in [-1, 1] when clip_x0).
    """
    def body(i, x):
        t = jnp.full(x.shape[:1], s.num_steps - 1 - i, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        x = ancestral_step(s, denoise_fn(x, t), x, t, noise, target=target, variance=variance,
                           clip_x0=clip_x0)
        if progress is not None:
            jax.debug.callback(progress, i)
        return x

    x0 = jax.lax.fori_loop(0, s.num_steps, body, x_T)
    return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0


SAMPLERS: dict[str, Callable[..., Array]] = {"ddpm": ddpm_sample}
