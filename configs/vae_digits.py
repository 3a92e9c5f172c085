"""The KL autoencoder of latent diffusion on the embedded digits at 32x32 (f = 4: 8x8x4 latents).

    python -m diffjax.main --config configs/vae_digits.py --workdir runs/vae_digits
    python -m diffjax.main --config configs/vae_digits.py --workdir runs/vae_digits --mode=eval

Trains the LDM autoencoder (3 levels of 32/64/64 channels, one ResnetBlock each, attention in
the middle) with L1 + β·KL (β = 1e-6) and, from step 1000, the PatchGAN with LDM's adaptive
weight. The preview grids in runs/vae_digits/samples/ show held-out digits over their
reconstructions; `--mode=eval` reports PSNR, SSIM and KL on the held-out digits (the README
gives the figures and times). Its workdir is what `configs/digits_latent.py` names in
`latent.autoencoder_workdir`.
Variant: `:tiny`, seconds long, for the tests.
"""

from configs import digits


def get_config(arg: str | None = None):
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r} of configs/vae_digits.py; use '' or 'tiny'")
    tiny = arg == "tiny"
    # The digits recipe (optimizer, cadence, the tiny variant's settings); the network is the
    # `autoencoder` section, the `model` section is unused.
    config = digits.base("tiny" if tiny else None)
    config.task = "autoencoder"
    config.data.image_size = 16 if tiny else 32
    config.autoencoder.update(
        block_out_channels=(16, 16, 16) if tiny else (32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        num_groups=8 if tiny else 16,
        disc_start_steps=3 if tiny else 1000,
        disc_channels=8 if tiny else 32,
        disc_layers=2,
    )
    if not tiny:
        config.train.update(batch_size=32, num_steps=1500, sample_every_steps=500, num_samples=32)
    return config
