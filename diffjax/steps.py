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


def make_optimizer(lr: float, warmup_steps: int, weight_decay: float, b1: float, b2: float,
                   grad_clip: float) -> optax.GradientTransformation:
    """AdamW with linear warm-up to a constant rate, after global-norm gradient clipping."""
    schedule = optax.linear_schedule(0.0, lr, max(1, warmup_steps))
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)


def make_denoise_fn(model: UNet, params: Any, label: Array | None = None, *, train: bool = False,
                    dropout_key: Array | None = None) -> Callable[[Array, Array], Array]:
    """The one callable where the network meets the math: (x_t, t) -> prediction."""
    rngs = {"dropout": dropout_key} if train else None
    return lambda x_t, t: model.apply({"params": params}, x_t, t, label=label, train=train,
                                      rngs=rngs)


def _dummy_inputs(model: UNet, image_shape: tuple[int, ...]):
    x = jnp.zeros((1, *image_shape), jnp.float32)
    label = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    return x, jnp.zeros((1,), jnp.int32), label


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
    """Parameters, optimizer state and EMA replicated over the mesh."""
    return jax.tree.map(lambda _: sharding.replicated(mesh), abstract_state)


def make_init_fn(model: UNet, tx: optax.GradientTransformation,
                 image_shape: tuple[int, ...]) -> Callable[[Array], TrainState]:
    def init(key):
        x, t, label = _dummy_inputs(model, image_shape)
        params = model.init(key, x, t, label=label)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), ema_params=params)
    return init


def abstract_train_state(model: UNet, tx: optax.GradientTransformation,
                         image_shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> TrainState:
    """Shapes, dtypes and shardings of the state, without allocating it (for restoring)."""
    abstract = jax.eval_shape(make_init_fn(model, tx, image_shape), jax.random.key(0))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, state_shardings(abstract, mesh))


def create_train_state(model: UNet, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], key: Array,
                       mesh: jax.sharding.Mesh) -> TrainState:
    """Initialises the state under jit, so every leaf is a global array with its sharding."""
    abstract = abstract_train_state(model, tx, image_shape, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    return jax.jit(make_init_fn(model, tx, image_shape), out_shardings=shardings)(key)


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


def make_train_step(model: UNet, schedule: schedules.Schedule, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, abstract_state: TrainState, *, target: str = "eps",
                    ema_decay: float = 0.9999):
    """Builds the compiled step `(state, batch, key) -> (state, metrics)`.

    The batch is split over the mesh's data axis, the state is replicated and donated; the step's
    randomness is `fold_in(key, state.step)`, so a resumed run draws the same keys.
    """
    def step(state: TrainState, batch: dict, key: Array):
        loss_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
        label = batch["label"] if model.num_classes else None

        def loss_fn(params):
            denoise = make_denoise_fn(model, params, label, train=True, dropout_key=dropout_key)
            return jnp.mean(losses.simple_loss(schedule, denoise, batch["image"], loss_key,
                                               target))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = ema_decay_at(state.step, ema_decay)
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
        new_state = TrainState(state.step + 1, params, opt_state, ema)
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    state_sh = jax.tree.map(lambda a: a.sharding, abstract_state)
    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(step, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                   donate_argnums=0, compiler_options=compiler_options())


def make_eval_step(model: UNet, schedule: schedules.Schedule, mesh: jax.sharding.Mesh, *,
                   target: str = "eps"):
    """Compiled `(params, batch, key) -> per-example loss [B]` on a batch split over the mesh."""
    def step(params, batch, key):
        label = batch["label"] if model.num_classes else None
        return losses.simple_loss(schedule, make_denoise_fn(model, params, label),
                                  batch["image"], key, target)

    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(step, in_shardings=(rep, batch_sh, rep), out_shardings=batch_sh,
                   compiler_options=compiler_options())


def make_sample_fn(model: UNet, schedule: schedules.Schedule, mesh: jax.sharding.Mesh,
                   shape: tuple[int, ...], *, sampler: str = "ddpm", target: str = "eps",
                   **sampler_kwargs):
    """Compiled `(params, key) -> samples [B, H, W, C]`: the whole chain, batch split over devices.

    Labels for class-conditional models are drawn uniformly from `key`.
    """
    def sample(params, key):
        noise_key, label_key, loop_key = jax.random.split(key, 3)
        x_T = jax.random.normal(noise_key, shape, jnp.float32)
        x_T = jax.lax.with_sharding_constraint(x_T, sharding.batch_sharded(mesh))
        label = (jax.random.randint(label_key, shape[:1], 0, model.num_classes)
                 if model.num_classes else None)
        return samplers.SAMPLERS[sampler](make_denoise_fn(model, params, label), schedule, x_T,
                                          loop_key, target=target, **sampler_kwargs)

    rep = sharding.replicated(mesh)
    return jax.jit(sample, in_shardings=(rep, rep), out_shardings=sharding.batch_sharded(mesh),
                   compiler_options=compiler_options())
