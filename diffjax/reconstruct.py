"""An autoencoder at work: PSNR/SSIM/KL on the eval split, and image files encoded, decoded or
reconstructed from the command line."""

from __future__ import annotations

import logging

import jax
import numpy as np
import tqdm
from PIL import Image

from diffjax import ae_losses, ae_steps, build, data, image_io, sharding
from diffjax.build import Setup
from diffjax.image_io import ImageFileError, read_image
from diffjax.infer import restore_for_inference
from diffjax.metrics import MetricWriter

log = logging.getLogger(__name__)


def evaluate_autoencoder(config, workdir: str, step: int | None = None) -> dict:
    """Mean PSNR (dB), SSIM, KL (nats per image) and L1 of the EMA autoencoder's reconstructions
    (through the posterior mean) over the whole eval split, and the same PSNR/SSIM for the
    baseline that shrinks each image by f and enlarges it again bicubically."""
    setup = Setup(config)
    state, restored = restore_for_inference(setup, workdir, step)
    d = config.data
    source = build.open_split(config, d.eval_split)
    eval_iter = data.make_eval_iterator(
        source,
        image_size=d.image_size,
        channels=d.channels,
        batch_size=config.train.eval_batch_size,
        resize=d.resize,
    )
    ae_sharding = setup.params_sharding[ae_steps.AE]
    step_fn = ae_steps.make_eval_step(setup.model, setup.mesh, ae_sharding)
    params = state.ema_params[ae_steps.AE]
    sums, count = {}, 0
    for batch in tqdm.tqdm(eval_iter, desc="eval", unit="batch", disable=jax.process_index() != 0):
        mask = batch.pop("mask")
        images = batch["image"]
        batch = sharding.global_batch(batch, setup.mesh)
        parts = {k: sharding.to_host(v) for k, v in step_fn(params, batch, None, None).items()}
        parts.update(bicubic_baseline(images, setup.model.factor))
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + float(np.sum(value * mask))
        count += int(mask.sum())
    result = {"step": restored, **{f"eval/{k}": v / max(count, 1) for k, v in sums.items()}}
    result["eval/examples"] = count
    writer = MetricWriter(workdir)
    writer.write(restored, {k: v for k, v in result.items() if k.startswith("eval/")})
    writer.close()
    log.info("eval at step %d: %s", restored, result)
    return result


def bicubic_baseline(images: np.ndarray, factor: int) -> dict:
    """PSNR and SSIM [B] of images shrunk by `factor` (area average) and enlarged bicubically."""
    out = []
    for img in image_io.to_uint8(images):
        h, w, c = img.shape
        pil = Image.fromarray(img[..., 0] if c == 1 else img)
        small = pil.resize((w // factor, h // factor), Image.Resampling.BOX)
        big = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), np.float32)
        out.append(big.reshape(h, w, c) / 127.5 - 1.0)
    x, y = np.asarray(images, np.float32), np.stack(out)
    return {
        "bicubic_psnr": np.asarray(ae_losses.psnr(x, y)),
        "bicubic_ssim": np.asarray(ae_losses.ssim(x, y)),
    }


def codec_of(setup: Setup, workdir: str, step: int | None):
    """(module, params) of the autoencoder a config names: an autoencoder run's EMA params, or
    a latent config's frozen autoencoder."""
    if setup.codec is not None:
        return setup.codec.module, setup.codec.params
    if setup.config.task != "autoencoder":
        raise ImageFileError(
            "--mode=reconstruct needs an autoencoder: an autoencoder's config (configs/vae_*.py) "
            "with its --workdir, or a latent model's config (config.latent)"
        )
    state, _ = restore_for_inference(setup, workdir, step)
    return setup.model, state.ema_params[ae_steps.AE]


def reconstruct_files(config, workdir: str, inputs: list[str], output: str, step=None,
                      overwrite: bool = False) -> list[str]:  # fmt: skip
    """Encodes each input (an image, or an .npz of latents to decode) and writes: PNGs of the
    reconstructions, or (`output` ending in .npz, one input) the posterior's mean and std.
    Several inputs write into the directory `output`. Returns the paths written."""
    setup = Setup(config)
    channels = config.data.channels
    to_npz = output.endswith(".npz")
    if to_npz and len(inputs) > 1:
        raise ImageFileError("--output: an .npz takes the latents of one --input")
    outs = image_io.output_paths(inputs, output, "_reconstructed", overwrite)
    module, params = codec_of(setup, workdir, step)
    params = jax.device_get(params)
    for src, dst in zip(inputs, outs, strict=True):
        if src.endswith(".npz"):
            z = _read_latents(src, module.latent_channels)
            x = module.apply({"params": params}, z, method="decode")
        else:
            x = read_image(src, channels)[None]
            _check_size(module, x.shape[1:], src)
            post = module.apply({"params": params}, x, method="encode")
            if to_npz:
                np.savez(dst, mean=np.asarray(post.mean[0]), std=np.asarray(post.std[0]))
                continue
            x = module.apply({"params": params}, post.mean, method="decode")
        img = image_io.to_uint8(np.clip(np.asarray(x), -1, 1))[0]
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(dst)
    log.info("wrote %s", ", ".join(outs))
    return outs


def _check_size(module, shape, path) -> None:
    h, w, _ = shape
    f = module.factor
    if h % f or w % f:
        raise ImageFileError(
            f"--input {path}: {h}x{w} is not divisible by the autoencoder's factor f = {f}; "
            f"crop or resize it to {h - h % f}x{w - w % f}"
        )


def _read_latents(path: str, channels: int) -> np.ndarray:
    try:
        with np.load(path) as f:
            z = np.asarray(f["mean"], np.float32)
    except (OSError, ValueError, KeyError) as err:
        raise ImageFileError(f"--input {path}: not a latents .npz with 'mean' ({err})") from None
    if z.ndim != 3 or z.shape[-1] != channels:
        raise ImageFileError(
            f"--input {path}: latents of shape {z.shape}, but the autoencoder decodes "
            f"[h, w, {channels}]"
        )
    return z[None]
