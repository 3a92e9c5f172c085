"""The training loop: resume, cadence, signals, NaN guard, checkpoints, final grid."""

from __future__ import annotations

import logging
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from diffjax import build, checkpoint, config_check, data, latent_setup, sharding, steps, tasks
from diffjax.metrics import MetricWriter
from diffjax.train_state import TrainState

Array = jnp.ndarray

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf."""


def _agreed(flag: bool) -> bool:
    """True on every process when it is true on any (a SIGTERM reaches the processes of a job at
    different steps; they must stop, and checkpoint, at the same one). With several processes,
    a tiny all-gather: the loop asks at log steps, where the host waits for the device anyway."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _check_finite(pending: list[tuple[int, Array]], last_saved: int | None) -> list[float]:
    values = [float(v) for _, v in pending]
    for (s, _), v in zip(pending, values, strict=True):
        if not math.isfinite(v):
            kept = (
                f"the last good checkpoint (step {last_saved}) is intact"
                if last_saved is not None
                else "no checkpoint was written"
            )
            raise NonFiniteLossError(
                f"loss is {v} at step {s}; training stopped and {kept}. Lower optim.lr, "
                f"raise optim.warmup_steps or set optim.grad_clip, then resume."
            )
    return values


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from the workdir's newest checkpoint), logs, samples and checkpoints."""
    setup = build.Setup(config)
    if setup.conditioner.spatial == "inpaint_encoded":
        raise config_check.ConfigError(
            "config.spatial.kind='inpaint_encoded' (an imported Stable Diffusion inpainting "
            "model) samples and edits; fine-tuning it is not supported yet"
        )
    tr = config.train
    d = config.data
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), tr.keep_checkpoints)
    data_state = None
    if ckpt.latest_step() is not None:
        try:
            latent_setup.check_same_process(config, workdir)
        except config_check.ConfigError:
            ckpt.close()
            raise
        state, data_state, last_saved = ckpt.restore(setup.abstract_state, set_aside=True)
        if last_saved >= tr.num_steps:
            ckpt.close()
            log.info(
                "already at step %d (train.num_steps=%d): nothing to train; raise "
                "--config.train.num_steps to train on",
                last_saved,
                tr.num_steps,
            )
            return state
        log.info("resumed from step %d in %s", last_saved, ckpt.directory)
    # Read back by latent runs and studies; written once the workdir's checkpoints have restored
    # under this config, so a run refused for another network leaves the run's own config there.
    latent_setup.write_run_config(config, workdir)
    source = build.open_split(config, d.train_split)
    build.check_dataset_labels(config, source)
    captions = build.captions(config, source) if setup.conditioner.text else None
    if captions is not None:
        setup.load_text(workdir, captions)
    if (warning := data.upsampling_warning(source, d.image_size)) is not None:
        log.warning("%s: %s", d.name, warning)
    if setup.codec is not None:  # a latent model: its scale, and the training set encoded once
        source = latent_setup.prepare_training(
            setup, source, data_state, build.data_dir(config), captions
        )
    train_iter = data.make_train_iterator(
        source,
        image_size=d.image_size,
        channels=d.channels,
        global_batch=tr.batch_size,
        seed=config.seed,
        random_flip=d.random_flip,
        worker_count=d.worker_count,
        captions=captions,
        resize=d.resize,
        cache_mib=d.cache_mib,
    )
    if data_state is None:
        state, last_saved = setup.create_state(), None
        if tr.get("init_from"):
            state = _init_from(setup, tr.init_from, workdir, state)
    elif "train_iter" in data_state:
        _continue_stream(train_iter, data_state["train_iter"], ckpt)
    else:  # written by `diffjax.convert`: pretrained weights, no data read yet
        log.info("step %d has no data position (an imported model): fine-tuning", last_saved)
    task = tasks.for_setup(setup)
    writer = MetricWriter(workdir, resumed_step=last_saved if last_saved is not None else 0)
    stop = {"signal": None}
    # Several processes must agree on the stop step, so Ctrl-C is a flag there too.
    handled = (signal.SIGTERM,) if jax.process_count() == 1 else (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, lambda sig, _: stop.update(signal=sig)) for s in handled}
    step = int(state.step)
    bar = tqdm.tqdm(
        total=tr.num_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    pending, t0, healthy = [], time.perf_counter(), False
    in_flight = steps.InFlight()  # XLA:CPU deadlocks with many steps queued

    def at(every):
        return every and step % every == 0

    def grid_path():
        return os.path.join(workdir, "samples", f"step_{step:07d}.png")

    def save(s):
        nonlocal last_saved
        meta = {"train_iter": train_iter.get_state()}
        if setup.latent_meta is not None:
            meta["latent"] = setup.latent_meta
        ckpt.save(s, state, meta)
        last_saved = s

    try:
        while step < tr.num_steps:
            ask = jax.process_count() == 1 or not tr.log_every_steps or at(tr.log_every_steps)
            if ask and _agreed(stop["signal"] is not None):
                stop["agreed"] = True
                break
            batch = sharding.global_batch(next(train_iter), setup.mesh)
            state, metrics = task.train_step(state, batch, setup.train_key, setup.frozen)
            step += 1
            pending.append((step, metrics["loss"]))
            in_flight.add(metrics["loss"])
            bar.update(1)
            if at(tr.log_every_steps) or step == tr.num_steps:
                values = _check_finite(pending, last_saved)
                rate = len(pending) / (time.perf_counter() - t0)
                scalars = {
                    "train/loss": float(np.mean(values)),
                    "train/grad_norm": float(metrics["grad_norm"]),
                    "train/steps_per_s": rate,
                }
                scalars.update(task.scalars(metrics))  # the last step's parts
                writer.write(step, scalars)
                bar.set_postfix(loss=f"{np.mean(values):.4f}")
                pending, t0 = [], time.perf_counter()
            if at(tr.checkpoint_every_steps):
                _check_finite(pending, last_saved)
                save(step)
            if at(tr.sample_every_steps) and task.preview:
                task.preview(state.ema_params, grid_path())
        healthy = True
        final = step == tr.num_steps and not at(tr.sample_every_steps)
        if final and task.preview:  # the final grid
            task.preview(state.ema_params, grid_path())
    except KeyboardInterrupt:
        log.warning("interrupted at step %d: writing a final checkpoint", step)
        healthy = True
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if healthy:
            _check_finite(pending, last_saved)
            if last_saved != step:
                save(step)
        ckpt.close()
        writer.close()
    if stop.get("agreed"):
        by = f"signal {stop['signal']}" if stop["signal"] else "a signal to another process"
        log.warning("stopped by %s at step %d; checkpoint written", by, step)
    return state


def _init_from(setup: build.Setup, source: str, workdir: str, state: TrainState) -> TrainState:
    """A fresh run's parameters (and EMA) set to the EMA parameters of `source`'s newest
    checkpoint: fine-tuning from another run. Step, optimizer and data stream start afresh."""
    if os.path.abspath(source) == os.path.abspath(workdir):
        raise config_check.ConfigError(
            "config.train.init_from: names this run's own --workdir; a run resumes from its own "
            "checkpoints without it"
        )
    if not os.path.isdir(os.path.join(source, "checkpoints")):
        raise config_check.ConfigError(
            f"config.train.init_from: {source!r} holds no checkpoints/ folder; give the "
            f"--workdir of a finished run"
        )
    _check_same_network(setup.config, source)
    ckpt = checkpoint.Checkpointer(os.path.join(source, "checkpoints"), max_to_keep=None)
    try:
        restored, _, step = ckpt.restore(setup.abstract_state)
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(
            f"config.train.init_from: {source!r} does not restore into this run; the source "
            f"run must have this run's network and diffusion settings. {e}"
        ) from None
    finally:
        ckpt.close()
    log.info("initialised from the EMA parameters of %s at step %d", source, step)
    # Two buffers: the train step donates both trees, and one buffer cannot be donated twice.
    ema = jax.tree.map(jnp.copy, restored.ema_params)
    return state.replace(params=restored.ema_params, ema_params=ema)


# Fields that do not change the parameters' shapes: a fine-tune may set them anew.
FREE_MODEL_FIELDS = {"dropout", "cond_drop_prob", "remat", "dtype"}


def _check_same_network(config: ml_collections.ConfigDict, source: str) -> None:
    """Refuses, naming the fields, a source run whose network differs from this run's (read from
    its config.json when it has one), before any checkpoint is read."""
    if not os.path.isfile(os.path.join(source, "config.json")):
        return  # the restore itself then checks every shape
    theirs = latent_setup.read_run_config(source)
    pairs = [(f"model.{k}", v, theirs.model.get(k)) for k, v in config.model.items()]
    pairs += [
        (f"{section}.{k}", config[section][k], theirs[section].get(k))
        for section, k in (("data", "channels"), ("diffusion", "learned_variance"))
    ]
    differ = [
        f"{name} is {_plain(mine)!r} here, {_plain(other)!r} there"
        for name, mine, other in pairs
        if name.removeprefix("model.") not in FREE_MODEL_FIELDS and _plain(mine) != _plain(other)
    ]
    if differ:
        raise config_check.ConfigError(
            f"config.train.init_from: {source!r} trained another network ({'; '.join(differ)}); "
            f"set those fields to the source run's values"
        )


def _plain(value):
    return list(value) if isinstance(value, tuple | list) else value


def _continue_stream(train_iter: data.TrainIterator, saved: dict, ckpt) -> None:
    """Puts the input pipeline where the checkpoint's run left it (also under a new batch)."""
    try:
        train_iter.set_state(saved)
    except ValueError as e:
        ckpt.close()
        raise checkpoint.CheckpointError(
            f"cannot continue the checkpoint's data stream: {e} Train with the data settings "
            f"of the run that wrote it (data.*, seed, processes), or use a fresh --workdir."
        ) from None
    new_batch = train_iter.get_state()["global_batch"]
    if saved.get("global_batch") != new_batch:
        log.warning(
            "train.batch_size changed from %s to %d: continuing the same stream of "
            "examples at example %d",
            saved.get("global_batch"),
            new_batch,
            train_iter.get_state()["next_example"],
        )
