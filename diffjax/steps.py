"""TrainState and the compiled train, eval and sample steps, built from explicit arguments."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from diffjax import losses, samplers, schedules, sharding
from diffjax.models.unet import UNet

Array = jnp.ndarray


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any
    ema_params: Any
    loss_history: losses.LossHistory  # per-t L_t history, for importance sampling of t


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(
    lr: float,
    warmup_steps: int,
    schedule: str = "constant",
    decay_steps: int = 0,
    final_lr_ratio: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then constant (DDPM) or a cosine decay that reaches
    `final_lr_ratio · lr` at step `decay_steps` (the run's last step) and stays there."""
    warmup = max(1, warmup_steps)
    if schedule == "constant":
        return optax.linear_schedule(0.0, lr, warmup)
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup, max(decay_steps, warmup + 1), end_value=final_lr_ratio * lr
        )
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


def make_denoise_fn(
    model: UNet,
    params: Any,
    label: Array | None = None,
    *,
    train: bool = False,
    dropout_key: Array | None = None,
) -> Callable[[Array, Array], Array]:
    """The one callable where the network meets the math: (x_t, t) -> prediction."""
    rngs = {"dropout": dropout_key} if train else None
    return lambda x_t, t: model.apply(
        {"params": params}, x_t, t, label=label, train=train, rngs=rngs
    )


def _label(model: UNet, batch: dict) -> Array | None:
    """The batch's class labels when the model is class-conditional, else None."""
    return batch["label"] if model.num_classes else None


def _dummy_inputs(model: UNet, image_shape: tuple[int, ...]):
    x = jnp.zeros((1, *image_shape), jnp.float32)
    label = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    return x, jnp.zeros((1,), jnp.int32), label


def make_init_fn(
    model: UNet, tx: optax.GradientTransformation, image_shape: tuple[int, ...], num_timesteps: int
) -> Callable[[Array], TrainState]:
    def init(key):
        x, t, label = _dummy_inputs(model, image_shape)
        params = model.init(key, x, t, label=label)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=params,
            loss_history=losses.init_loss_history(num_timesteps),
        )

    return init


def abstract_train_state(
    model: UNet,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, ...],
    mesh: jax.sharding.Mesh,
    *,
    num_timesteps: int,
) -> TrainState:
    """Shapes, dtypes and shardings of the state, without allocating it (for restoring)."""
    abstract = jax.eval_shape(
        make_init_fn(model, tx, image_shape, num_timesteps), jax.random.key(0)
    )
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        sharding.state_sharding(abstract, mesh),
    )


def create_train_state(
    model: UNet,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, ...],
    key: Array,
    mesh: jax.sharding.Mesh,
    *,
    num_timesteps: int,
) -> TrainState:
    """Initialises the state under jit, so every leaf is a global array with its sharding."""
    abstract = abstract_train_state(model, tx, image_shape, mesh, num_timesteps=num_timesteps)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    return jax.jit(make_init_fn(model, tx, image_shape, num_timesteps), out_shardings=shardings)(
        key
    )


def ema_decay_at(step: Array, decay: float) -> Array:
    """EMA decay with warm-up, min(decay, (1 + n) / (10 + n)), so early averages track the model."""
    n = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


CPU_YNN_FUSION = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def compiler_options() -> dict | None:
    """XLA options for the compiled steps.

    On CPU, XLA 0.10 hands f32 convolutions to YNNPACK, whose weight-gradient convolution is ~3x
    slower than XLA's own. We keep YNNPACK for matrix products and reductions only (reductions
    without it are ~10x slower). DIFFJAX_CPU_YNN_FUSION overrides the list ("default" = XLA's own
    choice; experiments/bench/bench_unet.py --ynn-fusion compares). Other backends: no options.
    """
    value = os.environ.get("DIFFJAX_CPU_YNN_FUSION", CPU_YNN_FUSION)
    if jax.default_backend() != "cpu" or value == "default":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": value}


def make_train_step(
    model: UNet,
    schedule: schedules.Schedule,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    abstract_state: TrainState,
    *,
    target: str = "eps",
    ema_decay: float = 0.9999,
    t_sampling: str = "uniform",
    grad_accum_steps: int = 1,
    **loss_kwargs,
):
    """Builds the compiled step `(state, batch, key) -> (state, metrics)`.

    The batch is split over every device of the mesh, the state is laid out by
    `sharding.state_sharding` and donated; the step's randomness is `fold_in(key, state.step)`,
    so a resumed run draws the same keys. With `grad_accum_steps` = k the batch is processed as k
    microbatches in a `lax.scan` (activation memory of one microbatch) and their gradients
    averaged: the same update as one batch (exactly without dropout; dropout draws its masks per
    microbatch).
    `loss_kwargs` go to `losses.training_losses` (loss, learned_variance, variance, vlb_weight,
    min_snr_gamma).
    """
    batch_sh = sharding.batch_sharded(mesh)

    def grads_of(params, x0, t, noise, weights, label, dropout_key):
        def loss_fn(params):
            denoise = make_denoise_fn(model, params, label, train=True, dropout_key=dropout_key)
            terms = losses.training_losses(
                schedule, denoise, x0, t, noise, target=target, **loss_kwargs
            )
            return jnp.mean(weights * terms["loss"]), terms

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def accumulate(params, inputs, dropout_key):
        k = grad_accum_steps
        # Microbatch i takes every k-th example, so each microbatch stays spread over all devices.
        split = lambda a: jax.lax.with_sharding_constraint(
            jnp.swapaxes(a.reshape(a.shape[0] // k, k, *a.shape[1:]), 0, 1),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES)),
        )
        micro = jax.tree.map(split, inputs)

        def body(acc, xs):
            i, mb = xs
            (loss, terms), grads = grads_of(params, *mb, jax.random.fold_in(dropout_key, i))
            acc = jax.tree.map(jnp.add, acc, (loss, grads))
            return acc, terms

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        # XLA:CPU runs convolution gradients inside a loop body ~100x slower than outside one
        # (measured with jax 0.10), so on CPU the microbatches are unrolled: the same update at
        # full speed, but without the memory saving the loop gives on GPU and TPU.
        unroll = jax.default_backend() == "cpu"
        (loss, grads), terms = jax.lax.scan(body, zeros, (jnp.arange(k), micro), unroll=unroll)
        merge = lambda a: jnp.swapaxes(a, 0, 1).reshape(-1, *a.shape[2:])
        return (loss / k, jax.tree.map(merge, terms)), jax.tree.map(lambda g: g / k, grads)

    def step(state: TrainState, batch: dict, key: Array):
        t_key, noise_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step), 3)
        label, x0 = _label(model, batch), batch["image"]
        t, weights = losses.sample_timesteps(t_key, x0.shape[0], state.loss_history, t_sampling)
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        t, weights, noise = (
            jax.lax.with_sharding_constraint(a, batch_sh) for a in (t, weights, noise)
        )
        if grad_accum_steps > 1:
            (loss, terms), grads = accumulate(
                state.params, (x0, t, noise, weights, label), dropout_key
            )
        else:
            (loss, terms), grads = grads_of(state.params, x0, t, noise, weights, label, dropout_key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = ema_decay_at(state.step, ema_decay)
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
        history = state.loss_history
        if t_sampling == "importance":  # the only reader of the history
            history = losses.update_loss_history(history, t, terms["vlb"])
        new_state = TrainState(state.step + 1, params, opt_state, ema, history)
        return new_state, {
            "loss": loss,
            "mse": jnp.mean(terms["mse"]),
            "vlb": jnp.mean(terms["vlb"]),
            "grad_norm": optax.global_norm(grads),
        }

    state_sh = jax.tree.map(lambda a: a.sharding, abstract_state)
    rep = sharding.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(state_sh, batch_sh, rep),
        out_shardings=(state_sh, rep),
        donate_argnums=0,
        compiler_options=compiler_options(),
    )


def _params_sharding(params_sharding: Any, mesh: jax.sharding.Mesh) -> Any:
    """The parameters' shardings (a pytree, e.g. from `abstract_train_state(...).ema_params`), or
    replicated when None."""
    return sharding.replicated(mesh) if params_sharding is None else params_sharding


def make_eval_step(
    model: UNet,
    schedule: schedules.Schedule,
    mesh: jax.sharding.Mesh,
    *,
    target: str = "eps",
    params_sharding: Any = None,
    **loss_kwargs,
):
    """Compiled `(params, batch, key) -> per-example training loss [B]`, t uniform, batch split
    over the mesh. `loss_kwargs` as in `make_train_step`."""

    def step(params, batch, key):
        denoise = make_denoise_fn(model, params, _label(model, batch))
        return losses.random_t_losses(
            schedule, denoise, batch["image"], key, target=target, **loss_kwargs
        )["loss"]

    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(
        step,
        in_shardings=(_params_sharding(params_sharding, mesh), batch_sh, rep),
        out_shardings=batch_sh,
        compiler_options=compiler_options(),
    )


def make_bpd_step(
    model: UNet,
    schedule: schedules.Schedule,
    mesh: jax.sharding.Mesh,
    *,
    target: str = "eps",
    variance: str = "beta",
    learned_variance: bool = False,
    params_sharding: Any = None,
):
    """Compiled `(params, batch, key) -> {"total", "prior", "decoder", "kl"}`, each [B] bits/dim:
    the whole variational bound, T network calls per batch (`losses.bits_per_dim`)."""

    def step(params, batch, key):
        return losses.bits_per_dim(
            schedule,
            make_denoise_fn(model, params, _label(model, batch)),
            batch["image"],
            key,
            target=target,
            variance=variance,
            learned_variance=learned_variance,
        )

    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(
        step,
        in_shardings=(_params_sharding(params_sharding, mesh), batch_sh, rep),
        out_shardings=batch_sh,
        compiler_options=compiler_options(),
    )


def make_sample_fn(
    model: UNet,
    schedule: schedules.Schedule,
    mesh: jax.sharding.Mesh,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddpm",
    pred: samplers.Prediction = samplers.EPS_CLIPPED,
    variance: str = "beta",
    progress: Callable[[Array], None] | None = None,
    params_sharding: Any = None,
):
    """Compiled `(params, key, table, num_steps, eta) -> samples [B, H, W, C]`.

    The whole chain runs in one program with the batch split over devices. `table` and
    `num_steps` come from `samplers.timestep_table`; they and η are traced, so one compilation
    serves every step count up to the table's size. Labels for class-conditional models are
    drawn uniformly from `key`.
    """

    def sample(params, key, table, num_steps, eta):
        noise_key, label_key, loop_key = jax.random.split(key, 3)
        x_T = jax.random.normal(noise_key, shape, jnp.float32)
        x_T = jax.lax.with_sharding_constraint(x_T, sharding.batch_sharded(mesh))
        label = (
            jax.random.randint(label_key, shape[:1], 0, model.num_classes)
            if model.num_classes
            else None
        )
        return samplers.SAMPLERS[sampler](
            make_denoise_fn(model, params, label),
            schedule,
            x_T,
            loop_key,
            table,
            num_steps,
            eta=eta,
            variance=variance,
            pred=pred,
            progress=progress,
        )

    rep = sharding.replicated(mesh)
    return jax.jit(
        sample,
        in_shardings=(_params_sharding(params_sharding, mesh),) + (rep,) * 4,
        out_shardings=sharding.batch_sharded(mesh),
        compiler_options=compiler_options(),
    )


def make_invert_fn(
    model: UNet,
    schedule: schedules.Schedule,
    mesh: jax.sharding.Mesh,
    *,
    pred: samplers.Prediction = samplers.EPS_UNCLIPPED,
    params_sharding: Any = None,
):
    """Compiled DDIM inversion `(params, images, table, num_steps, label) -> latents`, the
    batch split over devices (`samplers.ddim_invert`); `label` is None for unconditional models."""

    def invert(params, images, table, num_steps, label):
        return samplers.ddim_invert(
            make_denoise_fn(model, params, label), schedule, images, table, num_steps, pred=pred
        )

    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(
        invert,
        in_shardings=(_params_sharding(params_sharding, mesh), batch_sh, rep, rep, batch_sh),
        out_shardings=batch_sh,
        compiler_options=compiler_options(),
    )
