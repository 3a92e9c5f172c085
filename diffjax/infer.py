"""Inference: load EMA parameters, sample (conditioned and guided), evaluate the test split."""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from diffjax import build, checkpoint, data, image_io, latent_setup, sharding
from diffjax.build import Setup
from diffjax.metrics import MetricWriter
from diffjax.steps import make_bpd_step, make_eval_step

log = logging.getLogger(__name__)


class SampleError(ValueError):
    """A request the model cannot serve: a label or prompt it was not trained for."""


def sample_labels(num_classes: int, num: int, label: int | str | None) -> tuple[np.ndarray, int]:
    """The class of each of `num` samples, and the grid's images per row.

    None: every class in turn (an even cover; a grid column per class); an int: that class
    throughout; "all": one grid row per class, ceil(num / num_classes) samples each (so
    num_classes · that many in all).
    """
    if not num_classes:
        if label is not None:
            raise SampleError(
                f"label={label!r} given, but the model is unconditional (model.num_classes=0)"
            )
        return None, None
    if label == "all":
        per = math.ceil(num / num_classes)
        return np.repeat(np.arange(num_classes, dtype=np.int32), per), per
    if label is None:
        return np.arange(num, dtype=np.int32) % num_classes, num_classes
    if isinstance(label, str) and not label.isdigit() or not 0 <= int(label) < num_classes:
        raise SampleError(
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
    prompt: str | None = None,
    negative_prompt: str | None = None,
) -> np.ndarray:
    """Draws `num` samples with `params`; writes a PNG grid and an .npz (`images`; `labels` or
    `prompts` for conditional models; `settings`) beside it; the PNG's text chunks hold the
    settings too.

    `label` as in `sample_labels` (class-conditional models). Text models (`setup.load_text`
    first) sample `prompt` for every image, or the grid prompts in turn (a column each);
    `negative_prompt` replaces the empty prompt as the null side of guidance. With `progress`, a
    bar follows every denoising step (a host callback inside the loop).
    """
    labels, ncol = sample_labels(setup.label_classes, num, label)
    num = num if labels is None else len(labels)
    texts = _sample_prompts(setup, num, prompt)
    if texts is not None and prompt is None:
        ncol = len(setup.grid_prompts)
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

    conditions = spatial_conditions(setup, num)
    fn = setup.sample_fn(bs, progress=advance if bar is not None else None)
    null = null_cond(setup, bs, negative_prompt) if texts is not None else None
    out = []
    for b in range(n_batches):
        batch_index[0] = b
        part = lambda a, b=b: None if a is None else np.resize(a[b * bs : (b + 1) * bs], bs)
        if texts is None:
            c = setup.labels_cond(np.zeros(bs) if labels is None else part(labels))
        else:
            c = setup.prompt_cond(setup.text_side, part(np.asarray(texts, object)), part(labels))
        if conditions is not None:  # a spatial model's: made from the eval split's images
            mine = np.resize(conditions[b * bs : (b + 1) * bs], (bs, *conditions.shape[1:]))
            concat = setup.conditioner.fold(
                sharding.from_global(mine, sharding.batch_sharded(setup.mesh))
            )
            c = c.replace(concat=concat)
            null = None if null is None else null.replace(concat=concat)
        x = fn(params, jax.random.fold_in(key, b), c, null)
        out.append(sharding.to_host(setup.decode(x)))  # a latent model's samples are decoded
    if bar is not None:
        bar.close()
    images = np.concatenate(out)[:num]
    if jax.process_index() == 0:
        extra = dict(label=label, prompt=prompt, negative_prompt=negative_prompt)
        meta = sampler_metadata(setup, **extra, **(metadata or {}))
        image_io.save_grid(images, path, ncol=ncol, metadata=meta)
        arrays = dict(images=images, settings=json.dumps(meta))
        if labels is not None:
            arrays["labels"] = labels
        if texts is not None:
            arrays["prompts"] = np.asarray(texts)
        if conditions is not None:
            arrays["conditions"] = conditions
        np.savez_compressed(os.path.splitext(path)[0] + ".npz", **arrays)
    return images


def spatial_conditions(setup: Setup, num: int) -> np.ndarray | None:
    """A spatial model's conditions for `num` samples: those of the eval split's first images
    (their low-res versions, or masked with the fixed evaluation masks); None for other models."""
    c = setup.conditioner
    if not c.spatial:
        return None
    d = setup.config.data
    source = build.open_split(setup.config, d.eval_split)
    read = build.images_of(source, d.image_size, d.channels, resize=d.resize)
    images = read(0, min(num, len(source)))
    images = np.resize(images, (num, *images.shape[1:]))
    return np.asarray(c.spatial_of(jnp.asarray(images)))


def _sample_prompts(setup: Setup, num: int, prompt: str | None) -> list[str] | None:
    if not setup.conditioner.text:
        if prompt is not None:
            raise SampleError("a prompt was given, but the model has no text conditioning")
        return None
    if prompt is not None:
        if not prompt.strip():
            raise SampleError("the prompt is empty; give the text to draw (e.g. 'a handwritten 3')")
        return [prompt] * num
    grid = setup.grid_prompts or [""]
    return [grid[i % len(grid)] for i in range(num)]


def null_cond(setup: Setup, batch: int, negative_prompt: str | None):
    """The null side for a text model: the empty prompt (or the negative one), null label."""
    labels = None
    if setup.conditioner.num_classes:
        labels = np.full(batch, setup.conditioner.num_classes, np.int32)
    return setup.prompt_cond(setup.text_side, [negative_prompt or ""] * batch, labels)


def restore_for_inference(setup: Setup, workdir: str, step: int | None):
    """(state, step) of a checkpoint; a latent model also gets its latent scale from it."""
    latent_setup.check_same_process(setup.config, workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)
    try:
        state, meta, restored = ckpt.restore(setup.abstract_state, step)
    finally:
        ckpt.close()
    if setup.codec is not None:
        if "latent" not in meta:
            raise checkpoint.CheckpointError(
                f"the checkpoint at step {restored} in {workdir} is not a latent model's (no "
                f"latent scale); leave config.latent empty to use it"
            )
        setup.set_latent_scale(meta["latent"])
    return state, restored


def load_ema(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
    """For notebooks and studies: `(setup, ema_params, step)` from a workdir's checkpoint.

    `setup.model`, `setup.schedule` and `setup.mesh` are what `sampling.make_sample_fn` takes.
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
    prompt: str | None = None,
    negative_prompt: str | None = None,
) -> str:
    """Samples from a checkpoint's EMA parameters; writes `samples/sample_<step>.png` and `.npz`.

    `label` (class-conditional models): a class, "all" (a row per class) or None (every class
    in turn). `prompt` (text models): the text to draw, every sample; None: the training
    grid's prompts in turn. `negative_prompt`: the null side of guidance instead of "". The
    guidance scale is `config.sampler.guidance_scale`.
    """
    setup = Setup(config)
    num = num_samples or config.train.num_samples
    sample_labels(setup.label_classes, num, label)  # bad input fails before loading
    if negative_prompt is not None and not setup.conditioner.text:
        raise SampleError("a negative prompt was given, but the model has no text conditioning")
    _sample_prompts(setup, 1, prompt)
    if setup.conditioner.text:
        setup.load_text(workdir)
    state, restored = restore_for_inference(setup, workdir, step)
    path = os.path.join(workdir, "samples", f"sample_{restored:07d}.png")
    write_samples(
        setup,
        state.ema_params,
        num,
        setup.sample_key,
        path,
        True,
        label,
        metadata={"checkpoint_step": restored},
        prompt=prompt,
        negative_prompt=negative_prompt,
    )
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
    source = build.open_split(config, d.eval_split)
    captions = build.captions(config, source) if setup.conditioner.text else None
    if captions is not None:
        setup.load_text(workdir, captions)
    eval_iter = data.make_eval_iterator(
        source,
        image_size=d.image_size,
        channels=d.channels,
        batch_size=config.train.eval_batch_size,
        captions=captions,
        resize=d.resize,
    )
    eval_step = make_eval_step(
        setup.model,
        setup.schedule,
        setup.mesh,
        params_sharding=setup.params_sharding,
        conditioner=setup.conditioner,
        to_x0=setup.to_x0,
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
    if setup.codec is None:
        log.info("eval: the bound costs %d network calls per test image", setup.schedule.num_steps)
    else:
        log.info("eval: a latent model reports its loss only (bits/dim is for pixel models)")
    for i, batch in enumerate(
        tqdm.tqdm(eval_iter, desc="eval", unit="batch", disable=jax.process_index() != 0)
    ):
        mask = batch.pop("mask")
        batch = sharding.global_batch(batch, setup.mesh)
        key = jax.random.fold_in(setup.eval_key, i)
        parts = {"loss": eval_step(state.ema_params, batch, key, setup.frozen)}
        if setup.codec is None:  # bits/dim of latents would not be the images' bits/dim
            parts.update(
                bpd_step(state.ema_params, batch, jax.random.fold_in(key, 1), setup.frozen)
            )
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
