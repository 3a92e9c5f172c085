"""Config → the frozen autoencoder of a latent run, its scale and its cached training latents."""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax import checkpoint, config_check, latent, sharding
from diffjax.latent import Codec, LatentError
from diffjax.models import autoencoder as ae_lib

log = logging.getLogger(__name__)


def is_latent(config) -> bool:
    return bool(config.latent.autoencoder_workdir or config.latent.diffusers_vae)


# Config sections added after runs were first written, with the values that mean "not used":
# the config.json of an older run gets them on reading, so it loads as what it was.
SECTIONS_ADDED_LATER = {"spatial": {"kind": "", "factor": 4}}
# Fields added later, at the values that reproduce what older runs did.
FIELDS_ADDED_LATER = {"data": {"resize": "bicubic"}, "model": {"patch_size": 1}}


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run wrote to `<workdir>/config.json`."""
    path = os.path.join(workdir, latent.CONFIG_FILE)
    if not os.path.isfile(path):
        what = "is not there" if not os.path.exists(workdir) else f"has no {latent.CONFIG_FILE}"
        raise LatentError(
            f"config.latent.autoencoder_workdir: {workdir} {what}; name the --workdir of a "
            f"finished `--config configs/vae_*.py` training run"
        )
    try:
        with open(path) as f:
            stored = json.load(f)
    except ValueError as err:
        raise LatentError(f"{path} is corrupt ({err})") from None
    for section, off in SECTIONS_ADDED_LATER.items():  # a run written before they existed
        stored.setdefault(section, dict(off))
    for section, fields in FIELDS_ADDED_LATER.items():
        for field, value in fields.items():
            stored.setdefault(section, {}).setdefault(field, value)
    return ml_collections.ConfigDict(stored)


def read_run_config_or(workdir: str, make_default) -> ml_collections.ConfigDict:
    """The workdir's run config (overrides included) when it has one, else `make_default()`."""
    if os.path.isfile(os.path.join(workdir, latent.CONFIG_FILE)):
        return read_run_config(workdir)
    return make_default()


# The diffusion process a run's parameters were trained under. The same parameters read under
# other values restore without an error and then sample or train something else, so a config that
# changes one of them is refused against the run's config.json.
PROCESS_FIELDS = (
    "schedule",
    "num_steps",
    "beta_start",
    "beta_end",
    "target",
    "zero_terminal_snr",
    "snr_scale",
)
# What a run whose config.json predates a field trained under (other missing fields: unknown).
SINCE_ADDED = {"snr_scale": 1.0}


def check_same_process(config, workdir: str) -> None:
    """Refuses, naming the fields, a config whose `diffusion` process differs from the one the
    workdir's run was trained under (its config.json; nothing to check without one)."""
    if not os.path.isfile(os.path.join(workdir, latent.CONFIG_FILE)):
        return
    theirs = read_run_config(workdir).diffusion
    theirs = {k: theirs.get(k, SINCE_ADDED.get(k)) for k in PROCESS_FIELDS}
    differ = [
        (k, config.diffusion[k], theirs[k])
        for k in PROCESS_FIELDS
        if theirs[k] is not None and k in config.diffusion and config.diffusion[k] != theirs[k]
    ]
    if differ:
        said = "; ".join(f"diffusion.{k} is {a!r} here, {b!r} there" for k, a, b in differ)
        flags = " ".join(f"--config.diffusion.{k}={other}" for k, _, other in differ)
        raise config_check.ConfigError(
            f"{workdir} was trained under another diffusion process ({said}); its checkpoints "
            f"need the run's values ({flags}), or use a fresh --workdir"
        )


def write_run_config(config, workdir: str) -> None:
    """Writes the run's config to `<workdir>/config.json` (process 0), atomically."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, latent.CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=1, sort_keys=True))
    os.replace(path + ".tmp", path)


def open_codec(config, mesh) -> Codec | None:
    """The frozen autoencoder that `config.latent` names (None for a pixel-space run), its
    parameters restored and replicated over the mesh."""
    lt = config.latent
    if lt.diffusers_vae:
        from diffjax.models import diffusers_vae

        module, params, meta = diffusers_vae.load_autoencoder_kl(lt.diffusers_vae)
        codec = Codec(module, params, lt.diffusers_vae, meta.get("scaling_factor"))
    elif lt.autoencoder_workdir:
        codec = _from_workdir(lt.autoencoder_workdir, lt.autoencoder_step, mesh)
    else:
        return None
    channels = config.data.channels
    if codec.module.in_channels != channels:
        raise LatentError(
            f"config.latent: the autoencoder ({codec.origin}) encodes {codec.module.in_channels}-"
            f"channel images, but config.data.channels={channels}; use an autoencoder trained "
            f"on this data"
        )
    codec.fingerprint  # noqa: B018 - computed while the params are where they were restored
    codec.params = jax.device_put(codec.params, sharding.replicated(mesh))
    return codec


def _from_workdir(workdir: str, step: int, mesh) -> Codec:
    from diffjax import build  # build imports this module

    ae_config = read_run_config(workdir)
    if ae_config.get("task") != "autoencoder":
        raise LatentError(
            f"config.latent.autoencoder_workdir: {workdir} holds a task="
            f"{ae_config.get('task')!r} run, not an autoencoder (train one with "
            f"configs/vae_*.py)"
        )
    ae_setup = build.Setup(ae_config)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)
    try:
        state, _, restored = ckpt.restore(ae_setup.abstract(mesh), step or None)
    except checkpoint.CheckpointError as err:
        raise LatentError(f"config.latent.autoencoder_workdir: {err}") from None
    finally:
        ckpt.close()
    params = state.ema_params["autoencoder"]
    return Codec(ae_setup.model, params, f"{workdir} step {restored}")


def autoencoder_model(config) -> ae_lib.AutoencoderKL:
    """The autoencoder of a task=autoencoder config."""
    a = config.autoencoder
    return ae_lib.AutoencoderKL(
        in_channels=config.data.channels,
        out_channels=config.data.channels,
        block_out_channels=tuple(a.block_out_channels),
        layers_per_block=a.layers_per_block,
        latent_channels=a.latent_channels,
        num_groups=a.num_groups,
        mid_attention=a.mid_attention,
        dtype=jnp.dtype(config.model.dtype),
    )


def scale_for_training(config, codec: Codec, data_state: dict | None, posterior, num: int):
    """The latent scale of this run: from its checkpoint when resuming (the autoencoder must be
    the one it started with), else `latent.scale`, the autoencoder's own, or 1/std of the
    posterior samples of the first `latent.scale_examples` of the `num` training examples
    (`posterior(n)` gives their mean and std).
    Returns the `{"scale", "autoencoder"}` metadata every checkpoint then carries."""
    saved = (data_state or {}).get("latent")
    if saved:
        if saved["autoencoder"] != codec.fingerprint:
            raise LatentError(
                f"config.latent: this run started with another autoencoder (fingerprint "
                f"{saved['autoencoder'][:12]}…) than {codec.origin} ({codec.fingerprint[:12]}…); "
                f"use that one, or a fresh --workdir"
            )
        return saved
    scale = config.latent.scale or codec.scale
    if not scale:
        n = min(num, config.latent.scale_examples)
        mean, std = posterior(n)
        draws = mean + std * np.random.default_rng(config.seed).standard_normal(mean.shape)
        scale = latent.estimate_scale(draws)
        log.info("latent scale 1/std = %.5f from %d training examples", scale, n)
    return {"scale": float(scale), "autoencoder": codec.fingerprint}


def latent_cache(config, codec: Codec, source, data_dir: str, encode) -> dict:
    """The training split's posterior mean and std [N, V, h, w, z] and labels [N]: from the
    cache in `<data_dir>/latent_cache/` when this autoencoder made it, else encoded now (every
    image read once) and written there."""
    d = config.data
    path = latent.cache_path(
        data_dir, d.name, config.data.train_split, d.image_size, d.channels, d.random_flip,
        codec.fingerprint,
    )  # fmt: skip
    cache = latent.read_cache(path, codec.fingerprint, len(source))
    if cache is None:
        log.info("encoding the %d training examples once into %s", len(source), path)
        from diffjax import build

        labels = []  # filled by the reading pass, so no image is decoded twice
        images_of = build.images_of(source, d.image_size, d.channels, labels, d.resize)
        mean, std = encode(images_of, len(source))
        views = [mean], [std]
        if d.random_flip:
            flipped = build.images_of(source, d.image_size, d.channels, resize=d.resize)
            fm, fs = encode(lambda lo, hi: flipped(lo, hi)[:, :, ::-1], len(source))
            views[0].append(fm)
            views[1].append(fs)
        labels = np.asarray(labels, np.int32)
        cache = {
            "mean": np.stack(views[0], axis=1),
            "std": np.stack(views[1], axis=1),
            "label": labels,
        }
        if jax.process_index() == 0:
            latent.write_cache(path, codec.fingerprint, cache["mean"], cache["std"], labels)
    else:
        log.info("training from the latent cache %s", path)
    return cache


def prepare_training(setup, source, data_state: dict | None, data_dir: str, captions):
    """For a latent run: fixes the latent scale (`setup.set_latent_scale`) and returns the
    training source to read, the cached latents when `latent.cache`, else `source`."""
    from diffjax import build

    config = setup.config
    d = config.data
    module_encode = latent.make_encode_fn(setup.codec.module, setup.mesh)
    batch = config.train.batch_size

    def encode(images_of, num):
        return latent.encode_batches(
            module_encode, setup.codec.params, images_of, num, batch, setup.mesh
        )

    cache = None
    if config.latent.cache:  # the scale then comes from the cached posteriors: no second pass
        cache = latent_cache(config, setup.codec, source, data_dir, encode)
        posterior = lambda n: (cache["mean"][:n, 0], cache["std"][:n, 0])
    else:
        read = build.images_of(source, d.image_size, d.channels, resize=d.resize)
        posterior = lambda n: encode(read, n)
    meta = scale_for_training(config, setup.codec, data_state, posterior, len(source))
    setup.set_latent_scale(meta)
    if cache is None:
        return source
    texts = source.texts() if captions is not None and source.has_text else None
    images = source if setup.conditioner.spatial else None  # the condition is made from them
    return latent.CachedSource(cache, texts, images)


def make_to_x0(module: ae_lib.AutoencoderKL):
    """`(batch, frozen, key) -> x_0` of a latent model's steps: scale · z, z a fresh posterior
    draw, from the cached mean and std (`latent_mean`, `latent_std`) or by encoding the batch's
    images with `frozen["autoencoder"]`."""

    def to_x0(batch, frozen, key):
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
        else:
            params = {"params": frozen["autoencoder"]}
            post = module.apply(params, batch["image"], method="encode")
            mean, std = post.mean, post.std
        return frozen["latent_scale"] * (mean + std * jax.random.normal(key, mean.shape))

    return to_x0


def make_decode_fn(module: ae_lib.AutoencoderKL, mesh):
    """Compiled `(params, scale, latents) -> images in [-1, 1]`: decode(z / scale), batch split."""
    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    def decode(params, scale, z):
        return jnp.clip(module.apply({"params": params}, z / scale, method="decode"), -1, 1)

    return jax.jit(decode, in_shardings=(rep, rep, batch_sh), out_shardings=batch_sh)
