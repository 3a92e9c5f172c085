"""Config → components, and the loops of the three modes: train, eval, sample."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils

from diffjax import checkpoint, data, image_io, losses, samplers, schedules, sharding
from diffjax.models.unet import UNet
from diffjax.steps import (
    LR_SCHEDULES,
    TrainState,
    abstract_train_state,
    create_train_state,
    make_bpd_step,
    make_eval_step,
    make_optimizer,
    make_sample_fn,
    make_train_step,
)

Array = jnp.ndarray


log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf."""


class ConfigError(ValueError):
    """A config field has a bad value."""


# --- configuration ------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
    """Rejects a bad configuration before anything is built or compiled, naming the field."""

    def fail(field, msg):
        raise ConfigError(f"config.{field}: {msg}")

    m, d, tr = config.model, config.data, config.train
    levels = len(m.channel_mults)
    if levels < 1:
        fail("model.channel_mults", "needs at least one level")
    factor = 2 ** (levels - 1)
    if d.image_size < 1 or d.image_size % factor:
        fail(
            "data.image_size",
            f"{d.image_size} must be a positive multiple of 2^(levels-1) = "
            f"{factor} for {levels} levels (model.channel_mults={tuple(m.channel_mults)})",
        )
    if d.channels not in (1, 3):
        fail("data.channels", f"must be 1 or 3, got {d.channels}")
    if d.name == "image_folder" and not d.folder:
        fail("data.folder", "data.name='image_folder' needs the path of your image directory")
    for ch in {m.base_channels * k for k in m.channel_mults}:
        if ch % m.num_groups:
            fail("model.num_groups", f"{m.num_groups} does not divide {ch} channels")
        if m.head_dim and ch % m.head_dim:
            fail("model.head_dim", f"{m.head_dim} does not divide {ch} channels")
    sizes = {d.image_size // 2**i for i in range(levels)}
    if set(m.attention_resolutions) - sizes:
        fail(
            "model.attention_resolutions",
            f"{tuple(m.attention_resolutions)} names sizes the "
            f"network never has; its sizes are {sorted(sizes, reverse=True)}",
        )
    if not 0.0 <= m.dropout < 1.0:
        fail("model.dropout", f"must be in [0, 1), got {m.dropout}")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        fail("model.dtype", f"must be float32, bfloat16 or float16, got {m.dtype!r}")
    if config.diffusion.schedule not in schedules.SCHEDULES:
        fail(
            "diffusion.schedule",
            f"unknown {config.diffusion.schedule!r}; choose one of {sorted(schedules.SCHEDULES)}",
        )
    if config.diffusion.num_steps < 2:
        fail("diffusion.num_steps", "must be at least 2")
    _check_diffusion(config.diffusion, fail)
    _check_sampler(config.sampler, config.diffusion.num_steps, fail)
    n_dev = _mesh_size(config)
    for field, value in (
        ("train.batch_size", tr.batch_size),
        ("train.eval_batch_size", tr.eval_batch_size),
        ("sampler.batch_size", config.sampler.batch_size),
    ):
        if value < 1 or value % n_dev:
            fail(field, f"{value} must be a positive multiple of the {n_dev} devices of the mesh")
    if tr.batch_size % jax.process_count():
        fail("train.batch_size", f"must divide over {jax.process_count()} processes")
    k = tr.grad_accum_steps
    if k < 1 or tr.batch_size % (k * n_dev):
        fail(
            "train.grad_accum_steps",
            f"{k} microbatches must split train.batch_size="
            f"{tr.batch_size} evenly on each of the {n_dev} devices (batch % (k·devices) == 0)",
        )
    if tr.num_samples < 1:
        fail("train.num_samples", "must be >= 1")
    if jax.process_count() > 1 and n_dev != jax.device_count():
        fail(
            "mesh.data",
            f"with {jax.process_count()} processes the mesh must use all "
            f"{jax.device_count()} devices (mesh.data=-1), got {n_dev}",
        )
    if tr.num_steps < 1:
        fail("train.num_steps", f"must be >= 1 (the step to train up to), got {tr.num_steps}")
    for field in ("log_every_steps", "checkpoint_every_steps", "sample_every_steps"):
        if tr[field] < 0:
            fail(f"train.{field}", "must be >= 0 (0 = off)")
    if tr.keep_checkpoints < 1:
        fail(
            "train.keep_checkpoints",
            f"must be >= 1 (the newest K are kept), got {tr.keep_checkpoints}",
        )
    if (
        d.data_dir
        and os.path.exists(os.path.expanduser(d.data_dir))
        and not os.path.isdir(os.path.expanduser(d.data_dir))
    ):
        fail(
            "data.data_dir",
            f"{d.data_dir} is a file; name a directory for prepared datasets (created if missing)",
        )
    if not 0.0 <= config.optim.ema_decay < 1.0:
        fail("optim.ema_decay", f"must be in [0, 1), got {config.optim.ema_decay}")
    if config.optim.lr <= 0:
        fail("optim.lr", "must be > 0")
    if config.optim.lr_schedule not in LR_SCHEDULES:
        fail(
            "optim.lr_schedule",
            f"unknown {config.optim.lr_schedule!r}; choose one of {LR_SCHEDULES}",
        )
    if not 0.0 <= config.optim.final_lr_ratio <= 1.0:
        fail("optim.final_lr_ratio", f"must be in [0, 1], got {config.optim.final_lr_ratio}")
    if config.mesh.cpu_devices < 0:
        fail("mesh.cpu_devices", f"must be >= 0 (0 = JAX's default), got {config.mesh.cpu_devices}")


def _check_diffusion(df, fail) -> None:
    for field, value, choices in (
        ("target", df.target, schedules.PREDICTION_TARGETS),
        ("loss", df.loss, losses.LOSSES),
        ("t_sampling", df.t_sampling, losses.T_SAMPLING),
    ):
        if value not in choices:
            fail(f"diffusion.{field}", f"unknown {value!r}; choose one of {choices}")
    if df.zero_terminal_snr and df.target == "eps":
        fail(
            "diffusion.zero_terminal_snr",
            "ε-prediction is undefined at SNR 0 (x_T carries no "
            "signal); set diffusion.target='v' (or 'x0')",
        )
    if df.loss == "hybrid" and not df.learned_variance:
        fail(
            "diffusion.loss",
            "'hybrid' trains the learned variance only; set "
            "diffusion.learned_variance=True (or use loss='vlb')",
        )
    if df.learned_variance and df.loss == "simple":
        fail(
            "diffusion.learned_variance",
            "L_simple never trains the variance output; use diffusion.loss='hybrid' (or 'vlb')",
        )
    if df.min_snr_gamma > 0 and df.loss == "vlb":
        fail("diffusion.min_snr_gamma", "weights the MSE term, which loss='vlb' does not have")
    if df.t_sampling == "importance" and df.loss == "simple":
        fail(
            "diffusion.t_sampling",
            "importance sampling weighs t by the VLB history; it needs "
            "diffusion.loss='hybrid' or 'vlb'",
        )
    if df.vlb_weight < 0 or df.min_snr_gamma < 0:
        fail(
            "diffusion.vlb_weight" if df.vlb_weight < 0 else "diffusion.min_snr_gamma",
            "must be >= 0",
        )


def _check_sampler(sp, num_steps: int, fail) -> None:
    for field, value, choices in (
        ("name", sp.name, tuple(samplers.SAMPLERS)),
        ("spacing", sp.spacing, samplers.SPACINGS),
        ("variance", sp.variance, samplers.FIXED_VARIANCES),
    ):
        if value not in choices:
            fail(f"sampler.{field}", f"unknown {value!r}; choose one of {choices}")
    if not 1 <= sp.steps <= num_steps:
        fail("sampler.steps", f"{sp.steps} must be in [1, diffusion.num_steps={num_steps}]")
    if sp.max_steps < sp.steps:
        fail(
            "sampler.max_steps",
            f"{sp.max_steps} < sampler.steps={sp.steps}; raise it (one "
            f"compiled sampler serves every step count up to max_steps)",
        )
    if not 0.0 <= sp.eta <= 1.0:
        fail("sampler.eta", f"must be in [0, 1], got {sp.eta}")
    if not 0.0 <= sp.dynamic_threshold < 1.0:
        fail(
            "sampler.dynamic_threshold",
            f"a percentile in (0, 1), or 0 for off; got {sp.dynamic_threshold}",
        )


def _mesh(config) -> jax.sharding.Mesh:
    return sharding.make_mesh(config.mesh.data, config.mesh.fsdp)


def _mesh_size(config) -> int:
    try:
        return _mesh(config).size
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None


def _model(config) -> UNet:
    kw = config.model.to_dict()
    kw["dtype"] = jnp.dtype(kw.pop("dtype"))
    kw["attention_resolutions"] = tuple(kw["attention_resolutions"])
    kw["channel_mults"] = tuple(kw["channel_mults"])
    if config.diffusion.learned_variance:  # the mean and the variance interpolant v
        kw["out_channels"] = 2 * config.data.channels
    return UNet(**kw)


def _optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    return make_optimizer(
        o.lr,
        o.warmup_steps,
        o.weight_decay,
        o.b1,
        o.b2,
        o.grad_clip,
        schedule=o.lr_schedule,
        decay_steps=config.train.num_steps,
        final_lr_ratio=o.final_lr_ratio,
    )


def _schedule(config) -> schedules.Schedule:
    df = config.diffusion
    return schedules.make_schedule(
        df.schedule, df.num_steps, zero_terminal_snr=df.zero_terminal_snr
    )


def _loss_kwargs(config) -> dict:
    df = config.diffusion
    return dict(
        target=df.target,
        loss=df.loss,
        learned_variance=df.learned_variance,
        variance=config.sampler.variance,
        vlb_weight=df.vlb_weight,
        min_snr_gamma=df.min_snr_gamma,
    )


def open_split(config, split: str):
    """The dataset split; on several processes, process 0 prepares it while the others wait."""
    d = config.data
    data_dir = d.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    load = lambda: data.load_source(
        d.name, split, os.path.expanduser(data_dir), folder=d.folder or None
    )
    if jax.process_count() == 1:
        return load()
    source = load() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"diffjax: dataset {d.name} {split} ready")
    return source if source is not None else load()


class Setup:
    """Everything the three modes share, built from the config (main/train only read configs)."""

    def __init__(self, config):
        check_config(config)
        self.config = config
        self.mesh = _mesh(config)
        self.model = _model(config)
        self.tx = _optimizer(config)
        self.schedule = _schedule(config)
        d = config.data
        self.image_shape = (d.image_size, d.image_size, d.channels)
        root = jax.random.key(config.seed)
        self.init_key, self.train_key, self.sample_key, self.eval_key = jax.random.split(root, 4)
        self.abstract_state = abstract_train_state(
            self.model, self.tx, self.image_shape, self.mesh, num_timesteps=self.schedule.num_steps
        )
        self.params_sharding = jax.tree.map(lambda a: a.sharding, self.abstract_state.ema_params)
        self._sample_fns = {}

    def sample_fn(self, batch_size: int, progress=None):
        """`(params, key) -> samples` with the config's sampler, steps, spacing and η.

        Without a progress callback the compiled program is built once per batch size.
        """
        s = self.config.sampler
        fn = self._sample_fns.get(batch_size) if progress is None else None
        if fn is None:
            pred = samplers.Prediction(
                self.config.diffusion.target,
                self.config.diffusion.learned_variance,
                s.clip_x0,
                s.dynamic_threshold,
            )
            fn = make_sample_fn(
                self.model,
                self.schedule,
                self.mesh,
                (batch_size, *self.image_shape),
                sampler=s.name,
                pred=pred,
                variance=s.variance,
                progress=progress,
                params_sharding=self.params_sharding,
            )
            if progress is None:
                self._sample_fns[batch_size] = fn
        table = samplers.timestep_table(self.schedule.num_steps, s.steps, s.spacing, s.max_steps)
        return lambda params, key: fn(params, key, table, np.int32(s.steps), np.float32(s.eta))


# --- logging ------------------------------------------------------------------------------------


class MetricWriter:
    """Scalars to TensorBoard event files and to `metrics.jsonl` in the workdir (process 0)."""

    def __init__(self, workdir: str, resumed_step: int | None = None):
        """`resumed_step`: training restarts after this step, so the train lines of later steps
        (from a run that crashed before its next checkpoint) are dropped, and a line cut short
        by a crash too: the file then reads as if the run had never been interrupted."""
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter

            path = os.path.join(workdir, "metrics.jsonl")
            _trim_metrics(path, resumed_step)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._file = open(path, "a")

    def write(self, step: int, scalars: dict) -> None:
        if not self.active:
            return
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._file.write(json.dumps({"step": step, **scalars}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self.active:
            self._tb.close()
            self._file.close()


def _trim_metrics(path: str, resumed_step: int | None) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()

    def keep(line):
        try:
            record = json.loads(line)
        except ValueError:
            return False  # cut short by a crash mid-write
        trained = any(k.startswith("train/") for k in record)
        return not (trained and resumed_step is not None and record["step"] > resumed_step)

    kept = [line for line in lines if line.endswith("\n") and keep(line)]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


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


def write_samples(
    setup: Setup, params, num: int, key, path: str, progress: bool = False
) -> np.ndarray:
    """Draws `num` samples with `params`; writes a PNG grid and an .npz (`images`) beside it.

    With `progress`, a bar follows every denoising step (a host callback inside the loop).
    """
    bs, steps = setup.config.sampler.batch_size, setup.config.sampler.steps
    n_batches = math.ceil(num / bs)
    bar, batch_index = None, [0]
    # One program on every process: the per-step progress callback only with a single process.
    if progress and jax.process_count() == 1:
        bar = tqdm.tqdm(
            total=n_batches * steps,
            unit="step",
            mininterval=0.5,
            desc=f"sampling {num} ({setup.config.sampler.name}, batches of {bs})",
        )

    def advance(i):  # may run once per device: move the bar forward only
        done = batch_index[0] * steps + int(i) + 1
        if done > bar.n and (done % 10 == 0 or int(i) == steps - 1):
            bar.update(done - bar.n)

    fn = setup.sample_fn(bs, progress=advance if bar is not None else None)
    out = []
    for b in range(n_batches):
        batch_index[0] = b
        out.append(sharding.to_host(fn(params, jax.random.fold_in(key, b))))
    if bar is not None:
        bar.close()
    images = np.concatenate(out)[:num]
    if jax.process_index() == 0:
        image_io.save_grid(images, path)
        np.savez_compressed(os.path.splitext(path)[0] + ".npz", images=images)
    return images


# --- the three modes ----------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from the workdir's newest checkpoint), logs, samples and checkpoints."""
    setup = Setup(config)
    tr = config.train
    d = config.data
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), tr.keep_checkpoints)
    data_state = None
    if ckpt.latest_step() is not None:
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
    source = open_split(config, d.train_split)
    if (warning := data.upsampling_warning(source, d.image_size)) is not None:
        log.warning("%s: %s", d.name, warning)
    train_iter = data.make_train_iterator(
        source,
        image_size=d.image_size,
        channels=d.channels,
        global_batch=tr.batch_size,
        seed=config.seed,
        random_flip=d.random_flip,
        worker_count=d.worker_count,
    )
    if data_state is not None:
        _continue_stream(train_iter, data_state["train_iter"], ckpt)
    else:
        state = create_train_state(
            setup.model,
            setup.tx,
            setup.image_shape,
            setup.init_key,
            setup.mesh,
            num_timesteps=setup.schedule.num_steps,
        )
        last_saved = None
    train_step = make_train_step(
        setup.model,
        setup.schedule,
        setup.tx,
        setup.mesh,
        setup.abstract_state,
        ema_decay=config.optim.ema_decay,
        t_sampling=config.diffusion.t_sampling,
        grad_accum_steps=tr.grad_accum_steps,
        **_loss_kwargs(config),
    )
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

    def at(every):
        return every and step % every == 0

    def grid_path():
        return os.path.join(workdir, "samples", f"step_{step:07d}.png")

    def save(s):
        nonlocal last_saved
        ckpt.save(s, state, {"train_iter": train_iter.get_state()})
        last_saved = s

    try:
        while step < tr.num_steps:
            ask = jax.process_count() == 1 or not tr.log_every_steps or at(tr.log_every_steps)
            if ask and _agreed(stop["signal"] is not None):
                stop["agreed"] = True
                break
            batch = sharding.global_batch(next(train_iter), setup.mesh)
            state, metrics = train_step(state, batch, setup.train_key)
            step += 1
            pending.append((step, metrics["loss"]))
            bar.update(1)
            if at(tr.log_every_steps) or step == tr.num_steps:
                values = _check_finite(pending, last_saved)
                rate = len(pending) / (time.perf_counter() - t0)
                scalars = {
                    "train/loss": float(np.mean(values)),
                    "train/grad_norm": float(metrics["grad_norm"]),
                    "train/steps_per_s": rate,
                }
                if config.diffusion.loss != "simple":  # the last step's parts
                    scalars.update(
                        {"train/mse": float(metrics["mse"]), "train/vlb_bpd": float(metrics["vlb"])}
                    )
                writer.write(step, scalars)
                bar.set_postfix(loss=f"{np.mean(values):.4f}")
                pending, t0 = [], time.perf_counter()
            if at(tr.checkpoint_every_steps):
                _check_finite(pending, last_saved)
                save(step)
            if at(tr.sample_every_steps):
                write_samples(
                    setup, state.ema_params, tr.num_samples, setup.sample_key, grid_path()
                )
        healthy = True
        if step == tr.num_steps and not at(tr.sample_every_steps):  # the final grid
            write_samples(setup, state.ema_params, tr.num_samples, setup.sample_key, grid_path())
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


def restore_for_inference(setup: Setup, workdir: str, step: int | None):
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)
    try:
        state, _, restored = ckpt.restore(setup.abstract_state, step)
    finally:
        ckpt.close()
    return state, restored


def load_ema(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
    """For notebooks and studies: `(setup, ema_params, step)` from a workdir's checkpoint.

    `setup.model`, `setup.schedule` and `setup.mesh` are what `steps.make_sample_fn` takes.
    """
    setup = Setup(config)
    state, restored = restore_for_inference(setup, workdir, step)
    return setup, state.ema_params, restored


def sample(
    config: ml_collections.ConfigDict,
    workdir: str,
    step: int | None = None,
    num_samples: int | None = None,
) -> str:
    """Samples from a checkpoint's EMA parameters; writes `samples/sample_<step>.png` and `.npz`."""
    setup = Setup(config)
    state, restored = restore_for_inference(setup, workdir, step)
    num = num_samples or config.train.num_samples
    path = os.path.join(workdir, "samples", f"sample_{restored:07d}.png")
    write_samples(setup, state.ema_params, num, setup.sample_key, path, progress=True)
    log.info("wrote %d samples from step %d to %s", num, restored, path)
    return path


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
    """The EMA parameters' mean training loss and bits/dim over the whole test split.

    Bits/dim is the full variational bound (`losses.bits_per_dim`): T network calls per image, so
    this costs about as much as sampling the test split with the T-step ancestral sampler.
    """
    setup = Setup(config)
    state, restored = restore_for_inference(setup, workdir, step)
    d, df = config.data, config.diffusion
    eval_iter = data.make_eval_iterator(
        open_split(config, d.eval_split),
        image_size=d.image_size,
        channels=d.channels,
        batch_size=config.train.eval_batch_size,
    )
    eval_step = make_eval_step(
        setup.model,
        setup.schedule,
        setup.mesh,
        params_sharding=setup.params_sharding,
        **_loss_kwargs(config),
    )
    bpd_step = make_bpd_step(
        setup.model,
        setup.schedule,
        setup.mesh,
        target=df.target,
        variance=config.sampler.variance,
        learned_variance=df.learned_variance,
        params_sharding=setup.params_sharding,
    )
    sums, count = {}, 0
    log.info("eval: the bound costs %d network calls per test image", setup.schedule.num_steps)
    for i, batch in enumerate(
        tqdm.tqdm(eval_iter, desc="eval", unit="batch", disable=jax.process_index() != 0)
    ):
        mask = batch.pop("mask")
        batch = sharding.global_batch(batch, setup.mesh)
        key = jax.random.fold_in(setup.eval_key, i)
        parts = {
            "loss": eval_step(state.ema_params, batch, key),
            **bpd_step(state.ema_params, batch, jax.random.fold_in(key, 1)),
        }
        mask = sharding.to_host(sharding.global_batch(mask, setup.mesh))
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + float(np.sum(sharding.to_host(value) * mask))
        count += int(mask.sum())
    names = {
        "loss": "eval/loss",
        "total": "eval/bpd",
        "prior": "eval/bpd_prior",
        "decoder": "eval/bpd_decoder",
        "kl": "eval/bpd_kl",
    }
    result = {
        "step": restored,
        **{names[k]: v / max(count, 1) for k, v in sums.items()},
        "eval/examples": count,
    }
    writer = MetricWriter(workdir)
    writer.write(restored, {k: v for k, v in result.items() if k.startswith("eval/")})
    writer.close()
    log.info("eval at step %d: %s", restored, result)
    return result
