"""What the training loop runs: a task's compiled step, its preview and its extra scalars.

The loop (`train.py`) knows resume, cadence, signals, the NaN guard and checkpoints; everything
that depends on what is trained comes from here, chosen by `config.task`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from diffjax import ae_steps, build, image_io, infer, sharding, steps


@dataclasses.dataclass(frozen=True)
class Task:
    """Attributes:
    train_step: `(state, batch, key, frozen) -> (state, metrics)`, compiled; metrics has
      "loss" and "grad_norm".
    preview: `(params, path)` writes a grid of the model's output (None: nothing to show).
    scalars: the last step's metrics → extra logged scalars.
    """

    train_step: Callable
    preview: Callable | None
    scalars: Callable[[dict], dict]


def diffusion(setup: build.Setup) -> Task:
    config = setup.config
    step = steps.make_train_step(
        setup.model,
        setup.schedule,
        setup.tx,
        setup.mesh,
        setup.abstract_state,
        ema_decay=config.optim.ema_decay,
        t_sampling=config.diffusion.t_sampling,
        grad_accum_steps=config.train.grad_accum_steps,
        conditioner=setup.conditioner,
        to_x0=setup.to_x0,
        **build.loss_kwargs(config),
    )
    n = config.train.num_samples

    def preview(params, path):
        infer.write_samples(setup, params, n, setup.sample_key, path)

    def scalars(metrics):
        if config.diffusion.loss == "simple":
            return {}
        return {"train/mse": float(metrics["mse"]), "train/vlb_bpd": float(metrics["vlb"])}

    return Task(step, preview, scalars)


def classifier(setup: build.Setup) -> Task:
    """The noise-conditional classifier that classifier guidance reads (`sampler.classifier_*`)."""
    step = steps.make_classifier_train_step(
        setup.model,
        setup.schedule,
        setup.tx,
        setup.mesh,
        setup.abstract_state,
        ema_decay=setup.config.optim.ema_decay,
    )
    return Task(step, None, lambda metrics: {"train/accuracy": float(metrics["accuracy"])})


def autoencoder(setup: build.Setup) -> Task:
    """The KL autoencoder of latent diffusion; its preview is a grid of held-out images (odd
    rows) over their reconstructions (even rows)."""
    config, a = setup.config, setup.config.autoencoder
    step = ae_steps.make_train_step(
        setup.model,
        setup.discriminator,
        setup.tx,
        setup.mesh,
        setup.abstract_state,
        kl_weight=a.kl_weight,
        disc_weight=a.disc_weight,
        disc_start_steps=a.disc_start_steps,
        ema_decay=config.optim.ema_decay,
    )
    reconstruct = ae_steps.make_reconstruct_fn(setup.model, setup.mesh)
    shown = {}

    def preview(params, path):
        if "images" not in shown:  # the first held-out images, read once
            source = build.open_split(config, config.data.eval_split)
            n = min(config.train.num_samples, len(source))
            n -= n % setup.mesh.size
            read = build.images_of(source, *setup.image_shape[::2], resize=config.data.resize)
            shown["images"] = read(0, n)
        x = shown["images"]
        rep = jax.device_put(params[ae_steps.AE], sharding.replicated(setup.mesh))
        x_hat = sharding.to_host(
            reconstruct(rep, sharding.from_global(x, sharding.batch_sharded(setup.mesh)))
        )
        if jax.process_index() == 0:
            ncol = min(8, len(x))
            rows = [m[i : i + ncol] for i in range(0, len(x), ncol) for m in (x, x_hat)]
            image_io.save_grid(np.concatenate(rows), path, ncol=ncol)

    def scalars(metrics):
        names = ("rec", "kl", "g_loss", "adaptive_weight", "d_loss")
        return {f"train/{k}": float(metrics[k]) for k in names if k in metrics}

    return Task(step, preview, scalars)


TASKS = {"diffusion": diffusion, "classifier": classifier, "autoencoder": autoencoder}


def for_setup(setup: build.Setup) -> Task:
    return TASKS[setup.config.task](setup)
