"""The KL autoencoder on real photographs: 64x64 crops of scikit-image's photos (f = 4).

    python -m diffjax.main --config configs/vae_photos.py --workdir runs/vae_photos
    python -m diffjax.main --config configs/vae_photos.py --workdir runs/vae_photos --mode=eval
    python -m diffjax.main --config configs/vae_photos.py --workdir runs/vae_photos \
        --mode=reconstruct --input photo.png --output photo_reconstructed.png

The embedded `photos` dataset (`diffjax.data.photos`): crops of six photographs to train on, and
of two others (chelsea the cat, a cup of coffee) held out for --mode=eval, so PSNR/SSIM are
measured on photographs the autoencoder never saw. 3 levels of 32/64/64 channels and 4 latent
channels turn 64x64x3 images into 16x16x4 latents (12x fewer values), trained with L1 + β·KL
and the PatchGAN from step 1500. The README gives the measured PSNR/SSIM
against the bicubic baseline and the time. Any image size divisible by 4 can be reconstructed
(the network is convolutional).
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.task = "autoencoder"
    config.data.update(name="photos", image_size=64, channels=3, random_flip=True)
    config.autoencoder.update(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        num_groups=16,
        disc_start_steps=1500,
        disc_channels=32,
        disc_layers=3,
    )
    config.optim.update(lr=1e-3, warmup_steps=100, lr_schedule="cosine", ema_decay=0.999)
    config.train.update(
        batch_size=16,
        num_steps=2000,
        log_every_steps=100,
        checkpoint_every_steps=500,
        sample_every_steps=500,
        num_samples=16,
        eval_batch_size=64,
    )
    if arg:
        raise ValueError(f"unknown variant {arg!r} of configs/vae_photos.py; use ''")
    return config
