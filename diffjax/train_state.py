"""TrainState, the optimizer and the EMA: what a training run updates and checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from diffjax import losses, sharding
from diffjax.cond import NONE, Cond

Array = jnp.ndarray


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any
    ema_params: Any
    loss_history: losses.LossHistory  # per-t L_t history, for importance sampling of t


LR_SCHEDULES = ("constant", "cosine", "linear")


def learning_rate(
    lr: float,
    warmup_steps: int,
    schedule: str = "constant",
    decay_steps: int = 0,
    final_lr_ratio: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then constant (DDPM), or a cosine or linear decay that
    reaches `final_lr_ratio · lr` at step `decay_steps` (the run's last step) and stays there."""
    warmup = max(1, warmup_steps)
    ramp = optax.linear_schedule(0.0, lr, warmup)  # stays at lr after the warm-up
    if schedule == "constant":
        return ramp
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup, max(decay_steps, warmup + 1), end_value=final_lr_ratio * lr
        )
    if schedule == "linear":
        decay = optax.linear_schedule(lr, final_lr_ratio * lr, max(decay_steps - warmup, 1))
        return optax.join_schedules([ramp, decay], [warmup])
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {LR_SCHEDULES}")


def make_optimizer(
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    b1: float,
    b2: float,
    grad_clip: float,
    *,
    schedule: str = "constant",
    decay_steps: int = 0,
    final_lr_ratio: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW on `learning_rate(...)`, after global-norm gradient clipping (0 = no clipping)."""
    rate = learning_rate(lr, warmup_steps, schedule, decay_steps, final_lr_ratio)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.adamw(rate, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)


def make_init_fn(
    model: Any,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, ...],
    num_timesteps: int,
    example_cond: Cond = NONE,
    init_params: Callable[[Array], Any] | None = None,
) -> Callable[[Array], TrainState]:
    """`key -> TrainState` for a network called as `model(x [1, *image_shape], t [1], cond)`;
    `example_cond` is a batch-1 condition of the kind training feeds (e.g. `Cond(label=[0])`).
    `init_params` (`key -> params`) replaces that call for other networks (the autoencoder)."""

    def init(key):
        if init_params is not None:
            params = init_params(key)
        else:
            x = jnp.zeros((1, *image_shape), jnp.float32)
            params = model.init(key, x, jnp.zeros((1,), jnp.int32), example_cond)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=params,
            loss_history=losses.init_loss_history(num_timesteps),
        )

    return init


def abstract_train_state(
    model: Any,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, ...],
    mesh: jax.sharding.Mesh,
    *,
    num_timesteps: int,
    example_cond: Cond = NONE,
    init_params: Callable[[Array], Any] | None = None,
) -> TrainState:
    """Shapes, dtypes and shardings of the state, without allocating it (for restoring)."""
    init = make_init_fn(model, tx, image_shape, num_timesteps, example_cond, init_params)
    abstract = jax.eval_shape(init, jax.random.key(0))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        sharding.state_sharding(abstract, mesh),
    )


def create_train_state(
    model: Any,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, ...],
    key: Array,
    mesh: jax.sharding.Mesh,
    *,
    num_timesteps: int,
    example_cond: Cond = NONE,
    init_params: Callable[[Array], Any] | None = None,
) -> TrainState:
    """Initialises the state under jit, so every leaf is a global array with its sharding."""
    kw = dict(num_timesteps=num_timesteps, example_cond=example_cond, init_params=init_params)
    abstract = abstract_train_state(model, tx, image_shape, mesh, **kw)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    init = make_init_fn(model, tx, image_shape, num_timesteps, example_cond, init_params)
    return jax.jit(init, out_shardings=shardings)(key)


def update_ema(ema: Any, params: Any, step: Array, decay: float) -> Any:
    """One EMA update of the parameters with the warm-up of `ema_decay_at`."""
    d = ema_decay_at(step, decay)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def ema_decay_at(step: Array, decay: float) -> Array:
    """EMA decay with warm-up, min(decay, (1 + n) / (10 + n)), so early averages track the model."""
    n = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))
