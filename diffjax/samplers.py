"""Reverse-process samplers: pure step functions and one compiled-once loop per sampler.

Every sampler walks a padded table of timesteps, so the number of steps, their spacing and η are
traced values: one compiled program serves them all (up to the table's size). A table may also
go back up (RePaint's jumps): such a move re-noises x without a network call. An optional
per-move `hook(x, t, key) -> x` (an edit's known region) runs inside the compiled loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import schedules
from diffjax.cond import Cond

Array = jnp.ndarray
DenoiseFn = Callable[[Array, Array, Cond], Array]
# After every move to level t (-1: the clean image): `x ← hook(x, t, key)`.
Hook = Callable[[Array, Array, Array], Array]

FIXED_VARIANCES = ("beta", "posterior")  # for models without learned variances
SPACINGS = ("uniform", "trailing", "leading")
# ᾱ is floored here where a sampler divides by it (a zero-terminal-SNR schedule has ᾱ_T = 0).
MIN_ALPHA_BAR = 2.0**-24


# --- which timesteps ----------------------------------------------------------------------------


def timesteps(
    num_train_steps: int, steps: int, spacing: str = "uniform", offset: int = 0
) -> np.ndarray:
    """The `steps` timesteps a sampler visits, in decreasing order (indices into the schedule).

    "uniform": evenly from T-1 down to 0, both included (Improved DDPM §4).
    "trailing": T-1, T-1-T/n, … (Lin et al. 2024, Table 2): starts at T-1, never reaches 0.
    "leading": 0, T/n, … reversed (DDIM, Stable Diffusion): ends at 0, never reaches T-1; with
    `offset` k, every one is k later (Stable Diffusion's schedulers have k = 1).
    """
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps must be in [1, {num_train_steps}] (the schedule's T), got {steps}")
    if spacing == "uniform":
        t = (
            np.round(np.linspace(num_train_steps - 1, 0, steps))
            if steps > 1
            else [num_train_steps - 1]
        )
    elif spacing == "trailing":
        t = np.round(num_train_steps - np.arange(steps) * (num_train_steps / steps)) - 1
    elif spacing == "leading":
        t = (np.arange(steps) * (num_train_steps // steps))[::-1] + offset
        if t[0] >= num_train_steps:
            raise ValueError(f"offset={offset} moves leading timesteps past T-1")
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    return np.asarray(t, np.int32)


def timestep_table(
    num_train_steps: int,
    steps: int,
    spacing: str = "uniform",
    max_steps: int | None = None,
    *,
    offset: int = 0,
    alpha_to_one: bool = True,
) -> np.ndarray:
    """`timesteps` followed by -1 (the clean image, ᾱ = 1), padded with -1 to `max_steps + 1`
    entries. With `alpha_to_one=False` the last move lands on timestep 0 (ᾱ_0 < 1) instead, as
    diffusers' DDIM does with `set_alpha_to_one=False` (Stable Diffusion's scheduler).

    The compiled samplers take this table and `steps` as traced arguments.
    """
    max_steps = max_steps or steps
    if steps > max_steps:
        raise ValueError(f"steps={steps} exceeds the compiled sampler's max_steps={max_steps}")
    table = np.full(max_steps + 1, -1, np.int32)
    table[:steps] = timesteps(num_train_steps, steps, spacing, offset)
    if not alpha_to_one:
        table[steps] = 0
    return table


def start_at(table: np.ndarray, num_steps: int, start: int) -> tuple[np.ndarray, np.int32]:
    """The table and step count of a run that skips its first `start` steps (same size, so the
    same compiled sampler): the chain then starts at `table[start]`, from an x_T noised to that
    level (e.g. `schedules.q_sample` of an image), as SDEdit-style edits do."""
    if not 0 <= start < num_steps:
        raise ValueError(f"start must be in [0, {num_steps}), got {start}")
    rest = np.full_like(table, -1)
    rest[: len(table) - start] = table[start:]
    return rest, np.int32(num_steps - start)


def _alpha_bar(s: schedules.Schedule, t: Array) -> Array:
    """ᾱ at a timestep of the table, with ᾱ = 1 at t = -1 (the clean image)."""
    return jnp.where(t >= 0, s.alpha_bar[jnp.maximum(t, 0)], 1.0)


# --- reading the network ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prediction:
    """How to read the network's output.

    target: what it predicts, "eps", "x0" or "v".
    learned_variance: it outputs 2C channels, the second half the variance interpolant v.
    clip_x0: clip the implied x_0 to [-1, 1] at every step.
    dynamic_threshold: if > 0, Imagen's dynamic thresholding (Saharia et al. 2022, §2.3) at this
      percentile of |x_0| per image, instead of the plain clip.
    """

    target: str = "eps"
    learned_variance: bool = False
    clip_x0: bool = True
    dynamic_threshold: float = 0.0


EPS_CLIPPED = Prediction()  # the defaults: ε-prediction, x_0 clipped to [-1, 1]
EPS_UNCLIPPED = Prediction(clip_x0=False)


def threshold_x0(x0: Array, clip_x0: bool, dynamic_threshold: float) -> Array:
    """Clips x_0 [B, ...] to [-1, 1], or to [-q, q] then / q with q the per-image percentile."""
    if dynamic_threshold > 0:
        flat = jnp.abs(x0).reshape(x0.shape[0], -1)
        q = jnp.maximum(jnp.quantile(flat, dynamic_threshold, axis=1), 1.0)
        q = q.reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -q, q) / q
    return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0


def predict(
    denoise_fn: DenoiseFn, s: schedules.Schedule, x: Array, t: Array, cond: Cond, pred: Prediction
) -> tuple[Array, Array, Array | None]:
    """One network call at timestep t (a scalar) under `cond`: (x̂_0, ε̂, v or None), x̂_0
    thresholded.

    After thresholding, ε̂ is recomputed from x̂_0, so every update stays on the line through x_t.
    """
    tb = jnp.full(x.shape[:1], t, jnp.int32)
    out, v = schedules.split_prediction(
        denoise_fn(x, tb, cond).astype(x.dtype), pred.learned_variance
    )
    x0, eps = schedules.to_x0_eps(s, x, tb, out, pred.target)
    if pred.clip_x0 or pred.dynamic_threshold > 0:
        x0 = threshold_x0(x0, pred.clip_x0, pred.dynamic_threshold)
        eps = schedules.eps_from_x0(s, x, tb, x0)
    return x0, eps, v


# --- pure step functions, x_t → x_s between the noise levels ᾱ_t < ᾱ_s ---------------------------


def ancestral_step(
    x: Array,
    x0: Array,
    c: dict[str, Array],
    noise: Array,
    *,
    variance: str = "beta",
    v: Array | None = None,
) -> Array:
    """x_s ~ p(x_s | x_t) = N(posterior mean given x̂_0, σ²) (DDPM Algorithm 2 via eq. 7).

    `c` is the jump's `schedules.transition(s, t, t_s)`: for a sub-sequence of steps its β and β̃
    are recomputed from ᾱ (Improved DDPM §4). σ² is β ("beta"), β̃ ("posterior"), or
    interpolated by the network's v ("learned"). No noise is added on the jump to the clean
    image (ᾱ_s = 1).
    """
    mean = c["coef_x0"] * x0 + c["coef_xt"] * x
    log_var = schedules.select_log_variance(
        variance, jnp.log(c["beta"]), jnp.log(jnp.maximum(c["posterior_variance"], 1e-20)), v
    )
    noisy = c["one_minus_alpha_bar_s"] > 0.0
    return jnp.where(noisy, mean + jnp.exp(0.5 * log_var) * noise, mean)


def ddim_step(x0: Array, eps: Array, c: dict[str, Array], eta: Array, noise: Array) -> Array:
    """DDIM (Song et al. 2021, eq. 12): x_s = √ᾱ_s x̂_0 + √(1 - ᾱ_s - σ²) ε̂ + σ z, with
    σ = η √((1 - ᾱ_s)/(1 - ᾱ_t)) √(1 - ᾱ_t/ᾱ_s) = η √β̃ of the jump (eq. 16; `c` is
    `schedules.transition(s, t, t_s)`). η = 0 is deterministic."""
    sigma = eta * jnp.sqrt(c["posterior_variance"])
    direction = jnp.sqrt(jnp.maximum(c["one_minus_alpha_bar_s"] - sigma**2, 0.0)) * eps
    return c["sqrt_alpha_bar_s"] * x0 + direction + sigma * noise


def dpm_solver_pp_step(x: Array, d: Array, ab_t: Array, ab_s: Array) -> Array:
    """The DPM-Solver++ update (Lu et al. 2022, eq. 8) with data prediction d:
    x_s = (σ_s/σ_t) x_t - α_s (e^{-h} - 1) d, written through e^{-h} = α_t σ_s / (σ_t α_s) so that
    σ_s = 0 (the clean image) and α_t = 0 (zero terminal SNR) stay finite."""
    a_t, a_s = jnp.sqrt(ab_t), jnp.sqrt(ab_s)
    sig_t, sig_s = jnp.sqrt(1.0 - ab_t), jnp.sqrt(1.0 - ab_s)
    return (sig_s / sig_t) * x + (a_s - a_t * sig_s / sig_t) * d


def half_log_snr(ab: Array) -> Array:
    """λ = log(α/σ), DPM-Solver's time variable; finite for ᾱ in [MIN_ALPHA_BAR, 1)."""
    ab = jnp.clip(ab, MIN_ALPHA_BAR, 1.0 - 1e-7)
    return 0.5 * (jnp.log(ab) - jnp.log1p(-ab))


def dpm_solver_pp_2m_data(
    x0: Array, x0_prev: Array, lam_prev: Array, lam_t: Array, lam_s: Array
) -> Array:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): D = (1 + 1/2r) x̂_0 - (1/2r) x̂_0,prev with
    r = h_prev / h; this D goes into `dpm_solver_pp_step` in place of x̂_0."""
    r = (lam_t - lam_prev) / (lam_s - lam_t)
    return (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev


def sigma_edm(ab: Array) -> Array:
    """EDM's noise level σ = √((1 - ᾱ)/ᾱ) for the variance-preserving x = √ᾱ (y), y = x0 + σ n."""
    ab = jnp.maximum(ab, MIN_ALPHA_BAR)
    return jnp.sqrt((1.0 - ab) / ab)


# --- the compiled loops -------------------------------------------------------------------------


def _levels(s: schedules.Schedule, table: Array, i: Array):
    table = jnp.asarray(table)
    t, t_next = table[i], table[i + 1]
    return t, t_next, _alpha_bar(s, t), _alpha_bar(s, t_next)


def renoise(s: schedules.Schedule, x: Array, t: Array, t_up: Array, noise: Array) -> Array:
    """x_t → x_{t_up}, a noisier level, drawn from q(x_{t_up} | x_t) = N(√(ᾱ_up/ᾱ_t) x_t,
    (1 - ᾱ_up/ᾱ_t) I): the forward chain's steps t+1 … t_up composed (DDPM eq. 2); RePaint's
    jump back (Lugmayr et al. 2022, §4.2) in one move."""
    ratio = _alpha_bar(s, t_up) / _alpha_bar(s, t)
    return jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * noise


@dataclasses.dataclass(frozen=True)
class _Carry:
    """How a sampler's loop carry holds x: `get`, `put` (after a step), `jumped` (after a jump
    back up: a multistep sampler forgets its history there)."""

    get: Callable = lambda c: c
    put: Callable = lambda c, x: x
    jumped: Callable = lambda c, x: x


def _loop(
    body: Callable,
    n: Array,
    init,
    progress: Callable[[Array], None] | None,
    s: schedules.Schedule,
    table: Array,
    key: Array,
    hook: Hook | None = None,
    jumps: bool = False,
    carry: _Carry = _Carry(),
):
    """Runs `body(i, carry)` for the table's moves i < n; with `jumps`, a move up the table (a
    noisier next level) re-noises x instead (no network call; without, tables only go down and
    the program is smaller); then the hook, then the progress callback.

    Move i draws from `fold_in(key, i)`: the sampler's own noise from it, the jump's and the
    hook's from its fold_in with 1 and 2, so edits leave the sampler's noise unchanged.
    """
    table = jnp.asarray(table)

    def jump(i, c):
        noise_key = jax.random.fold_in(jax.random.fold_in(key, i), 1)
        x = carry.get(c)
        noise = jax.random.normal(noise_key, x.shape, x.dtype)
        return carry.jumped(c, renoise(s, x, table[i], table[i + 1], noise))

    def move(i, c):
        c = jax.lax.cond(table[i + 1] > table[i], jump, body, i, c) if jumps else body(i, c)
        if hook is not None:
            hook_key = jax.random.fold_in(jax.random.fold_in(key, i), 2)
            c = carry.put(c, hook(carry.get(c), table[i + 1], hook_key))
        return c

    return jax.lax.fori_loop(0, n, _with_progress(move, progress), init)


def _finish(x: Array, pred: Prediction) -> Array:
    return jnp.clip(x, -1.0, 1.0) if (pred.clip_x0 or pred.dynamic_threshold > 0) else x


def ddpm_sample(
    denoise_fn: DenoiseFn,
    s: schedules.Schedule,
    x_T: Array,
    cond: Cond,
    key: Array,
    table: Array,
    num_steps: Array,
    *,
    eta: Array = 0.0,
    variance: str = "beta",
    pred: Prediction = EPS_CLIPPED,
    progress: Callable[[Array], None] | None = None,
    hook: Hook | None = None,
    jumps: bool = False,
) -> Array:
    """The ancestral sampler (DDPM), on the full chain or a respaced sub-sequence.

    Args (shared by every sampler in SAMPLERS):
      denoise_fn: `(x_t [B, H, W, C], t [B] int32, cond) -> network output` (a guided one from
        `guidance` works the same).
      s: the noise schedule.
      x_T: the start [B, H, W, C]: pure noise at the table's first level, or an image noised to
        that level (`start_at` cuts a table to begin lower, for img2img-style edits).
      cond: the condition (`cond.Cond`), passed to every network call untouched.
      key: PRNG key; step i draws its noise from `fold_in(key, i)`.
      table: [M + 1] int32 from `timestep_table`; num_steps: int32 ≤ M, traced.
      eta: DDIM's η (traced; only DDIM reads it).
      variance: "beta" or "posterior" for fixed-variance models (ignored with learned variances;
        only this ancestral sampler uses the variance: the others are mean-only).
      pred: how to read the network output (`Prediction`).
      progress: optional host callback, called with the step index after each step (through
        `jax.debug.callback`, so it may run once per device).
      hook: optional `(x, t, key) -> x`, applied after every move to level t (t = -1: the
        clean image), inside the compiled loop: an edit's replacement of the known region.
      jumps: the table may go back up (`editing.repaint_table`): such a move re-noises x
        (`renoise`) with no network call.

    Returns:
      x_0 samples [B, H, W, C] (images in [-1, 1] when clipping or thresholding).
    """
    variance = "learned" if pred.learned_variance else variance

    def body(i, x):
        t, t_next, _, _ = _levels(s, table, i)
        x0, _, v = predict(denoise_fn, s, x, t, cond, pred)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        c = schedules.transition(s, t, t_next)
        return ancestral_step(x, x0, c, noise, variance=variance, v=v)

    return _finish(_loop(body, num_steps, x_T, progress, s, table, key, hook, jumps), pred)


def ddim_sample(
    denoise_fn: DenoiseFn,
    s: schedules.Schedule,
    x_T: Array,
    cond: Cond,
    key: Array,
    table: Array,
    num_steps: Array,
    *,
    eta: Array = 0.0,
    variance: str = "beta",
    pred: Prediction = EPS_CLIPPED,
    progress: Callable[[Array], None] | None = None,
    hook: Hook | None = None,
    jumps: bool = False,
) -> Array:
    """DDIM with η ∈ [0, 1] (η = 0: the deterministic, invertible sampler). See `ddpm_sample`."""

    def body(i, x):
        t, t_next, _, _ = _levels(s, table, i)
        x0, eps, _ = predict(denoise_fn, s, x, t, cond, pred)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return ddim_step(x0, eps, schedules.transition(s, t, t_next), eta, noise)

    return _finish(_loop(body, num_steps, x_T, progress, s, table, key, hook, jumps), pred)


def dpm_solver_pp_sample(
    denoise_fn: DenoiseFn,
    s: schedules.Schedule,
    x_T: Array,
    cond: Cond,
    key: Array,
    table: Array,
    num_steps: Array,
    *,
    eta: Array = 0.0,
    variance: str = "beta",
    pred: Prediction = EPS_CLIPPED,
    progress: Callable[[Array], None] | None = None,
    hook: Hook | None = None,
    jumps: bool = False,
) -> Array:
    """DPM-Solver++(2M): second-order multistep on data predictions; first order on the first
    step (no history yet) and on the last (the jump to σ = 0, where r = 0). Deterministic; one
    network call per step. See `ddpm_sample` for the arguments."""

    def body(i, carry):
        x, x0_prev, ab_prev = carry
        t, t_next, ab_t, ab_s = _levels(s, table, i)
        x0, _, _ = predict(denoise_fn, s, x, t, cond, pred)
        # After a step from SNR 0 (zero terminal SNR) λ_prev = -∞, so r = ∞ and D = x̂_0:
        # first order again.
        second = (i > 0) & (t_next >= 0) & (ab_prev > 0)
        lams = (half_log_snr(ab_prev), half_log_snr(ab_t), half_log_snr(ab_s))
        d = jnp.where(second, dpm_solver_pp_2m_data(x0, x0_prev, *lams), x0)
        return dpm_solver_pp_step(x, d, ab_t, ab_s), x0, ab_t

    init = (x_T, jnp.zeros_like(x_T), jnp.zeros((), x_T.dtype))
    carry = _Carry(
        get=lambda c: c[0],
        put=lambda c, x: (x, c[1], c[2]),
        jumped=lambda c, x: (x, c[1], jnp.zeros_like(c[2])),  # ᾱ_prev = 0: first order next
    )
    x, _, _ = _loop(body, num_steps, init, progress, s, table, key, hook, jumps, carry)
    return _finish(x, pred)


def heun_sample(
    denoise_fn: DenoiseFn,
    s: schedules.Schedule,
    x_T: Array,
    cond: Cond,
    key: Array,
    table: Array,
    num_steps: Array,
    *,
    eta: Array = 0.0,
    variance: str = "beta",
    pred: Prediction = EPS_CLIPPED,
    progress: Callable[[Array], None] | None = None,
    hook: Hook | None = None,
    jumps: bool = False,
) -> Array:
    """Heun's 2nd-order method on the probability-flow ODE dy/dσ = ε̂ (Karras et al. 2022,
    Algorithm 1 without churn), y = x/√ᾱ, σ = √((1-ᾱ)/ᾱ). The last step (to σ = 0) is an Euler
    step, so n steps cost 2n - 1 network calls. See `ddpm_sample` for the arguments."""

    def body(i, x):
        t, t_next, ab_t, ab_s = _levels(s, table, i)
        _, eps_t, _ = predict(denoise_fn, s, x, t, cond, pred)
        a_t, a_s = jnp.sqrt(jnp.maximum(ab_t, MIN_ALPHA_BAR)), jnp.sqrt(ab_s)
        y = x / a_t
        dsig = sigma_edm(ab_s) - sigma_edm(ab_t)
        y_euler = y + dsig * eps_t

        def correct(_):
            _, eps_s, _ = predict(denoise_fn, s, a_s * y_euler, t_next, cond, pred)
            return y + dsig * 0.5 * (eps_t + eps_s)

        y_next = jax.lax.cond(t_next >= 0, correct, lambda _: y_euler, None)
        return a_s * y_next

    return _finish(_loop(body, num_steps, x_T, progress, s, table, key, hook, jumps), pred)


SAMPLERS: dict[str, Callable[..., Array]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpm_solver_pp": dpm_solver_pp_sample,
    "heun": heun_sample,
}


def network_calls(sampler: str, steps: int) -> int:
    """Network evaluations per sample: `steps`, or 2·steps - 1 for Heun."""
    return 2 * steps - 1 if sampler == "heun" else steps


def ddim_invert(
    denoise_fn: DenoiseFn,
    s: schedules.Schedule,
    x0: Array,
    cond: Cond,
    table: Array,
    num_steps: Array,
    *,
    pred: Prediction = EPS_UNCLIPPED,
    progress: Callable[[Array], None] | None = None,
) -> Array:
    """DDIM inversion, image → noise: the η = 0 update run upwards through the same table.

    Each step x_a → x_b (ᾱ_b < ᾱ_a) evaluates the network at the target timestep b on x_a and
    applies x_b = √ᾱ_b x̂_0 + √(1 - ᾱ_b) ε̂ (the standard inversion; its error vanishes as the
    steps shrink). `ddim_sample` with η = 0 on the same table maps the result back to ≈ x0.

    Returns:
      x_T-like latents [B, H, W, C] at the table's first (noisiest) timestep.
    """
    table = jnp.asarray(table)
    raw = dataclasses.replace(pred, clip_x0=False, dynamic_threshold=0.0)

    def body(i, x):
        a, b = table[num_steps - i], table[num_steps - 1 - i]
        ab_a, ab_b = _alpha_bar(s, a), _alpha_bar(s, b)
        _, eps, _ = predict(denoise_fn, s, x, b, cond, raw)
        # x̂_0 at x's own level a (the network saw level b), then thresholded as `predict` would.
        x0_hat = threshold_x0(
            (x - jnp.sqrt(1.0 - ab_a) * eps) / jnp.sqrt(ab_a), pred.clip_x0, pred.dynamic_threshold
        )
        return jnp.sqrt(ab_b) * x0_hat + jnp.sqrt(1.0 - ab_b) * eps

    return jax.lax.fori_loop(0, num_steps, _with_progress(body, progress), x0)


def _with_progress(body: Callable, progress: Callable[[Array], None] | None) -> Callable:
    def wrapped(i, carry):
        carry = body(i, carry)
        if progress is not None:
            jax.debug.callback(progress, i)
        return carry

    return wrapped
