"""Noise schedules as pytrees, and the closed-form forward process and posterior."""

from __future__ import annotations

import math
from collections.abc import Callable

import flax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray


# --- β sequences, computed in float64 NumPy ------------------------------------------------------


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM (Ho et al. 2020, §4): β linear from 1e-4 to 0.02 over T = 1000 steps.

    The endpoints are given for T = 1000 and rescaled by 1000 / T so that other T keep the same
    total amount of noise (Improved DDPM, Nichol & Dhariwal 2021, footnote to §3.2); for very
    small T the rescaled β are capped at 0.999.
    """
    scale = 1000.0 / num_steps
    betas = np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)
    return np.minimum(betas, 0.999)


def _betas_from_alpha_bar(
    alpha_bar: Callable[[np.ndarray], np.ndarray], num_steps: int, max_beta: float
) -> np.ndarray:
    # β_t = 1 - ᾱ(t/T) / ᾱ((t-1)/T), clipped to avoid a singularity at t = T (Improved DDPM eq. 17).
    t = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    a = alpha_bar(t)
    return np.minimum(1.0 - a[1:] / a[:-1], max_beta)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2)."""
    f = lambda u: np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return _betas_from_alpha_bar(lambda u: f(u) / f(0.0), num_steps, max_beta)


def scaled_linear_betas(
    num_steps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> np.ndarray:
    """Latent diffusion (Rombach et al. 2022): √β linear between √0.00085 and √0.012."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2


def sigmoid_betas(
    num_steps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> np.ndarray:
    """Sigmoid ᾱ schedule (Chen 2023, "On the importance of noise scheduling", Algorithm 1)."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    v_start, v_end = sig(start / tau), sig(end / tau)
    alpha_bar = lambda u: (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)
    return _betas_from_alpha_bar(alpha_bar, num_steps, max_beta)


SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "scaled_linear": scaled_linear_betas,
    "sigmoid": sigmoid_betas,
}


# --- the schedule pytree ------------------------------------------------------------------------


@flax.struct.dataclass
class Schedule:
    """Every per-step quantity of a discrete schedule, each an array [T] indexed by t = 0 … T-1.

    Index t here is the paper's step t + 1: x_t below means the latent after t + 1 noising steps,
    so `alpha_bar[0] = 1 - β_1` and `alpha_bar[T-1] = ᾱ_T`.
    """

    betas: Array
    alphas: Array
    alpha_bar: Array
    alpha_bar_prev: Array
    sqrt_alpha_bar: Array
    sqrt_one_minus_alpha_bar: Array
    log_snr: Array  # log(ᾱ / (1 - ᾱ)), VDM (Kingma et al. 2021) eq. 3.
    # log ᾱ from float64 as a float32 pair hi + lo (lo = the rounding error of hi; -inf at ᾱ = 0
    # has lo = 0): differences of nearby levels stay exact to ~1e-12, see `transition`.
    log_alpha_bar: Array
    log_alpha_bar_lo: Array
    posterior_variance: Array  # β̃_t, DDPM eq. 7.
    posterior_log_variance_clipped: Array  # log β̃_t with β̃_1 replaced by β̃_2 (β̃_1 = 0).
    posterior_mean_coef_x0: Array  # DDPM eq. 7, coefficient of x_0.
    posterior_mean_coef_xt: Array  # DDPM eq. 7, coefficient of x_t.

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales √ᾱ so that ᾱ_T = 0 while ᾱ_1 is unchanged (Lin et al. 2024, Algorithm 1).

    The last β becomes 1: x_T is pure noise, as at sampling time. ε-prediction is undefined there,
    so such schedules are meant for v (or x_0) prediction.
    """
    sqrt_ab = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    alpha_bar = ((sqrt_ab - last) * first / (first - last)) ** 2
    return 1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1])


def scale_snr(betas: np.ndarray, scale: float) -> np.ndarray:
    """The β's whose every step has `scale` times the SNR ᾱ / (1 - ᾱ) of the given ones.

    The shift of "simple diffusion" (Hoogeboom et al. 2023, §3.1: log-SNR + 2 log(s) with s < 1
    for larger images): ᾱ' = k·ᾱ / (1 + (k - 1)·ᾱ) keeps ᾱ' in [0, 1] and ᾱ_T = 0 where it was 0.
    """
    alpha_bar = np.cumprod(1.0 - np.asarray(betas, np.float64))
    shifted = scale * alpha_bar / (1.0 + (scale - 1.0) * alpha_bar)
    return 1.0 - shifted / np.append(1.0, shifted[:-1])


def schedule_from_betas(betas: np.ndarray, dtype=jnp.float32) -> Schedule:
    """Derives every schedule quantity from β in float64, then casts to `dtype`.

    0 < β < 1 everywhere, except that the last β may be 1 (a zero-terminal-SNR schedule).
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or np.any(betas <= 0) or np.any(betas[:-1] >= 1) or betas[-1] > 1:
        raise ValueError("betas must be a 1-D sequence with 0 < β < 1 (the last β may be 1)")
    alphas = 1.0 - betas
    alpha_bar = np.cumprod(alphas)
    alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
    post_var = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(betas)
    with np.errstate(divide="ignore"):  # log-SNR is -inf where ᾱ = 0 (zero terminal SNR)
        log_snr = np.log(alpha_bar) - np.log1p(-alpha_bar)
        # Σ log(1 - β) rather than log(Π(1 - β)): exact where ᾱ underflows too.
        log_ab = np.cumsum(np.log1p(-betas))
    log_ab_hi = log_ab.astype(np.float32)
    with np.errstate(invalid="ignore"):
        log_ab_lo = np.where(np.isfinite(log_ab), log_ab - log_ab_hi.astype(np.float64), 0.0)
    fields = dict(
        betas=betas,
        alphas=alphas,
        alpha_bar=alpha_bar,
        alpha_bar_prev=alpha_bar_prev,
        sqrt_alpha_bar=np.sqrt(alpha_bar),
        sqrt_one_minus_alpha_bar=np.sqrt(1.0 - alpha_bar),
        log_snr=log_snr,
        log_alpha_bar=log_ab_hi,
        log_alpha_bar_lo=log_ab_lo,
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef_x0=betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar),
        posterior_mean_coef_xt=(1.0 - alpha_bar_prev) * np.sqrt(alphas) / (1.0 - alpha_bar),
    )
    return Schedule(**{k: jnp.asarray(v, dtype=dtype) for k, v in fields.items()})


def make_schedule(
    name: str,
    num_steps: int = 1000,
    dtype=jnp.float32,
    *,
    zero_terminal_snr: bool = False,
    snr_scale: float = 1.0,
    **kwargs,
) -> Schedule:
    """Builds a named schedule ("linear", "cosine", "scaled_linear", "sigmoid").

    With `zero_terminal_snr`, the β's are rescaled so that ᾱ_T = 0 (`rescale_zero_terminal_snr`);
    then every step's SNR is multiplied by `snr_scale` (`scale_snr`; 1 = unchanged).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2, got {num_steps}")
    betas = SCHEDULES[name](num_steps, **kwargs)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    if snr_scale != 1.0:
        if not (math.isfinite(snr_scale) and snr_scale > 0):
            raise ValueError(f"snr_scale must be a positive number, got {snr_scale}")
        betas = scale_snr(betas, snr_scale)
    return schedule_from_betas(betas, dtype)


# --- the forward process, the posterior and the parameterizations --------------------------------


def extract(values: Array, t: Array, ndim: int) -> Array:
    """values[t] for t: [B], reshaped to [B, 1, …, 1] to broadcast against an ndim-array."""
    return values[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def q_mean_variance(s: Schedule, x0: Array, t: Array) -> tuple[Array, Array]:
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I), DDPM eq. 4. Returns (mean, variance)."""
    return extract(s.sqrt_alpha_bar, t, x0.ndim) * x0, extract(1.0 - s.alpha_bar, t, x0.ndim)


def q_sample(s: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """Draws x_t ~ q(x_t | x_0) in closed form: √ᾱ_t x_0 + √(1 - ᾱ_t) ε (DDPM eq. 4)."""
    return (
        extract(s.sqrt_alpha_bar, t, x0.ndim) * x0
        + extract(s.sqrt_one_minus_alpha_bar, t, x0.ndim) * noise
    )


def q_posterior(s: Schedule, x0: Array, x_t: Array, t: Array) -> tuple[Array, Array, Array]:
    """q(x_{t-1} | x_t, x_0), DDPM eqs. 6-7. Returns (mean, variance, clipped log-variance)."""
    mean = (
        extract(s.posterior_mean_coef_x0, t, x_t.ndim) * x0
        + extract(s.posterior_mean_coef_xt, t, x_t.ndim) * x_t
    )
    return (
        mean,
        extract(s.posterior_variance, t, x_t.ndim),
        extract(s.posterior_log_variance_clipped, t, x_t.ndim),
    )


def x0_from_eps(s: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
    """x_0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t, inverting DDPM eq. 4."""
    return (x_t - extract(s.sqrt_one_minus_alpha_bar, t, x_t.ndim) * eps) / extract(
        s.sqrt_alpha_bar, t, x_t.ndim
    )


def eps_from_x0(s: Schedule, x_t: Array, t: Array, x0: Array) -> Array:
    """ε = (x_t - √ᾱ_t x_0) / √(1 - ᾱ_t)."""
    return (x_t - extract(s.sqrt_alpha_bar, t, x_t.ndim) * x0) / extract(
        s.sqrt_one_minus_alpha_bar, t, x_t.ndim
    )


def v_from_x0_eps(s: Schedule, x0: Array, t: Array, eps: Array) -> Array:
    """v = √ᾱ_t ε - √(1 - ᾱ_t) x_0 (Salimans & Ho 2022, §4)."""
    return (
        extract(s.sqrt_alpha_bar, t, x0.ndim) * eps
        - extract(s.sqrt_one_minus_alpha_bar, t, x0.ndim) * x0
    )


def x0_from_v(s: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """x_0 = √ᾱ_t x_t - √(1 - ᾱ_t) v (Salimans & Ho 2022, §4; uses ᾱ + (1 - ᾱ) = 1)."""
    return (
        extract(s.sqrt_alpha_bar, t, x_t.ndim) * x_t
        - extract(s.sqrt_one_minus_alpha_bar, t, x_t.ndim) * v
    )


def eps_from_v(s: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """ε = √(1 - ᾱ_t) x_t + √ᾱ_t v."""
    return (
        extract(s.sqrt_one_minus_alpha_bar, t, x_t.ndim) * x_t
        + extract(s.sqrt_alpha_bar, t, x_t.ndim) * v
    )


PREDICTION_TARGETS = ("eps", "x0", "v")


def to_x0_eps(
    s: Schedule, x_t: Array, t: Array, prediction: Array, target: str
) -> tuple[Array, Array]:
    """Converts a network prediction of `target` ("eps", "x0" or "v") into (x_0, ε)."""
    if target == "eps":
        return x0_from_eps(s, x_t, t, prediction), prediction
    if target == "x0":
        return prediction, eps_from_x0(s, x_t, t, prediction)
    if target == "v":
        return x0_from_v(s, x_t, t, prediction), eps_from_v(s, x_t, t, prediction)
    raise ValueError(f"unknown prediction target {target!r}; choose one of {PREDICTION_TARGETS}")


def from_x0_eps(s: Schedule, x_t: Array, t: Array, x0: Array, eps: Array, target: str) -> Array:
    """The prediction of `target` that a consistent pair (x_0, ε) at (x_t, t) corresponds to."""
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    if target == "v":
        return v_from_x0_eps(s, x0, t, eps)
    raise ValueError(f"unknown prediction target {target!r}; choose one of {PREDICTION_TARGETS}")


# --- the reverse process p(x_{t-1} | x_t) --------------------------------------------------------

VARIANCES = ("beta", "posterior", "learned")


def log_alpha_bar_at(s: Schedule, t: Array) -> tuple[Array, Array]:
    """log ᾱ_t as the pair (hi, lo) at timesteps t (any shape); t = -1 is the clean image, 0."""
    inside = t >= 0
    index = jnp.maximum(t, 0)
    return (
        jnp.where(inside, s.log_alpha_bar[index], 0.0),
        jnp.where(inside, s.log_alpha_bar_lo[index], 0.0),
    )


def transition(s: Schedule, t: Array, t_s: Array) -> dict[str, Array]:
    """The one-jump process from timestep t down to t_s < t (t_s = -1: the clean image).

    With t_s = t - 1 these are the schedule's β, β̃ and eq. 7 coefficients; for a sub-sequence of
    steps they are the respaced chain of Improved DDPM (§4: β = 1 - ᾱ_t / ᾱ_s), where ᾱ_s = 1 at
    the clean image and β̃ = 0. Written without the float32 cancellation of 1 - ᾱ_t / ᾱ_s and
    1 - ᾱ near t = 0: β = -expm1(log ᾱ_t - log ᾱ_s) from the (hi, lo) log ᾱ held since the
    schedule was built in float64, and 1 - ᾱ = -expm1(log ᾱ), so every coefficient keeps its
    float32 relative precision (the plain formulas lose up to 4e-4 relative at small t).

    Returns:
      beta, posterior_variance (β̃), coef_x0 and coef_xt of the posterior mean (DDPM eq. 7),
      sqrt_alpha_bar_s and one_minus_alpha_bar_s (1 - ᾱ_s), each shaped like t.
    """
    hi_t, lo_t = log_alpha_bar_at(s, t)
    hi_s, lo_s = log_alpha_bar_at(s, t_s)
    log_ratio = (hi_t - hi_s) + (lo_t - lo_s)  # log(ᾱ_t / ᾱ_s) ≤ 0
    beta = -jnp.expm1(log_ratio)
    one_minus_t = -jnp.expm1(hi_t + lo_t)
    one_minus_s = -jnp.expm1(hi_s + lo_s)
    sqrt_ab_s = jnp.exp(0.5 * (hi_s + lo_s))
    return dict(
        beta=beta,
        posterior_variance=beta * one_minus_s / one_minus_t,
        coef_x0=beta * sqrt_ab_s / one_minus_t,
        coef_xt=one_minus_s * jnp.exp(0.5 * log_ratio) / one_minus_t,
        sqrt_alpha_bar_s=sqrt_ab_s,
        one_minus_alpha_bar_s=one_minus_s,
    )


def interpolate_log_variance(v: Array, log_beta_tilde: Array, log_beta: Array) -> Array:
    """Improved DDPM eq. 15: log Σ = u log β + (1 - u) log β̃ with u = (v + 1) / 2, v ∈ [-1, 1]."""
    u = (v + 1.0) / 2.0
    return u * log_beta + (1.0 - u) * log_beta_tilde


def select_log_variance(
    variance: str, log_beta: Array, log_beta_tilde: Array, v: Array | None = None
) -> Array:
    """log σ² of a reverse step: β ("beta"), β̃ ("posterior"), or between them by v ("learned")."""
    if variance == "beta":
        return log_beta
    if variance == "posterior":
        return log_beta_tilde
    if variance == "learned":
        if v is None:
            raise ValueError("variance='learned' needs the network's variance output v")
        return interpolate_log_variance(v, log_beta_tilde, log_beta)
    raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")


def model_log_variance(
    s: Schedule, t: Array, ndim: int, variance: str, v: Array | None = None
) -> Array:
    """log σ_t² of the model's p(x_{t-1} | x_t) (DDPM §3.2, Improved DDPM §3.1).

    "beta": σ_t² = β_t (optimal for x_0 ~ N(0, I)); its first entry is replaced by β̃ of the second
    step, as in DDPM's reference code, so the decoder at t = 0 does not get the variance of a
    data-scale image. "posterior": σ_t² = β̃_t (optimal for a point mass x_0), log clipped at t = 0.
    "learned": interpolated between the two by the network's extra output `v` [B, H, W, C].
    """
    # Fixed β: the first entry replaced (see above); learned: between the true β_t and β̃_t.
    betas = (
        s.betas
        if variance == "learned"
        else jnp.concatenate([s.posterior_variance[1:2], s.betas[1:]])
    )
    return select_log_variance(
        variance,
        extract(jnp.log(betas), t, ndim),
        extract(s.posterior_log_variance_clipped, t, ndim),
        v,
    )


def split_prediction(prediction: Array, learned_variance: bool) -> tuple[Array, Array | None]:
    """A network output [B, H, W, 2C] with learned variances → (prediction, v); else (out, None)."""
    if not learned_variance:
        return prediction, None
    pred, v = jnp.split(prediction, 2, axis=-1)
    return pred, v
