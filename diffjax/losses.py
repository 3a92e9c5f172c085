"""Per-example diffusion losses [B]: the simple ε / x_0 / v loss, the VLB terms, bits/dim."""

from __future__ import annotations

import math
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from diffjax import schedules
from diffjax.cond import NONE, Cond

Array = jnp.ndarray
DenoiseFn = Callable[[Array, Array, Cond], Array]

LOSSES = ("simple", "hybrid", "vlb")
T_SAMPLING = ("uniform", "stratified", "importance")


def mean_flat(x: Array) -> Array:
    """The mean over every axis but the first: [B, ...] → [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# --- Gaussian helpers ---------------------------------------------------------------------------


def normal_kl(mean1: Array, log_var1: Array, mean2: Array, log_var2: Array) -> Array:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) elementwise, in nats."""
    return 0.5 * (
        log_var2
        - log_var1
        - 1.0
        + jnp.exp(log_var1 - log_var2)
        + jnp.square(mean1 - mean2) * jnp.exp(-log_var2)
    )


def discretized_gaussian_log_likelihood(
    x: Array, mean: Array, log_scale: Array, num_bins: int = 256
) -> Array:
    """log P(x) for data on `num_bins` levels in [-1, 1] under a Gaussian (DDPM eq. 13).

    Bin k covers x_k ± 1/(num_bins - 1); the first and last bins extend to -∞ and +∞, so the
    probabilities of the bins sum to 1. Elementwise, in nats.
    """
    half = 1.0 / (num_bins - 1)
    inv_std = jnp.exp(-log_scale)
    upper = inv_std * (x - mean + half)
    lower = inv_std * (x - mean - half)
    log_cdf_upper = log_ndtr(upper)
    log_sf_lower = log_ndtr(-lower)

    # log(Φ(upper) - Φ(lower)) = log a + log(1 - b/a), taking a, b from the tail the bin is in so
    # it stays accurate far from the mean; b/a ≤ 1 - 1e-12 floors a bin's mass at ~1e-12 · a.
    def log_diff(log_a, log_b):
        return log_a + jnp.log(-jnp.expm1(jnp.minimum(log_b - log_a, -1e-12)))

    mid = jnp.where(
        lower > 0,
        log_diff(log_sf_lower, log_ndtr(-upper)),
        log_diff(log_cdf_upper, log_ndtr(lower)),
    )
    edge = 1.0 - half
    return jnp.where(x < -edge, log_cdf_upper, jnp.where(x > edge, log_sf_lower, mid))


# --- the variational bound ----------------------------------------------------------------------


def vlb_term(
    s: schedules.Schedule,
    prediction: Array,
    x0: Array,
    x_t: Array,
    t: Array,
    *,
    target: str = "eps",
    variance: str = "beta",
    v: Array | None = None,
) -> Array:
    """L_t of the bound in bits/dim [B] (DDPM eq. 5, Improved DDPM eq. 4-6).

    For t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); for t = 0: the discretized Gaussian
    decoder's -log p(x_0 | x_1). `prediction` is the network's mean output of kind `target`;
    `v` its variance output when variance="learned". x_0 is not clipped here.
    """
    x0_hat, _ = schedules.to_x0_eps(s, x_t, t, prediction, target)
    model_mean, _, _ = schedules.q_posterior(s, x0_hat, x_t, t)
    model_log_var = schedules.model_log_variance(s, t, x_t.ndim, variance, v)
    true_mean, _, true_log_var = schedules.q_posterior(s, x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
    return jnp.where(t == 0, nll, kl) / math.log(2.0)


def prior_bpd(s: schedules.Schedule, x0: Array) -> Array:
    """KL(q(x_T | x_0) || N(0, I)) in bits/dim [B]: the bound's L_T, fixed by the schedule."""
    t = jnp.full(x0.shape[:1], s.num_steps - 1, jnp.int32)
    mean, var = schedules.q_mean_variance(s, x0, t)
    kl = normal_kl(mean, jnp.log(var), 0.0, 0.0)
    return mean_flat(kl) / math.log(2.0)


def bits_per_dim(
    s: schedules.Schedule,
    denoise_fn: DenoiseFn,
    x0: Array,
    key: Array,
    *,
    cond: Cond = NONE,
    target: str = "eps",
    variance: str = "beta",
    learned_variance: bool = False,
) -> dict[str, Array]:
    """The whole bound -log p(x_0) ≤ L_T + Σ_t L_t in bits/dim, with one x_t draw per t.

    Costs T network calls on the batch (a `lax.fori_loop` over t). Returns [B] arrays: "total",
    "prior" (L_T), "decoder" (L_0) and "kl" (Σ_{t>0} L_t).
    """

    def body(i, acc):
        t = jnp.full(x0.shape[:1], i, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape, x0.dtype)
        x_t = schedules.q_sample(s, x0, t, noise)
        pred, v = schedules.split_prediction(
            denoise_fn(x_t, t, cond).astype(jnp.float32), learned_variance
        )
        term = vlb_term(
            s,
            pred,
            x0,
            x_t,
            t,
            target=target,
            variance="learned" if learned_variance else variance,
            v=v,
        )
        return acc.at[jnp.minimum(i, 1)].add(term)

    acc = jax.lax.fori_loop(0, s.num_steps, body, jnp.zeros((2, x0.shape[0]), jnp.float32))
    prior = prior_bpd(s, x0)
    return {"total": prior + acc[0] + acc[1], "prior": prior, "decoder": acc[0], "kl": acc[1]}


# --- training losses ----------------------------------------------------------------------------


def regression_target(
    s: schedules.Schedule, x0: Array, t: Array, noise: Array, target: str
) -> Array:
    """What the network is trained to predict at (x_0, t, ε): ε, x_0 or v."""
    if target == "eps":
        return noise
    if target == "x0":
        return x0
    if target == "v":
        return schedules.v_from_x0_eps(s, x0, t, noise)
    raise ValueError(
        f"unknown prediction target {target!r}; choose one of {schedules.PREDICTION_TARGETS}"
    )


def min_snr_weight(s: schedules.Schedule, t: Array, target: str, gamma: float) -> Array:
    """Min-SNR-γ weights [B] (Hang et al. 2023, eq. 7 and §3.4): min(SNR, γ) in x_0-loss units.

    Expressed for the regression target: ε-loss × min(SNR, γ)/SNR, x_0-loss × min(SNR, γ),
    v-loss × min(SNR, γ)/(SNR + 1); weight 1 where SNR = 0. γ = 0 turns the weighting off.
    """
    if gamma <= 0:
        return jnp.ones(t.shape, jnp.float32)
    snr = jnp.exp(s.log_snr[t])
    clipped = jnp.minimum(snr, gamma)
    if target == "eps":
        weight = clipped / jnp.maximum(snr, 1e-30)
    elif target == "x0":
        weight = clipped
    else:
        weight = clipped / (snr + 1.0)
    # At SNR 0 (zero terminal SNR) the formula gives 0 for x_0 and v: keep that step trained.
    return jnp.where(snr > 0, weight, 1.0)


def training_losses(
    s: schedules.Schedule,
    denoise_fn: DenoiseFn,
    x0: Array,
    t: Array,
    noise: Array,
    *,
    cond: Cond = NONE,
    target: str = "eps",
    loss: str = "simple",
    learned_variance: bool = False,
    variance: str = "beta",
    vlb_weight: float = 0.001,
    min_snr_gamma: float = 0.0,
) -> dict[str, Array]:
    """The per-example training loss at given (t, ε), with its parts, each [B].

    "simple": L_simple (DDPM eq. 14) on `target`, optionally min-SNR-γ weighted.
    "hybrid": L_simple + λ L_vlb (Improved DDPM §3.1), the VLB term with a stop-gradient on the
      mean so it trains only the learned variance; L_vlb is estimated as T · L_t.
    "vlb": T · L_t alone, training mean and variance.

    Returns {"loss", "mse", "vlb"}; "vlb" is L_t in bits/dim (zero for "simple", not computed).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    x_t = schedules.q_sample(s, x0, t, noise)
    pred, v = schedules.split_prediction(
        denoise_fn(x_t, t, cond).astype(jnp.float32), learned_variance
    )
    err = pred - regression_target(s, x0, t, noise, target)
    mse = mean_flat(jnp.square(err)) * min_snr_weight(s, t, target, min_snr_gamma)
    if loss == "simple":
        return {"loss": mse, "mse": mse, "vlb": jnp.zeros_like(mse)}
    mean_pred = jax.lax.stop_gradient(pred) if loss == "hybrid" else pred
    vlb = vlb_term(
        s,
        mean_pred,
        x0,
        x_t,
        t,
        target=target,
        variance="learned" if learned_variance else variance,
        v=v,
    )
    total = mse + vlb_weight * s.num_steps * vlb if loss == "hybrid" else s.num_steps * vlb
    return {"loss": total, "mse": mse, "vlb": vlb}


def simple_loss(
    s: schedules.Schedule,
    denoise_fn: DenoiseFn,
    x0: Array,
    key: Array,
    target: str = "eps",
    cond: Cond = NONE,
) -> Array:
    """L_simple (DDPM eq. 14) on the chosen target, t ~ U{0, …, T-1}.

    Args:
      s: the noise schedule.
      denoise_fn: `(x_t [B, H, W, C], t [B] int32, cond) -> prediction [B, H, W, C]`.
      x0: clean images [B, H, W, C] in [-1, 1].
      key: PRNG key for t and ε.
      target: "eps", "x0" or "v".
      cond: the condition, passed to the network untouched.

    Returns:
      The per-example mean squared error, [B].
    """
    return random_t_losses(s, denoise_fn, x0, key, target=target, cond=cond)["loss"]


def random_t_losses(
    s: schedules.Schedule, denoise_fn: DenoiseFn, x0: Array, key: Array, **kwargs
) -> dict[str, Array]:
    """`training_losses` at t ~ U{0, …, T-1} and ε ~ N(0, I) drawn from `key`."""
    t_key, noise_key = jax.random.split(key)
    t = jax.random.randint(t_key, x0.shape[:1], 0, s.num_steps)
    noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    return training_losses(s, denoise_fn, x0, t, noise, **kwargs)


# --- importance sampling of t (Improved DDPM §3.3) ----------------------------------------------


@flax.struct.dataclass
class LossHistory:
    """The last K values of L_t seen for each t, kept in the train state and checkpointed."""

    values: Array  # [T, K] float32
    count: Array  # [T] int32: values ever recorded for each t


def init_loss_history(num_steps: int, size: int = 10) -> LossHistory:
    return LossHistory(
        values=jnp.zeros((num_steps, size), jnp.float32), count=jnp.zeros((num_steps,), jnp.int32)
    )


def sample_timesteps(
    key: Array,
    batch: int,
    history: LossHistory,
    method: str = "uniform",
    uniform_prob: float = 0.001,
) -> tuple[Array, Array]:
    """Draws t [B] and the loss weights [B] that keep the estimate of Σ_t L_t unbiased.

    "uniform": t ~ U{0, …, T-1}, weights 1. "stratified": the low-discrepancy draw of VDM
    (Kingma et al. 2021, §4.2): one u ~ U[0, 1) and t_i = ⌊T · ((u + i/B) mod 1)⌋, in a random
    order; each t_i is still uniform (weights 1), but the batch covers [0, T) evenly, so the
    batch's loss varies less from step to step. "importance": p_t ∝ √E[L_t²] over the history,
    mixed with `uniform_prob` of uniform, weights 1 / (T p_t); uniform until every t has K values.
    """
    num_steps, size = history.values.shape
    ones = jnp.ones((batch,), jnp.float32)
    if method == "uniform":
        return jax.random.randint(key, (batch,), 0, num_steps), ones
    if method == "stratified":
        u_key, perm_key = jax.random.split(key)
        u = jax.random.uniform(u_key, (), jnp.float32)
        frac = jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
        # frac · T can round up to T in float32 when frac is just below 1.
        t = jnp.minimum(jnp.floor(frac * num_steps).astype(jnp.int32), num_steps - 1)
        return jax.random.permutation(perm_key, t), ones
    if method != "importance":
        raise ValueError(f"unknown t sampling {method!r}; choose one of {T_SAMPLING}")
    p = jnp.sqrt(jnp.mean(jnp.square(history.values), axis=1))
    ready = jnp.all(history.count >= size) & (jnp.sum(p) > 0)
    p = jnp.where(ready, p / jnp.maximum(jnp.sum(p), 1e-30), 1.0 / num_steps)
    p = p * (1.0 - uniform_prob) + uniform_prob / num_steps
    t = jax.random.choice(key, num_steps, (batch,), p=p)
    return t.astype(jnp.int32), 1.0 / (num_steps * p[t])


def update_loss_history(history: LossHistory, t: Array, values: Array) -> LossHistory:
    """Appends each example's L_t to the ring buffer of its t (several examples may share a t)."""
    size = history.values.shape[1]
    same = t[:, None] == t[None, :]
    rank = jnp.sum(jnp.tril(same, k=-1), axis=1)  # earlier examples in this batch with this t
    slot = (history.count[t] + rank) % size
    values = history.values.at[t, slot].set(jax.lax.stop_gradient(values.astype(jnp.float32)))
    return LossHistory(values=values, count=history.count.at[t].add(1))
