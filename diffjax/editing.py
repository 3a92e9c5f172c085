"""The pure math of edits: SDEdit's start, RePaint's replacement and jumps, masks, canvases,
and the diffusion classifier that reads an input's class for a conditional edit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import losses, samplers, schedules
from diffjax.cond import Cond

Array = jnp.ndarray
SIDES = ("left", "right", "top", "bottom")


# --- img2img (SDEdit, Meng et al. 2022) -----------------------------------------------------------


def sdedit_steps(num_steps: int, strength: float) -> int:
    """How many of the sampler's `num_steps` steps an edit at `strength` ∈ [0, 1] runs: the last
    round(strength · num_steps). 0 returns the input; all of them is plain sampling."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(
            f"strength must be in [0, 1] (0 keeps the input, 1 ignores it), got {strength}"
        )
    return int(round(strength * num_steps))


def sdedit_table(table: np.ndarray, num_steps: int, strength: float) -> tuple[np.ndarray, np.int32]:
    """The sampler's table cut to its last `sdedit_steps` moves (same size: same program), and
    how many moves that is. `strength` must leave at least one step (see `sdedit_steps`)."""
    run = sdedit_steps(num_steps, strength)
    return samplers.start_at(table, num_steps, num_steps - run)


def sdedit_start(s: schedules.Schedule, x0: Array, noise: Array, t: Array, full: Array) -> Array:
    """SDEdit's start x_t ~ q(x_t | x_0) (DDPM eq. 4) at the cut table's first level t; with
    `full` (strength 1) the start is the noise itself, so the edit is ordinary sampling from it.

    x0, noise: [B, H, W, C]; t: int32 scalar; full: bool scalar (both traced).
    """
    tb = jnp.full(x0.shape[:1], t, jnp.int32)
    return jnp.where(full, noise, schedules.q_sample(s, x0, tb, noise))


# --- inpainting: RePaint (Lugmayr et al. 2022) --------------------------------------------------


def replace_known(s: schedules.Schedule, args: dict) -> samplers.Hook:
    """RePaint's replacement (eq. 8) as a sampler hook: after every move to level t, the kept
    region becomes a fresh draw of q(x_t | known) and the rest stays the model's.

    args: {"known": [B, H, W, C] the image (in the model's space), "keep": [B, H, W, 1], 1 where
    the image is kept, 0 where it is regenerated}. At t = -1 the kept region is the image exactly.
    """
    known, keep = args["known"], args["keep"] > 0.5

    def hook(x, t, key):
        ab = jnp.where(t >= 0, s.alpha_bar[jnp.maximum(t, 0)], 1.0)
        noise = jax.random.normal(key, x.shape, x.dtype)
        x_known = jnp.sqrt(ab) * known + jnp.sqrt(1.0 - ab) * noise
        return jnp.where(keep, x_known.astype(x.dtype), x)

    return hook


def repaint_table(
    table: np.ndarray, num_steps: int, jump_length: int = 10, resamplings: int = 10
) -> tuple[np.ndarray, np.int32]:
    """RePaint's walk over a sampler's levels (its §4.2 resampling schedule): down one level at a
    time; on reaching every `jump_length`-th level (counted from the noisiest, the clean image
    excluded) it jumps back up `jump_length` levels, `resamplings - 1` times per such level.

    Args:
      table: a `samplers.timestep_table` (levels, then -1); num_steps: its moves.
      jump_length: j, levels per jump; resamplings: r, passes over each stretch (1: no jumps).

    Returns:
      (the walk as a table: levels, the final -1, padded with -1; the number of moves). The
      samplers re-noise on the moves up (`samplers.renoise`) and call the network on the rest:
      num_steps + (r - 1) · j · (jump points) calls.
    """
    if jump_length < 1 or resamplings < 1:
        raise ValueError(
            f"jump_length and resamplings must be ≥ 1, got {jump_length} and {resamplings}"
        )
    levels = np.asarray(table[: num_steps + 1])
    walk, p, jumps = [0], 0, {}
    while p < num_steps:
        p += 1
        walk.append(p)
        if p % jump_length == 0 and p < num_steps and jumps.get(p, 0) < resamplings - 1:
            jumps[p] = jumps.get(p, 0) + 1
            p -= jump_length
            walk.append(p)
    return levels[walk].astype(np.int32), np.int32(len(walk) - 1)


def network_calls(walk: np.ndarray, moves: int) -> int:
    """Network calls of a walk (its moves down; a move up is a re-noising)."""
    return int(np.sum(walk[1 : moves + 1] < walk[:moves]))


# --- the diffusion classifier (Li et al. 2023) ---------------------------------------------------


def classifier_timesteps(num_timesteps: int, trials: int) -> np.ndarray:
    """`trials` timesteps spread evenly over [0, T): the midpoints of equal strata. [N] int32."""
    if trials < 1:
        raise ValueError(f"the diffusion classifier needs trials >= 1, got {trials}")
    return ((np.arange(trials) + 0.5) * num_timesteps / trials).astype(np.int32)


def class_errors(
    denoise_fn: samplers.DenoiseFn,
    s: schedules.Schedule,
    x0: Array,
    cond: Cond,
    num_classes: int,
    ts: Array,
    key: Array,
    pred: samplers.Prediction,
) -> Array:
    """The diffusion classifier's errors (Li et al. 2023, eq. 4): for each class k, the mean
    over trials i of the per-pixel ‖ε_i − ε̂_θ(x_{t_i}, t_i, k)‖², where x_{t_i} = √ᾱ x_0 + √(1−ᾱ)
    ε_i (DDPM eq. 4). Every class sees the same (t_i, ε_i), so the differences between classes,
    which pick the class, carry little of the draws' noise. With uniform t this is the
    ε-objective, a weighting of −ELBO(x_0 | k): the least error is the model's reading of x_0's
    class, with no classifier beside it.

    x0: [B, H, W, C] in the diffusion space; cond: the other conditions (its label is replaced
    by each class in turn); ts: [N] int32 timesteps (`classifier_timesteps`); key: the ε draws;
    pred: how to read the network (unclipped, so ε̂ is the network's own).
    Returns: [B, K] mean errors.
    """
    classes = jnp.arange(num_classes, dtype=jnp.int32)

    def trial(total, i):
        noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape, x0.dtype)
        t = ts[i]
        x_t = schedules.q_sample(s, x0, jnp.full(x0.shape[:1], t), noise)

        def error(k):
            c = cond.replace(label=jnp.full(x0.shape[:1], k, jnp.int32))
            _, eps, _ = samplers.predict(denoise_fn, s, x_t, t, c, pred)
            return losses.mean_flat(jnp.square(noise - eps))

        return total + jax.lax.map(error, classes), None

    total, _ = jax.lax.scan(
        trial, jnp.zeros((num_classes, x0.shape[0]), x0.dtype), jnp.arange(len(ts))
    )
    return (total / len(ts)).T


# --- masks and canvases ---------------------------------------------------------------------------


def latent_keep(keep: np.ndarray, factor: int) -> np.ndarray:
    """A pixel mask [B, H, W, 1] (1 = keep) on the latent grid [B, H/f, W/f, 1]: a latent cell
    is kept only if all its pixels are (so no regenerated pixel is pinned by the known latents;
    the kept pixels are pasted back exactly after decoding)."""
    b, h, w, _ = keep.shape
    cells = keep.reshape(b, h // factor, factor, w // factor, factor, 1)
    return cells.min(axis=(2, 4)).astype(np.float32)


def parse_extend(spec: str) -> dict[str, int]:
    """ "left:16,right:16" → {"left": 16, "right": 16, "top": 0, "bottom": 0}."""
    out = dict.fromkeys(SIDES, 0)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        side, _, n = part.partition(":")
        if side not in SIDES or not n.strip().isdigit():
            raise ValueError(f"--extend: {part!r} is not SIDE:PIXELS with SIDE one of {SIDES}")
        out[side] += int(n)
    if not any(out.values()):
        raise ValueError("--extend: name at least one side to extend, e.g. left:16,right:16")
    return out


def extend_canvas(image: np.ndarray, extend: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """The image [H, W, C] on a larger canvas (new pixels 0, mid-grey in [-1, 1]) and the mask
    [H', W', 1] of what is kept (1: the original pixels)."""
    pad = ((extend["top"], extend["bottom"]), (extend["left"], extend["right"]), (0, 0))
    canvas = np.pad(image, pad)
    keep = np.pad(np.ones(image.shape[:2] + (1,), np.float32), pad)
    return canvas, keep


def window_starts(size: int, window: int) -> list[int]:
    """Offsets of windows of `window` pixels that cover `size`, overlapping by at least half."""
    if size < window:
        raise ValueError(f"a canvas of {size} pixels is smaller than the model's {window}")
    starts = list(range(0, size - window + 1, max(window // 2, 1)))
    return starts if starts[-1] == size - window else starts + [size - window]


def next_window(keep: np.ndarray, window: tuple[int, int]) -> tuple[int, int] | None:
    """The next window (top, left) to inpaint on a canvas whose kept/filled pixels are `keep`
    [H, W, 1]: of the windows with something left to fill, the one with the most known pixels
    (so each new stretch continues what is already there: seamless); None when all is filled."""
    h, w = window
    best, best_known = None, -1.0
    for top in window_starts(keep.shape[0], h):
        for left in window_starts(keep.shape[1], w):
            known = keep[top : top + h, left : left + w].mean()
            if known < 1.0 and known > best_known:
                best, best_known = (top, left), known
    return best
