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

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.task = "autoencoder"
    config.data.update(name="digits", image_size=32, channels=1, random_flip=False)
    config.autoencoder.update(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        num_groups=16,
        disc_start_steps=1000,
        disc_channels=32,
        disc_layers=2,
    )
    config.optim.update(lr=1e-3, warmup_steps=100, lr_schedule="cosine", ema_decay=0.999)
    config.train.update(
        batch_size=32,
        num_steps=1500,
        log_every_steps=100,
        checkpoint_every_steps=500,
        sample_every_steps=500,
        num_samples=32,
        eval_batch_size=64,
    )
    if arg == "tiny":
        config.data.image_size = 16
        config.autoencoder.update(
            block_out_channels=(16, 16, 16), num_groups=8, disc_start_steps=3, disc_channels=8
        )
        config.train.update(
            batch_size=16,
            num_steps=6,
            log_every_steps=2,
            checkpoint_every_steps=3,
            sample_every_steps=0,
            num_samples=16,
            eval_batch_size=16,
        )
        config.optim.update(warmup_steps=2, lr_schedule="constant")
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/vae_digits.py; use '' or 'tiny'")
    return config
