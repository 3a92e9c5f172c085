"""The compiled training and evaluation steps (diffusion, bits/dim, classifier) on one callable,
`denoise_fn(x_t, t, cond)`, built from explicit arguments; sampling is in `sampling.py`."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from diffjax import losses, schedules, sharding
from diffjax.cond import UNCONDITIONAL, Cond, Conditioner
from diffjax.train_state import TrainState, update_ema

Array = jnp.ndarray


def make_denoise_fn(
    model: Any, params: Any, *, train: bool = False, dropout_key: Array | None = None
) -> Callable[[Array, Array, Cond], Array]:
    """The one callable where the network meets the math: (x_t, t, cond) -> prediction."""
    rngs = {"dropout": dropout_key} if train else None
    return lambda x_t, t, c: model.apply({"params": params}, x_t, t, c, train=train, rngs=rngs)


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
    model: Any,
    schedule: schedules.Schedule,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    abstract_state: TrainState,
    *,
    target: str = "eps",
    ema_decay: float = 0.9999,
    t_sampling: str = "uniform",
    grad_accum_steps: int = 1,
    conditioner: Conditioner = UNCONDITIONAL,
    to_x0: Callable[[dict, Any, Array], Array] | None = None,
    **loss_kwargs,
):
    """Builds the compiled step `(state, batch, key, frozen) -> (state, metrics)`.

    The batch is split over every device of the mesh, the state is laid out by
    `sharding.state_sharding` and donated; the step's randomness is `fold_in(key, state.step)`,
    so a resumed run draws the same keys. With `grad_accum_steps` = k the batch is processed as k
    microbatches in a `lax.scan` (activation memory of one microbatch) and their gradients
    averaged: the same update as one batch (exactly without dropout; dropout draws its masks per
    microbatch).
    The condition is `conditioner.from_batch(batch, frozen)`, each example swapped for the null
    condition with probability `conditioner.drop_prob` from the step's key (a resumed run drops
    the same examples). `frozen` holds frozen networks' parameters (e.g. a pretrained text
    encoder; None when there are none): an argument, never trained, donated or checkpointed.
    `to_x0(batch, frozen, key)` gives the data x_0 of a batch (default `batch["image"]`); a
    latent model's encodes it (`build.Setup.to_x0`).
    `loss_kwargs` go to `losses.training_losses` (loss, learned_variance, variance, vlb_weight,
    min_snr_gamma).
    """
    batch_sh = sharding.batch_sharded(mesh)

    def grads_of(params, x0, t, noise, weights, c, dropout_key):
        def loss_fn(params):
            denoise = make_denoise_fn(model, params, train=True, dropout_key=dropout_key)
            terms = losses.training_losses(
                schedule, denoise, x0, t, noise, cond=c, target=target, **loss_kwargs
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

    def step(state: TrainState, batch: dict, key: Array, frozen: Any):
        keys = jax.random.split(jax.random.fold_in(key, state.step), 4)
        t_key, noise_key, dropout_key, drop_key = keys
        x0 = batch["image"] if to_x0 is None else to_x0(batch, frozen, jax.random.fold_in(t_key, 1))
        cond_key = jax.random.fold_in(drop_key, 1)  # an inpainting model's masks
        c = conditioner.drop(conditioner.from_batch(batch, frozen, cond_key), drop_key, frozen)
        t, weights = losses.sample_timesteps(t_key, x0.shape[0], state.loss_history, t_sampling)
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        t, weights, noise = (
            jax.lax.with_sharding_constraint(a, batch_sh) for a in (t, weights, noise)
        )
        if grad_accum_steps > 1:
            (loss, terms), grads = accumulate(state.params, (x0, t, noise, weights, c), dropout_key)
        else:
            (loss, terms), grads = grads_of(state.params, x0, t, noise, weights, c, dropout_key)
        history = state.loss_history
        if t_sampling == "importance":  # the only reader of the history
            history = losses.update_loss_history(history, t, terms["vlb"])
        new_state = apply_gradients(tx, ema_decay, state, grads, history)
        return new_state, {
            "loss": loss,
            "mse": jnp.mean(terms["mse"]),
            "vlb": jnp.mean(terms["vlb"]),
            "grad_norm": optax.global_norm(grads),
        }

    return jit_train_step(step, mesh, abstract_state)


def apply_gradients(tx, ema_decay: float, state: TrainState, grads, history) -> TrainState:
    """The optimizer update and the EMA: the next state."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = update_ema(state.ema_params, params, state.step, ema_decay)
    return TrainState(state.step + 1, params, opt_state, ema, history)


def jit_train_step(step, mesh: jax.sharding.Mesh, abstract_state: TrainState):
    """`step(state, batch, key, frozen)` compiled: state laid out and donated, batch split."""
    state_sh = jax.tree.map(lambda a: a.sharding, abstract_state)
    rep = sharding.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(state_sh, sharding.batch_sharded(mesh), rep, rep),
        out_shardings=(state_sh, rep),
        donate_argnums=0,
        compiler_options=compiler_options(),
    )


class InFlight:
    """At most `depth` dispatched steps not yet finished: `add(out)` takes an output of each step
    (e.g. its loss) and, once more than `depth` are queued, waits for the oldest.

    Every loop that dispatches compiled steps one after another needs one. XLA's CPU runtime
    (jax 0.10) deadlocks when more than 32 programs with collectives are queued on a device: an
    all-reduce waits 40 s for a device whose launch cannot start, then the process aborts
    ("Termination timeout for `all reduce ...`"). It happens with any mesh of 2 or more CPU
    devices once the host runs far enough ahead (steps faster than the loop, a loaded machine).
    Asynchronous dispatch gains nothing from more than a step or two ahead, on any backend.
    """

    def __init__(self, depth: int = 4):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self._queue: collections.deque = collections.deque()

    def add(self, out: Any) -> None:
        self._queue.append(out)
        while len(self._queue) > self.depth:
            jax.block_until_ready(self._queue.popleft())


def classifier_logits(model: Any, params: Any) -> Callable[[Array, Array], Array]:
    """`(x_t, t) -> logits [B, K]` of a noise-conditional classifier (a UNet with
    `classifier_classes=K`)."""
    return lambda x_t, t: model.apply({"params": params}, x_t, t)


def make_classifier_train_step(
    model: Any,
    schedule: schedules.Schedule,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    abstract_state: TrainState,
    *,
    ema_decay: float = 0.9999,
):
    """The noise-conditional classifier's compiled step `(state, batch, key, frozen) -> (state,
    metrics)`: cross-entropy of p_φ(y | x_t, t) on x_t ~ q(x_t | x_0), t uniform (Dhariwal &
    Nichol 2021, §4). Keys, sharding and donation as `make_train_step`."""

    def step(state: TrainState, batch: dict, key: Array, frozen: Any):
        t_key, noise_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step), 3)
        x0, y = batch["image"], batch["label"]
        t = jax.random.randint(t_key, x0.shape[:1], 0, schedule.num_steps)
        x_t = schedules.q_sample(schedule, x0, t, jax.random.normal(noise_key, x0.shape))

        def loss_fn(params):
            rngs = {"dropout": dropout_key}
            logits = model.apply({"params": params}, x_t, t, train=True, rngs=rngs)
            logp = jax.nn.log_softmax(logits, axis=-1)
            nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
            return jnp.mean(nll), jnp.mean(jnp.argmax(logits, -1) == y)

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = apply_gradients(tx, ema_decay, state, grads, state.loss_history)
        return new_state, {
            "loss": loss,
            "accuracy": accuracy,
            "grad_norm": optax.global_norm(grads),
        }

    return jit_train_step(step, mesh, abstract_state)


def params_sharding_or_replicated(params_sharding: Any, mesh: jax.sharding.Mesh) -> Any:
    """The parameters' shardings (a pytree, e.g. from `abstract_train_state(...).ema_params`), or
    replicated when None."""
    return sharding.replicated(mesh) if params_sharding is None else params_sharding


def jit_eval_step(step, mesh: jax.sharding.Mesh, params_sharding: Any):
    """`step(params, batch, key, frozen) -> per-example values`, compiled, the batch split."""
    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(
        step,
        in_shardings=(params_sharding_or_replicated(params_sharding, mesh), batch_sh, rep, rep),
        out_shardings=batch_sh,
        compiler_options=compiler_options(),
    )


def make_eval_step(
    model: Any,
    schedule: schedules.Schedule,
    mesh: jax.sharding.Mesh,
    *,
    target: str = "eps",
    params_sharding: Any = None,
    conditioner: Conditioner = UNCONDITIONAL,
    to_x0: Callable[[dict, Any, Array], Array] | None = None,
    **loss_kwargs,
):
    """Compiled `(params, batch, key, frozen) -> per-example training loss [B]`, t uniform, the
    batch's own condition (no dropout), batch split over the mesh. `to_x0` and `loss_kwargs` as
    in `make_train_step`."""

    def step(params, batch, key, frozen):
        x0 = batch["image"] if to_x0 is None else to_x0(batch, frozen, jax.random.fold_in(key, 1))
        return losses.random_t_losses(
            schedule,
            make_denoise_fn(model, params),
            x0,
            key,
            cond=conditioner.from_batch(batch, frozen),
            target=target,
            **loss_kwargs,
        )["loss"]

    return jit_eval_step(step, mesh, params_sharding)


def make_bpd_step(
    model: Any,
    schedule: schedules.Schedule,
    mesh: jax.sharding.Mesh,
    *,
    target: str = "eps",
    variance: str = "beta",
    learned_variance: bool = False,
    params_sharding: Any = None,
    conditioner: Conditioner = UNCONDITIONAL,
):
    """Compiled `(params, batch, key, frozen) -> {"total", "prior", "decoder", "kl"}`, each [B]
    bits/dim: the whole variational bound, T network calls per batch (`losses.bits_per_dim`);
    for a conditional model, the bound of p(x | the batch's condition)."""

    def step(params, batch, key, frozen):
        return losses.bits_per_dim(
            schedule,
            make_denoise_fn(model, params),
            batch["image"],
            key,
            cond=conditioner.from_batch(batch, frozen),
            target=target,
            variance=variance,
            learned_variance=learned_variance,
        )

    return jit_eval_step(step, mesh, params_sharding)
