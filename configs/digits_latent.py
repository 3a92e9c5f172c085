"""Latent diffusion on the embedded digits at 32x32, in the 8x8x4 latent space of the
autoencoder that `configs/vae_digits.py` trains.

    python -m diffjax.main --config configs/vae_digits.py --workdir runs/vae_digits
    python -m diffjax.main --config configs/digits_latent.py --workdir runs/digits_latent
    python -m diffjax.main --config configs/digits_latent.py --workdir runs/digits_latent \
        --mode=sample --config.sampler.name=ddim --config.sampler.steps=50

The first command trains the autoencoder; the second encodes the training digits once
(`latent.cache`, into data_dir/latent_cache/), estimates the latent scale 1/std and trains the
digits U-Net on the latents; samples are decoded to 32x32 PNG grids and .npz. `--config.latent.
autoencoder_workdir` names another autoencoder run (relative paths are from the working
directory), `--config.latent.diffusers_vae=DIR` a diffusers AutoencoderKL instead.
Variants: `:text`, text-to-image as `configs/digits_text.py` (a jointly trained encoder);
`:class`, class-conditional with guidance as `configs/digits_class.py`; `:sr`, latent
super-resolution 8x8 → 32x32 (the bicubic condition folded onto the 8x8 latent grid,
`spatial.fold`); `:inpaint`, trained latent inpainting (the masked digit and mask, folded the
same way); `:tiny`, seconds long, for the tests (with `:text_tiny`, `:class_tiny`, `:sr_tiny`,
`:inpaint_tiny`).
"""

from configs import digits, digits_class, digits_text

VARIANTS = ("", "tiny", "text", "text_tiny", "class", "class_tiny", "sr", "sr_tiny", "inpaint",
            "inpaint_tiny")  # fmt: skip


def get_config(arg: str | None = None):
    arg = arg or ""
    if arg not in VARIANTS:
        raise ValueError(
            f"unknown variant {arg!r} of configs/digits_latent.py; use one of {VARIANTS}"
        )
    tiny = "tiny" if arg.endswith("tiny") else None
    if arg.startswith("text"):
        config = digits_text.get_config(tiny)
    elif arg.startswith("class"):
        config = digits_class.get_config(tiny)
    else:
        config = digits.base(tiny)
    config.data.image_size = 16 if tiny else 32
    config.latent.update(autoencoder_workdir="runs/vae_digits", cache=True)
    if tiny:
        config.model.update(
            channel_mults=(1, 2), attention_resolutions=(2,) if "text" in arg else ()
        )
    else:
        # The U-Net sees 8x8x4 latents: two levels (8 and 4), one block each, 48/96 channels
        # (GroupNorm in 16 groups), attention at 4 and in the middle. 3500 steps train in ~9 min
        # on a 2-core CPU, where the pixel model at 32x32 makes ~600 (the README's table).
        config.model.update(
            base_channels=48,
            channel_mults=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(4,),
            num_groups=16,
        )
        config.train.update(num_steps=3500, checkpoint_every_steps=500)
    if arg.startswith("sr"):
        config.spatial.update(kind="upscale", factor=4)
    elif arg.startswith("inpaint"):
        config.spatial.kind = "inpaint"
    config.diffusion.min_snr_gamma = 0.0  # as the README's latent figures were measured
    config.sampler.update(clip_x0=False)
    return config
