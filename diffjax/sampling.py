"""The compiled sampling programs: noise, the guided sampler chain, DDIM inversion and the
diffusion classifier, sharded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import editing, guidance, samplers, schedules, sharding
from diffjax.cond import UNCONDITIONAL, Conditioner
from diffjax.steps import (
    classifier_logits,
    compiler_options,
    make_denoise_fn,
    params_sharding_or_replicated,
)

Array = jnp.ndarray


def make_noise_fn(mesh: jax.sharding.Mesh, shape: tuple[int, ...]) -> Callable[[Array], Array]:
    """Compiled `key -> N(0, I) [shape]`, drawn at the global shape and split over the mesh."""
    return jax.jit(
        lambda key: jax.random.normal(key, shape, jnp.float32),
        out_shardings=sharding.batch_sharded(mesh),
    )


def _guided(model, params, conditioner, schedule, pred, null_c, scale, rescale, classifier=None):
    """The network's denoise_fn, classifier-free guided when it is conditional, and classifier
    guided when `classifier` = (module, params, scale) is given."""
    denoise = make_denoise_fn(model, params)
    if conditioner.conditional:
        denoise = guidance.classifier_free(
            denoise, null_c, scale, rescale, learned_variance=pred.learned_variance
        )
    if classifier is None:
        return denoise
    module, cls_params, cls_scale = classifier
    inner = denoise
    if not conditioner.num_classes:  # the labels are the classifier's alone
        inner = lambda x, t, c: denoise(x, t, c.replace(label=None))
    grad = guidance.log_prob_grad(classifier_logits(module, cls_params))
    return guidance.classifier(
        inner,
        grad,
        schedule,
        cls_scale,
        target=pred.target,
        learned_variance=pred.learned_variance,
    )


def make_sample_fn(
    model: Any,
    schedule: schedules.Schedule,
    mesh: jax.sharding.Mesh,
    *,
    sampler: str = "ddpm",
    pred: samplers.Prediction = samplers.EPS_CLIPPED,
    variance: str = "beta",
    conditioner: Conditioner = UNCONDITIONAL,
    progress: Callable[[Array], None] | None = None,
    params_sharding: Any = None,
    classifier: Any = None,
    hook: Callable[[schedules.Schedule, Any], samplers.Hook] | None = None,
    jumps: bool = False,
):
    """`sample(params, x_T, cond, key, table, num_steps, eta=0, guidance_scale=1, *,
    null_cond=None, guidance_rescale=0, classifier_params=None, classifier_scale=0,
    hook_args=None) -> samples [B, H, W, C]`, compiled.

    The caller gives the start `x_T` (noise, or an image noised to the table's first level) and
    the condition (`conditioner.labels(...)`, NONE for an unconditional model); nothing random
    but the sampler's own noise (from `key`) is drawn inside. The whole chain runs in one program
    with the batch split over devices. `table` and `num_steps` come from
    `samplers.timestep_table` (or `samplers.start_at`); they, η, the guidance scale w and the
    rescale φ are traced, so one compilation serves every step count up to the table's size and
    every w. A conditional model is sampled with classifier-free guidance
    (`guidance.classifier_free`; w = 1 is the plain conditional model) against `null_cond`,
    by default `conditioner.null(cond)`; a negative prompt's condition can stand in for it.
    With `classifier` (a noise-conditional classifier module, `classifier_classes` > 0) the
    chain is also classifier-guided towards `cond.label` at strength `classifier_scale`.
    An edit passes `hook`, a factory `(schedule, hook_args) -> samplers.Hook`, and each call its
    `hook_args` (a pytree of [B, ...] arrays, e.g. the known image and its mask): they are traced,
    so new images and masks reuse the program. `jumps`: tables may go back up (RePaint).
    """

    def run(params, x_T, c, null_c, key, table, num_steps, eta, scale, rescale, cls, cls_scale,
            hook_args):  # fmt: skip
        guide = None if classifier is None else (classifier, cls, cls_scale)
        denoise = _guided(model, params, conditioner, schedule, pred, null_c, scale, rescale, guide)
        return samplers.SAMPLERS[sampler](
            denoise,
            schedule,
            x_T,
            c,
            key,
            table,
            num_steps,
            eta=eta,
            variance=variance,
            pred=pred,
            progress=progress,
            hook=None if hook is None else hook(schedule, hook_args),
            jumps=jumps,
        )

    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    params_sh = params_sharding_or_replicated(params_sharding, mesh)
    compiled = jax.jit(
        run,
        in_shardings=(params_sh, batch_sh, batch_sh, batch_sh) + (rep,) * 8 + (batch_sh,),
        out_shardings=batch_sh,
        compiler_options=compiler_options(),
    )

    def sample(
        params,
        x_T,
        cond,
        key,
        table,
        num_steps,
        eta=0.0,
        guidance_scale=1.0,
        *,
        null_cond=None,
        guidance_rescale=0.0,
        classifier_params=None,
        classifier_scale=0.0,
        hook_args=None,
    ):
        null_cond = conditioner.null(cond) if null_cond is None else null_cond
        scalars = (np.float32(eta), np.float32(guidance_scale), np.float32(guidance_rescale))
        return compiled(
            params,
            x_T,
            cond,
            null_cond,
            key,
            table,
            np.int32(num_steps),
            *scalars,
            classifier_params,
            np.float32(classifier_scale),
            hook_args,
        )

    return sample


def make_invert_fn(
    model: Any,
    schedule: schedules.Schedule,
    mesh: jax.sharding.Mesh,
    *,
    pred: samplers.Prediction = samplers.EPS_UNCLIPPED,
    conditioner: Conditioner = UNCONDITIONAL,
    params_sharding: Any = None,
):
    """Compiled DDIM inversion `(params, images, cond, table, num_steps, guidance_scale=1) ->
    latents`, the batch split over devices (`samplers.ddim_invert`), guided like `make_sample_fn`
    for conditional models (null side `null_cond`, by default `conditioner.null(cond)`; a text
    model's is the empty prompt's, `infer.null_cond`)."""

    def run(params, images, c, null_c, table, num_steps, scale):
        denoise = _guided(model, params, conditioner, schedule, pred, null_c, scale, 0.0)
        return samplers.ddim_invert(denoise, schedule, images, c, table, num_steps, pred=pred)

    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    compiled = jax.jit(
        run,
        in_shardings=(params_sharding_or_replicated(params_sharding, mesh),)
        + (batch_sh,) * 3
        + (rep,) * 3,
        out_shardings=batch_sh,
        compiler_options=compiler_options(),
    )

    def invert(params, images, cond, table, num_steps, guidance_scale=1.0, *, null_cond=None):
        null_c = conditioner.null(cond) if null_cond is None else null_cond
        return compiled(
            params, images, cond, null_c, table, np.int32(num_steps), np.float32(guidance_scale)
        )

    return invert


def make_classify_fn(
    model: Any,
    schedule: schedules.Schedule,
    mesh: jax.sharding.Mesh,
    num_classes: int,
    *,
    pred: samplers.Prediction = samplers.EPS_UNCLIPPED,
    params_sharding: Any = None,
):
    """Compiled diffusion classifier `(params, x0, cond, key, ts) -> errors [B, K]`
    (`editing.class_errors`) of a class-conditional model, the batch split over devices. The
    trials' timesteps `ts` [N] are an argument: another N compiles again, other values do not."""

    def run(params, x0, c, key, ts):
        denoise = make_denoise_fn(model, params)
        return editing.class_errors(denoise, schedule, x0, c, num_classes, ts, key, pred)

    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(
        run,
        in_shardings=(params_sharding_or_replicated(params_sharding, mesh), batch_sh, batch_sh)
        + (rep,) * 2,
        out_shardings=batch_sh,
        compiler_options=compiler_options(),
    )
