"""What the training loop runs: a task's compiled step, its preview and its extra scalars.

The loop (`train.py`) knows resume, cadence, signals, the NaN guard and checkpoints; everything
that depends on what is trained comes from here, chosen by `config.task`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from diffjax import build, infer, steps


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


TASKS = {"diffusion": diffusion, "classifier": classifier}


def for_setup(setup: build.Setup) -> Task:
    return TASKS[setup.config.task](setup)
