"""Config → components: mesh, network, optimizer, schedule, conditioner, compiled samplers."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from diffjax import config_check, data, samplers, schedules, sharding, steps, train_state
from diffjax.cond import Cond, Conditioner
from diffjax.models.unet import UNet


def mesh(config) -> jax.sharding.Mesh:
    return sharding.make_mesh(config.mesh.data, config.mesh.fsdp)


def model(config) -> UNet:
    kw = config.model.to_dict()
    kw.pop("cond_drop_prob")  # the conditioner's, not the network's
    kw["dtype"] = jnp.dtype(kw.pop("dtype"))
    kw["attention_resolutions"] = tuple(kw["attention_resolutions"])
    kw["channel_mults"] = tuple(kw["channel_mults"])
    if config.diffusion.learned_variance:  # the mean and the variance interpolant v
        kw["out_channels"] = 2 * config.data.channels
    return UNet(**kw)


def conditioner(config) -> Conditioner:
    return Conditioner(num_classes=config.model.num_classes, drop_prob=config.model.cond_drop_prob)


def optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    return train_state.make_optimizer(
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


def schedule(config) -> schedules.Schedule:
    df = config.diffusion
    return schedules.make_schedule(
        df.schedule, df.num_steps, zero_terminal_snr=df.zero_terminal_snr
    )


def loss_kwargs(config) -> dict:
    df = config.diffusion
    return dict(
        target=df.target,
        loss=df.loss,
        learned_variance=df.learned_variance,
        variance=config.sampler.variance,
        vlb_weight=df.vlb_weight,
        min_snr_gamma=df.min_snr_gamma,
    )


def prediction(config) -> samplers.Prediction:
    s = config.sampler
    df = config.diffusion
    return samplers.Prediction(df.target, df.learned_variance, s.clip_x0, s.dynamic_threshold)


def open_split(config, split: str):
    """The dataset split; on several processes, process 0 prepares it while the others wait."""
    d = config.data
    load = lambda: data.load_source(d.name, split, data_dir(config), folder=d.folder or None)
    if jax.process_count() == 1:
        return load()
    source = load() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"diffjax: dataset {d.name} {split} ready")
    return source if source is not None else load()


def data_dir(config) -> str:
    d = config.data.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return os.path.expanduser(d)


def check_dataset_labels(config, source) -> None:
    """`model.num_classes` against the dataset's ClassLabel, before anything compiles."""
    config_check.check_labels(config, source.num_classes, source.has_labels)


class Setup:
    """Everything the modes share, built from the config (only the top floor reads configs)."""

    def __init__(self, config: ml_collections.ConfigDict):
        config_check.check_config(config)
        self.config = config
        self.mesh = mesh(config)
        self.model = model(config)
        self.conditioner = conditioner(config)
        self.tx = optimizer(config)
        self.schedule = schedule(config)
        d = config.data
        self.image_shape = (d.image_size, d.image_size, d.channels)
        root = jax.random.key(config.seed)
        self.init_key, self.train_key, self.sample_key, self.eval_key = jax.random.split(root, 4)
        with config_check.network_shapes(config):  # the network's own shape rules
            self.abstract_state = self.abstract(self.mesh)
        self.params_sharding = jax.tree.map(lambda a: a.sharding, self.abstract_state.ema_params)
        self.frozen = None  # parameters of frozen networks (none yet), an argument of the steps
        self._sample_fns, self._noise_fns = {}, {}

    def abstract(self, mesh: jax.sharding.Mesh) -> train_state.TrainState:
        return train_state.abstract_train_state(
            self.model,
            self.tx,
            self.image_shape,
            mesh,
            num_timesteps=self.schedule.num_steps,
            example_cond=self.conditioner.example(),
        )

    def create_state(self) -> train_state.TrainState:
        return train_state.create_train_state(
            self.model,
            self.tx,
            self.image_shape,
            self.init_key,
            self.mesh,
            num_timesteps=self.schedule.num_steps,
            example_cond=self.conditioner.example(),
        )

    def sample_fn(self, batch_size: int, progress=None):
        """`(params, key, cond) -> samples [batch_size, H, W, C]` with the config's sampler,
        steps, spacing, η and guidance; x_T is drawn from `key`, the sampler's noise from a key
        split off it. Without a progress callback the program is built once (per batch size).
        """
        s = self.config.sampler
        fn = self._sample_fns.get(batch_size) if progress is None else None
        if fn is None:
            fn = steps.make_sample_fn(
                self.model,
                self.schedule,
                self.mesh,
                sampler=s.name,
                pred=prediction(self.config),
                variance=s.variance,
                conditioner=self.conditioner,
                progress=progress,
                params_sharding=self.params_sharding,
            )
            if progress is None:
                self._sample_fns[batch_size] = fn
        if batch_size not in self._noise_fns:
            shape = (batch_size, *self.image_shape)
            self._noise_fns[batch_size] = steps.make_noise_fn(self.mesh, shape)
        noise = self._noise_fns[batch_size]
        table = samplers.timestep_table(self.schedule.num_steps, s.steps, s.spacing, s.max_steps)

        def sample(params, key, cond: Cond):
            noise_key, loop_key = jax.random.split(key)
            x_T = noise(noise_key)
            scale, rescale = s.guidance_scale, s.guidance_rescale
            return fn(
                params, x_T, cond, loop_key, table, s.steps, s.eta, scale, guidance_rescale=rescale
            )

        return sample

    def labels_cond(self, labels: np.ndarray) -> Cond:
        """The condition for host labels [B], as global arrays split over the mesh."""
        c = self.conditioner.labels(np.asarray(labels, np.int32))
        return sharding.from_global(c, sharding.batch_sharded(self.mesh))
