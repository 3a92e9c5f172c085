"""Inference: load EMA parameters, sample (conditioned and guided), evaluate the test split."""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import ml_collections
import numpy as np
import tqdm

from diffjax import build, checkpoint, data, image_io, sharding
from diffjax.build import Setup
from diffjax.metrics import MetricWriter
from diffjax.steps import make_bpd_step, make_eval_step

log = logging.getLogger(__name__)


def sample_labels(num_classes: int, num: int, label: int | str | None) -> tuple[np.ndarray, int]:
    """The class of each of `num` samples, and the grid's images per row.

    None: every class in turn (an even cover; a grid column per class); an int: that class
    throughout; "all": one grid row per class, ceil(num / num_classes) samples each (so
    num_classes · that many in all).
    """
    if not num_classes:
        if label is not None:
            raise ValueError(
                f"label={label!r} given, but the model is unconditional (model.num_classes=0)"
            )
        return None, None
    if label == "all":
        per = math.ceil(num / num_classes)
        return np.repeat(np.arange(num_classes, dtype=np.int32), per), per
    if label is None:
        return np.arange(num, dtype=np.int32) % num_classes, num_classes
    if isinstance(label, str) and not label.isdigit() or not 0 <= int(label) < num_classes:
        raise ValueError(
            f"label={label!r}: a class in [0, {num_classes - 1}] or 'all' "
            f"(model.num_classes={num_classes})"
        )
    return np.full(num, int(label), np.int32), None


def sampler_metadata(setup: Setup, **extra) -> dict[str, str]:
    """What made a grid, for the PNG's text chunks and the .npz: sampler, steps, η, guidance."""
    s = setup.config.sampler
    meta = dict(sampler=s.name, steps=s.steps, spacing=s.spacing, eta=s.eta, seed=setup.config.seed)
    if setup.conditioner.conditional:
        meta.update(guidance_scale=s.guidance_scale, guidance_rescale=s.guidance_rescale)
    meta.update({k: v for k, v in extra.items() if v is not None})
    return {k: str(v) for k, v in meta.items()}


def write_samples(
    setup: Setup,
    params,
    num: int,
    key,
    path: str,
    progress: bool = False,
    label: int | str | None = None,
    metadata: dict | None = None,
) -> np.ndarray:
    """Draws `num` samples with `params`; writes a PNG grid and an .npz (`images`, and `labels`
    for class-conditional models) beside it.

    `label` as in `sample_labels` (class-conditional models only). With `progress`, a bar follows
    every denoising step (a host callback inside the loop).
    """
    labels, ncol = sample_labels(setup.conditioner.num_classes, num, label)
    num = num if labels is None else len(labels)
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
        part = np.zeros(bs) if labels is None else np.resize(labels[b * bs : (b + 1) * bs], bs)
        c = setup.labels_cond(part)
        out.append(sharding.to_host(fn(params, jax.random.fold_in(key, b), c)))
    if bar is not None:
        bar.close()
    images = np.concatenate(out)[:num]
    if jax.process_index() == 0:
        meta = sampler_metadata(setup, label=label, **(metadata or {}))
        image_io.save_grid(images, path, ncol=ncol, metadata=meta)
        arrays = dict(images=images) if labels is None else dict(images=images, labels=labels)
        np.savez_compressed(os.path.splitext(path)[0] + ".npz", **arrays, settings=json.dumps(meta))
    return images


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
    label: int | str | None = None,
) -> str:
    """Samples from a checkpoint's EMA parameters; writes `samples/sample_<step>.png` and `.npz`.

    `label` (class-conditional models): a class, "all" (a row per class) or None (every class
    in turn); guidance from `config.sampler.guidance_scale`.
    """
    setup = Setup(config)
    num = num_samples or config.train.num_samples
    sample_labels(setup.conditioner.num_classes, num, label)  # a bad label fails before loading
    state, restored = restore_for_inference(setup, workdir, step)
    path = os.path.join(workdir, "samples", f"sample_{restored:07d}.png")
    meta = {"checkpoint_step": restored}
    write_samples(setup, state.ema_params, num, setup.sample_key, path, True, label, metadata=meta)
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
        build.open_split(config, d.eval_split),
        image_size=d.image_size,
        channels=d.channels,
        batch_size=config.train.eval_batch_size,
    )
    eval_step = make_eval_step(
        setup.model,
        setup.schedule,
        setup.mesh,
        params_sharding=setup.params_sharding,
        conditioner=setup.conditioner,
        **build.loss_kwargs(config),
    )
    bpd_step = make_bpd_step(
        setup.model,
        setup.schedule,
        setup.mesh,
        target=df.target,
        variance=config.sampler.variance,
        learned_variance=df.learned_variance,
        params_sharding=setup.params_sharding,
        conditioner=setup.conditioner,
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
            "loss": eval_step(state.ema_params, batch, key, setup.frozen),
            **bpd_step(state.ema_params, batch, jax.random.fold_in(key, 1), setup.frozen),
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
