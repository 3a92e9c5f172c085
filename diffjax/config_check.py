"""Config checks: cross-field rules, each error naming the field; shapes asked of the network."""

from __future__ import annotations

import contextlib
import math
import os

import jax
import ml_collections

from diffjax import losses, samplers, schedules, sharding, spatial
from diffjax.data.pipeline import RESIZE
from diffjax.models.layers import ShapeError
from diffjax.train_state import LR_SCHEDULES

TEXT_ENCODERS = ("", "joint", "minilm", "clip")
TASKS = ("diffusion", "classifier", "autoencoder")


class ConfigError(ValueError):
    """A config field has a bad value."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Rejects a bad configuration before anything is built or compiled, naming the field."""

    def fail(field, msg):
        raise ConfigError(f"config.{field}: {msg}")

    m, d, tr = config.model, config.data, config.train
    if d.channels not in (1, 3):
        fail("data.channels", f"must be 1 or 3, got {d.channels}")
    if d.resize not in RESIZE:
        fail("data.resize", f"unknown {d.resize!r}; choose one of {sorted(RESIZE)}")
    if not d.get("cache_mib", 0) >= 0:  # also catches NaN
        fail("data.cache_mib", f"must be >= 0 (0 = keep nothing), got {d.cache_mib}")
    if d.name == "image_folder" and not d.folder:
        fail("data.folder", "data.name='image_folder' needs the path of your image directory")
    if not 0.0 <= m.dropout < 1.0:
        fail("model.dropout", f"must be in [0, 1), got {m.dropout}")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        fail("model.dtype", f"must be float32, bfloat16 or float16, got {m.dtype!r}")
    if m.get("downsample_padding", 0) not in (0, 1):
        fail("model.downsample_padding", f"must be 0 or 1, got {m.downsample_padding}")
    _check_conditioning(config, fail)
    _check_spatial(config, fail)
    if config.diffusion.schedule not in schedules.SCHEDULES:
        fail(
            "diffusion.schedule",
            f"unknown {config.diffusion.schedule!r}; choose one of {sorted(schedules.SCHEDULES)}",
        )
    s = config.sampler
    if s.get("steps_offset", 0) and (s.spacing != "leading" or s.steps_offset < 0):
        fail("sampler.steps_offset", f"{s.steps_offset} needs spacing='leading' and >= 0")
    if not s.get("set_alpha_to_one", True) and s.name == "ddpm":
        fail("sampler.set_alpha_to_one", "False is for the DDIM-family samplers, not 'ddpm'")
    df = config.diffusion
    betas = (df.get("beta_start", 0.0), df.get("beta_end", 0.0))
    if any(betas) and df.schedule not in ("linear", "scaled_linear"):
        fail(
            "diffusion.beta_start",
            f"and beta_end are for linear and scaled_linear, not {df.schedule!r}",
        )
    if any(betas) and not 0.0 < betas[0] < betas[1] < 1.0:
        fail(
            "diffusion.beta_start", f"and beta_end need 0 < beta_start < beta_end < 1, got {betas}"
        )
    if config.diffusion.num_steps < 2:
        fail("diffusion.num_steps", "must be at least 2")
    _check_diffusion(config.diffusion, fail)
    _check_sampler(config.sampler, config.diffusion.num_steps, fail)
    n_dev = mesh_size(config)
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
    _check_autoencoder(config, fail)
    _check_latent(config, fail)


def _check_autoencoder(config, fail) -> None:
    a = config.autoencoder
    if not a.block_out_channels or min(a.block_out_channels) < 1:
        fail("autoencoder.block_out_channels", "one positive channel count per level")
    for field in ("layers_per_block", "latent_channels", "num_groups"):
        if a[field] < 1:
            fail(f"autoencoder.{field}", f"must be >= 1, got {a[field]}")
    if a.kl_weight < 0 or a.disc_weight < 0:
        field = "kl_weight" if a.kl_weight < 0 else "disc_weight"
        fail(f"autoencoder.{field}", "must be >= 0")
    if a.perceptual_weight:
        fail(
            "autoencoder.perceptual_weight",
            "LPIPS needs a pretrained VGG, which diffjax cannot fetch; keep it 0 (the hook is "
            "ae_steps.make_train_step's loss)",
        )
    if a.disc_weight > 0 and (a.disc_layers < 1 or a.disc_channels < 1):
        fail("autoencoder.disc_layers", "the discriminator needs >= 1 layer and channel")
    if config.task == "autoencoder" and (
        config.latent.autoencoder_workdir or config.latent.diffusers_vae
    ):
        fail("latent", "an autoencoder is trained on pixels; leave config.latent empty")


def _check_spatial(config, fail) -> None:
    sp, size = config.spatial, config.data.image_size
    if sp.kind not in ("",) + spatial.KINDS:
        fail("spatial.kind", f"unknown {sp.kind!r}; choose '' or one of {spatial.KINDS}")
    if not sp.kind:
        return
    if config.task != "diffusion":
        fail("spatial.kind", f"is for diffusion models, not task={config.task!r}")
    latent = bool(config.latent.autoencoder_workdir or config.latent.diffusers_vae)
    if sp.kind == "inpaint_encoded" and not latent:
        fail("spatial.kind", "'inpaint_encoded' is a latent model's (Stable Diffusion inpainting)")
    if sp.kind == "upscale" and (sp.factor < 2 or size % sp.factor):
        fail("spatial.factor", f"must be >= 2 and divide data.image_size={size}, got {sp.factor}")


def _check_latent(config, fail) -> None:
    lt, sp = config.latent, config.sampler
    if not (lt.autoencoder_workdir or lt.diffusers_vae):
        return
    if lt.autoencoder_workdir and lt.diffusers_vae:
        fail("latent.diffusers_vae", "name one autoencoder: autoencoder_workdir or diffusers_vae")
    if config.task != "diffusion":
        fail("latent", f"task={config.task!r} runs on pixels; leave config.latent empty")
    if sp.clip_x0 or sp.dynamic_threshold:
        fail(
            "sampler.clip_x0" if sp.clip_x0 else "sampler.dynamic_threshold",
            "clips x̂₀ to the pixel range, which latents do not have; set it off "
            "(clip_x0=False, dynamic_threshold=0) for a latent model",
        )
    if lt.scale < 0 or lt.scale_examples < 1 or lt.autoencoder_step < 0:
        fail(
            "latent.scale", "scale >= 0 (0 = estimate), scale_examples >= 1, autoencoder_step >= 0"
        )


def _check_text(config, fail) -> None:
    tx, m = config.text, config.model
    if tx.encoder not in TEXT_ENCODERS:
        fail("text.encoder", f"unknown {tx.encoder!r}; choose one of {TEXT_ENCODERS}")
    if m.context_dim:
        fail("model.context_dim", "is set from config.text.encoder; leave it 0")
    if not tx.encoder:
        return
    if tx.encoder == "clip" and not (tx.pretrained_dir and tx.get("tokenizer_dir")):
        fail(
            "text.pretrained_dir",
            "text.encoder='clip' needs the CLIPTextModel folder here and the tokenizer's in "
            "text.tokenizer_dir (a Stable Diffusion pipeline's text_encoder/ and tokenizer/)",
        )
    if tx.max_length < 2:
        fail("text.max_length", f"must be >= 2 ([CLS] and [SEP]), got {tx.max_length}")
    if not (m.attention_resolutions or m.mid_attention):
        fail(
            "model.attention_resolutions",
            "a text model cross-attends where the U-Net attends: name a resolution or keep "
            "model.mid_attention=True",
        )
    if tx.encoder == "joint":
        if tx.width < 1 or tx.heads < 1 or tx.width % tx.heads:
            fail("text.heads", f"{tx.heads} must divide text.width={tx.width}")
        if tx.layers < 1:
            fail("text.layers", f"must be >= 1, got {tx.layers}")
        if tx.vocab_size < 5:
            fail(
                "text.vocab_size",
                f"must be >= 5 (4 special tokens and a word), got {tx.vocab_size}",
            )


def _check_task(config, fail) -> None:
    m, sp = config.model, config.sampler
    if config.task not in TASKS:
        fail("task", f"unknown {config.task!r}; choose one of {TASKS}")
    if config.task == "classifier":
        if m.classifier_classes < 2:
            fail("model.classifier_classes", "task='classifier' needs the number of classes (>= 2)")
        if m.num_classes or config.text.encoder:
            fail("task", "the classifier reads x_t alone: set model.num_classes=0, text.encoder=''")
    elif m.classifier_classes:
        fail("model.classifier_classes", "is for task='classifier'; leave it 0 for diffusion")
    if sp.classifier_scale < 0:
        fail("sampler.classifier_scale", f"must be >= 0, got {sp.classifier_scale}")
    if bool(sp.classifier_workdir) != bool(sp.classifier_config):
        fail(
            "sampler.classifier_workdir",
            "classifier guidance needs both sampler.classifier_config and "
            "sampler.classifier_workdir (the classifier's config and its training run)",
        )


def _check_conditioning(config, fail) -> None:
    _check_task(config, fail)
    _check_text(config, fail)
    m, sp = config.model, config.sampler
    if m.num_classes < 0:
        fail("model.num_classes", f"must be >= 0 (0 = unconditional), got {m.num_classes}")
    if not 0.0 <= m.cond_drop_prob < 1.0:
        fail("model.cond_drop_prob", f"must be in [0, 1), got {m.cond_drop_prob}")
    if sp.guidance_scale < 0:
        fail("sampler.guidance_scale", f"must be >= 0 (1 = no guidance), got {sp.guidance_scale}")
    if not 0.0 <= sp.guidance_rescale <= 1.0:
        fail("sampler.guidance_rescale", f"must be in [0, 1], got {sp.guidance_rescale}")
    if (m.num_classes or config.text.encoder) and m.cond_drop_prob == 0 and sp.guidance_scale != 1:
        fail(
            "sampler.guidance_scale",
            f"{sp.guidance_scale} needs the null condition, which model.cond_drop_prob=0 never "
            f"trains; use guidance_scale=1 or train with model.cond_drop_prob > 0",
        )


def _check_diffusion(df, fail) -> None:
    for field, value, choices in (
        ("target", df.target, schedules.PREDICTION_TARGETS),
        ("loss", df.loss, losses.LOSSES),
        ("t_sampling", df.t_sampling, losses.T_SAMPLING),
    ):
        if value not in choices:
            fail(f"diffusion.{field}", f"unknown {value!r}; choose one of {choices}")
    scale = df.get("snr_scale", 1.0)
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        fail("diffusion.snr_scale", f"must be a positive number (1 = the schedule's), got {scale}")
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


def mesh_size(config) -> int:
    """Devices of the config's mesh (a bad mesh.* value is a ConfigError)."""
    try:
        return sharding.make_mesh(config.mesh.data, config.mesh.fsdp).size
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None


@contextlib.contextmanager
def network_shapes(config, section: str = "model"):
    """Turns the network's own shape errors (raised while `jax.eval_shape` traces its init) into
    ConfigErrors naming the config field (in `section`): the rules live in the network."""
    try:
        yield
    except ShapeError as e:
        field = "data.image_size" if e.field == "input" else f"{section}.{e.field}"
        raise ConfigError(f"config.{field}: {e.message} (model and data settings)") from None


def check_labels(config, dataset_classes: int, has_labels: bool) -> None:
    """A class-conditional model (or a classifier) needs the dataset's ClassLabel with the same
    number of classes."""
    field = "classifier_classes" if config.task == "classifier" else "num_classes"
    n = config.model[field]
    if n and not has_labels:
        raise ConfigError(
            f"config.model.{field}: {n}, but dataset {config.data.name!r} has no class "
            f"labels; set model.{field}=0"
        )
    if n and n != dataset_classes:
        raise ConfigError(
            f"config.model.{field}: {n}, but dataset {config.data.name!r} has "
            f"{dataset_classes} classes; set model.{field}={dataset_classes}"
        )
