"""diffusers pipeline directories ↔ diffjax workdirs: what `python -m diffjax.convert` and
`python -m diffjax.main --pretrained DIR` run.

A DDPM pipeline (`model_index.json`, `unet/` a UNet2DModel, `scheduler/`) or a bare UNet2DModel
folder becomes a pixel-space workdir; a Stable Diffusion 1.x/2.x pipeline (`unet/` a
UNet2DConditionModel, `text_encoder/`, `tokenizer/`, `vae/`, `scheduler/`) a text-to-image latent
one whose text encoder and autoencoder are read from the pipeline's folders. Either way the
workdir holds config.json (the base config with the pipeline's model, diffusion, sampler, text,
latent and image size), config.py that loads it, and an Orbax checkpoint at step 0 whose params
and EMA are the pretrained weights.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections

from diffjax import build, checkpoint, cli, config_check, latent_setup, losses
from diffjax.data import tokenizer as tokenizer_lib
from diffjax.models import clip, diffusers_unet, diffusers_vae
from diffjax.models import diffusers_io as io
from diffjax.models.pretrained import PretrainedError
from diffjax.train_state import TrainState

log = logging.getLogger("diffjax")

CONFIG_PY = '''"""The config of the model imported into this workdir by `python -m diffjax.convert`.

    python -m diffjax.main --config {workdir}/config.py --workdir {workdir} --mode=sample
"""

import os

from diffjax.latent_setup import read_run_config


def get_config(arg=None):
    config = read_run_config(os.path.dirname(os.path.abspath(__file__)))
    config.lock()
    return config
'''
SCHEDULER_CLASSES = {  # diffusers scheduler → diffjax sampler, steps
    "DDPMScheduler": ("ddpm", 0),  # 0: all T steps
    "DDIMScheduler": ("ddim", 50),
    "DPMSolverMultistepScheduler": ("dpm_solver_pp", 20),
}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear"}
BETA_SCHEDULES["squaredcos_cap_v2"] = "cosine"
BETA_DEFAULTS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
TARGETS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
VARIANCES = {  # variance_type → (learned, the fixed variance of the ddpm sampler)
    "fixed_small": (False, "posterior"),
    "fixed_small_log": (False, "posterior"),
    "fixed_large": (False, "beta"),
    "fixed_large_log": (False, "beta"),
    "learned_range": (True, "beta"),
}
SPACINGS = {"leading": "leading", "trailing": "trailing", "linspace": "uniform"}


def from_scheduler(scheduler: dict, path: Path) -> tuple[dict, dict, list[str]]:
    """A diffusers `scheduler_config.json` → (diffusion fields, sampler fields, notes).

    What defines the trained model (β schedule, T, prediction target, learned variance) must
    map exactly or is refused by name; sampler preferences diffjax does not follow are notes.
    """
    get = lambda key, default: scheduler.get(key, default)
    if get("trained_betas", None) is not None:
        raise PretrainedError(f"{path}: trained_betas (an explicit β list) is not supported")
    kind = get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES:
        raise PretrainedError(
            f"{path}: beta_schedule={kind!r} is not supported (want one of "
            f"{sorted(BETA_SCHEDULES)})"
        )
    if get("prediction_type", "epsilon") not in TARGETS:
        raise PretrainedError(f"{path}: prediction_type={scheduler['prediction_type']!r} unknown")
    variance = get("variance_type", "fixed_small")
    if variance not in VARIANCES:
        raise PretrainedError(
            f"{path}: variance_type={variance!r} is not supported (want one of {sorted(VARIANCES)})"
        )
    steps = int(get("num_train_timesteps", 1000))
    learned, fixed = VARIANCES[variance]
    diffusion = dict(
        schedule=BETA_SCHEDULES[kind],
        num_steps=steps,
        beta_start=0.0,
        beta_end=0.0,
        target=TARGETS[get("prediction_type", "epsilon")],
        zero_terminal_snr=bool(get("rescale_betas_zero_snr", False)),
        learned_variance=learned,
        loss="hybrid" if learned else "simple",
    )
    if kind in BETA_DEFAULTS:
        keys = ("beta_start", "beta_end")
        betas = tuple(float(get(k, d)) for k, d in zip(keys, BETA_DEFAULTS[kind], strict=True))
        # diffjax's linear β are given for T = 1000 and rescaled by 1000 / T; diffusers' are not.
        scale = steps / 1000 if kind == "linear" else 1.0
        if betas != BETA_DEFAULTS[kind] or scale != 1.0:
            diffusion.update(beta_start=betas[0] * scale, beta_end=betas[1] * scale)
    name, sampler_steps = SCHEDULER_CLASSES.get(scheduler.get("_class_name"), ("ddim", 50))
    notes = []
    if scheduler.get("_class_name") not in SCHEDULER_CLASSES:
        notes.append(f"{scheduler.get('_class_name')} has no diffjax counterpart: DDIM 50 instead")
    spacing = SPACINGS.get(get("timestep_spacing", "leading"), "leading")
    sampler = dict(
        name=name,
        steps=sampler_steps or steps,
        max_steps=max(sampler_steps or steps, min(steps, 1000)),
        spacing=spacing,
        eta=0.0,
        variance=fixed,
        clip_x0=bool(get("clip_sample", name == "ddpm" or name == "ddim")),
        dynamic_threshold=0.0,
    )
    sampler.update(
        steps_offset=int(get("steps_offset", 0)) if spacing == "leading" else 0,
        set_alpha_to_one=bool(get("set_alpha_to_one", True)),
    )
    ignored = {"thresholding": False, "clip_sample_range": 1.0}
    for key, default in ignored.items():
        if key in scheduler and scheduler[key] != default:
            notes.append(f"{key}={scheduler[key]!r} is not followed by diffjax's samplers")
    return diffusion, sampler, notes


UNETS = (diffusers_unet.CLASS_NAME, diffusers_unet.CONDITIONED)
SD_PARTS = ("text_encoder", "tokenizer", "vae")  # besides unet and scheduler


def _components(directory: Path) -> dict[str, Path | None]:
    """The folders of a pipeline's parts ("unet", and "text_encoder", "tokenizer", "vae" for
    Stable Diffusion) and its scheduler config ("scheduler", None if absent); a bare model
    directory is the "unet"."""
    if not directory.is_dir():
        raise PretrainedError(f"--diffusers {directory} is not a directory")
    directory = directory.resolve()  # the workdir's config then works from anywhere
    index = directory / "model_index.json"
    if not index.is_file():
        if not (directory / io.CONFIG_FILE).is_file():
            raise PretrainedError(
                f"--diffusers {directory} has neither model_index.json (a pipeline) nor "
                "config.json (a model)"
            )
        own = directory / "scheduler_config.json"
        sibling = directory.parent / "scheduler" / "scheduler_config.json"
        scheduler = next((p for p in (own, sibling) if p.is_file()), None)
        return {"unet": directory, "scheduler": scheduler}
    components = io.read_json(index)
    entry = components.get("unet")
    if not isinstance(entry, list) or len(entry) != 2:
        raise PretrainedError(f"{index} names no unet component")
    if entry[1] not in UNETS:
        raise PretrainedError(
            f"{index}: unet is a {entry[1]}; diffjax.convert reads pipelines whose unet is one of "
            f"{', '.join(UNETS)} (DDPM, DDIM, Stable Diffusion 1.x/2.x)"
        )
    parts = ("unet", *SD_PARTS) if entry[1] == diffusers_unet.CONDITIONED else ("unet",)
    out = {}
    for part in parts:
        out[part] = directory / part
        if not out[part].is_dir():
            raise PretrainedError(f"{directory}: the pipeline's {part}/ folder is missing")
    scheduler = directory / "scheduler" / "scheduler_config.json"
    if "scheduler" in components and not scheduler.is_file():
        raise PretrainedError(f"{scheduler} is missing")
    out["scheduler"] = scheduler if scheduler.is_file() else None
    return out


def _text_to_image(config: ml_collections.ConfigDict, parts: dict, context_dim: int) -> None:
    """The text, latent and data sections of a Stable Diffusion pipeline: its CLIP text
    encoder and tokenizer, its VAE (the latents' scale from its config) and the image size."""
    text = clip.read_config(parts["text_encoder"])
    if text["hidden_size"] != context_dim:
        raise PretrainedError(
            f"{parts['unet']}: cross_attention_dim={context_dim} but the text encoder's "
            f"hidden_size is {text['hidden_size']}"
        )
    tokenizer = tokenizer_lib.ClipTokenizer(parts["tokenizer"])
    config.text.update(
        encoder="clip",
        pretrained_dir=str(parts["text_encoder"]),
        tokenizer_dir=str(parts["tokenizer"]),
        max_length=tokenizer.max_length,
    )
    path = parts["vae"] / io.CONFIG_FILE
    vae = io.read_json(path, ("AutoencoderKL",))
    factor = 2 ** (len(vae.get("block_out_channels", (64,))) - 1)
    config.latent.update(
        diffusers_vae=str(parts["vae"]),
        scale=float(vae.get("scaling_factor", 0.18215)),
        autoencoder_workdir="",
    )
    config.data.update(
        image_size=config.data.image_size * factor, channels=vae.get("in_channels", 3)
    )
    config.sampler.guidance_scale = 7.5  # Stable Diffusion's pipelines' default


def import_diffusers(
    source: str | Path, workdir: str, base: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """Writes `workdir` (config.json, config.py, a step-0 checkpoint) from a diffusers
    directory; returns the config. `base` provides everything the directory does not say."""
    parts = _components(Path(source))
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        raise cli.BadInput(f"--workdir {workdir} already holds checkpoints; use a fresh one")
    path = parts["unet"] / io.CONFIG_FILE
    fields = diffusers_unet.from_config(io.read_json(path, UNETS), path)
    config = ml_collections.ConfigDict(base.to_dict())
    model = dict(fields["model"])
    context_dim = model.pop("context_dim", 0)  # config.text decides it
    config.model.update(model)
    config.data.update(image_size=fields["image_size"], channels=fields["in_channels"])
    if context_dim:
        z = fields["out_channels"]
        if fields["in_channels"] == 2 * z + 1:  # SD inpainting: latents, mask, masked latents
            config.spatial.kind = "inpaint_encoded"
        elif fields["in_channels"] != z:
            raise PretrainedError(
                f"{path}: in_channels={fields['in_channels']} is not supported (want "
                f"out_channels={z}, or {2 * z + 1} for an inpainting U-Net)"
            )
        _text_to_image(config, parts, context_dim)
        fields["in_channels"] = z
    if parts["scheduler"] is not None:
        scheduler = parts["scheduler"]
        diffusion, sampler, notes = from_scheduler(io.read_json(scheduler), scheduler)
        config.diffusion.update(diffusion)
        config.sampler.update(sampler)
        for note in notes:
            log.warning("%s: %s", scheduler, note)
    else:
        log.warning("%s has no scheduler config: the diffusion section is --config's", source)
    want = fields["out_channels"] // (2 if config.diffusion.learned_variance else 1)
    if fields["in_channels"] != want or fields["out_channels"] % want:
        raise PretrainedError(
            f"{path}: out_channels={fields['out_channels']} does not fit in_channels="
            f"{fields['in_channels']} with learned_variance={config.diffusion.learned_variance}"
        )
    config_check.check_config(config)
    setup = build.Setup(config)
    _, params, _ = diffusers_unet.load(parts["unet"], shardings=setup.params_sharding)
    state = _state_from_params(setup, params)
    meta = {}
    if setup.codec is not None:  # what sampling decodes with, as a latent run's checkpoint has
        meta["latent"] = {"scale": config.latent.scale, "autoencoder": setup.codec.fingerprint}
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoint.Checkpointer(checkpoints, config.train.keep_checkpoints)
    ckpt.save(0, state, meta)
    ckpt.close()
    latent_setup.write_run_config(config, workdir)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.py"), "w") as f:
            f.write(CONFIG_PY.format(workdir=workdir))
    return config


def _state_from_params(setup: build.Setup, params: Any) -> TrainState:
    """A step-0 train state around pretrained params: EMA = params, a fresh optimizer."""
    abstract = setup.abstract_state
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    num_steps = setup.schedule.num_steps

    def make(p):
        return TrainState(
            step=jax.numpy.zeros((), jax.numpy.int32),
            params=p,
            opt_state=setup.tx.init(p),
            ema_params=p,
            loss_history=losses.init_loss_history(num_steps),
        )

    return jax.jit(make, out_shardings=shardings)(params)


def export_diffusers(
    workdir: str, out: str, step: int | None = None, which: str = "ema", overwrite: bool = False
) -> int:
    """Writes a workdir's checkpoint in diffusers' format; returns the step. A pixel-space
    diffusion run becomes a DDPMPipeline; a Stable Diffusion run (an imported pipeline,
    fine-tuned or not) a StableDiffusionPipeline whose text encoder, tokenizer and VAE are
    copied from the folders it was imported from; an autoencoder run an AutoencoderKL folder."""
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise cli.BadInput(f"--to_diffusers {out} exists and is not empty; pass --overwrite")
    config = latent_setup.read_run_config(workdir)
    stable_diffusion = config.text.encoder == "clip" and bool(config.latent.diffusers_vae)
    if config.task == "diffusion" and latent_setup.is_latent(config) and not stable_diffusion:
        raise cli.BadInput(
            "--to_diffusers writes pixel-space U-Nets, Stable Diffusion pipelines (text.encoder="
            "clip with a diffusers VAE) and autoencoders; this latent run is none of them"
        )
    if config.task not in ("diffusion", "autoencoder"):
        raise cli.BadInput(f"--to_diffusers: a task={config.task!r} run has no diffusers layout")
    setup = build.Setup(config)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    state, _, restored = ckpt.restore(setup.abstract_state, step)
    ckpt.close()
    params = state.ema_params if which == "ema" else state.params
    if config.task == "autoencoder":
        diffusers_vae.save(out_dir, setup.model, params["autoencoder"])
        return restored
    diffusers_unet.save(out_dir / "unet", setup.model, params, setup.image_shape[0])
    scheduler = to_scheduler(config)
    index = {"unet": ["diffusers", diffusers_unet.CLASS_NAME]}
    if stable_diffusion:
        scheduler.update(
            _class_name="DDIMScheduler",
            steps_offset=config.sampler.steps_offset,
            set_alpha_to_one=config.sampler.set_alpha_to_one,
        )
        sources = dict(
            text_encoder=config.text.pretrained_dir,
            tokenizer=config.text.tokenizer_dir,
            vae=config.latent.diffusers_vae,
        )
        for part, source in sources.items():
            shutil.copytree(source, out_dir / part, dirs_exist_ok=True)
        index = {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", diffusers_unet.CONDITIONED],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
    else:
        index["_class_name"] = "DDPMPipeline"
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    io.write_json(out_dir / "scheduler" / "scheduler_config.json", scheduler)
    io.write_json(out_dir / "model_index.json", index)
    return restored


def to_scheduler(config: ml_collections.ConfigDict) -> dict:
    """The DDPMScheduler config of a diffjax diffusion config (the reverse of `from_scheduler`)."""
    df = config.diffusion
    kind = {v: k for k, v in BETA_SCHEDULES.items()}.get(df.schedule)
    if kind is None:
        raise cli.BadInput(f"config.diffusion.schedule={df.schedule!r} has no diffusers name")
    if df.get("snr_scale", 1.0) != 1.0:
        raise cli.BadInput(
            f"config.diffusion.snr_scale={df.snr_scale} has no diffusers scheduler setting; "
            "export a run trained with snr_scale=1"
        )
    out = dict(
        _class_name="DDPMScheduler",
        num_train_timesteps=df.num_steps,
        beta_schedule=kind,
        prediction_type={v: k for k, v in TARGETS.items()}[df.target],
        variance_type="learned_range"
        if df.learned_variance
        else {"posterior": "fixed_small", "beta": "fixed_large"}[config.sampler.variance],
        clip_sample=bool(config.sampler.clip_x0),
        rescale_betas_zero_snr=bool(df.zero_terminal_snr),
        timestep_spacing={v: k for k, v in SPACINGS.items()}[config.sampler.spacing],
    )
    if kind in BETA_DEFAULTS:
        start, end = df.get("beta_start", 0.0), df.get("beta_end", 0.0)
        start, end = (start, end) if start else BETA_DEFAULTS[kind]
        scale = 1000 / df.num_steps if kind == "linear" else 1.0
        out.update(beta_start=start * scale, beta_end=end * scale)
    return out
