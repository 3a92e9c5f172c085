"""The KL autoencoder on real photographs: 64x64 crops of scikit-image's photos (f = 4).

    python -m diffjax.main --config configs/vae_photos.py --workdir runs/vae_photos
    python -m diffjax.main --config configs/vae_photos.py --workdir runs/vae_photos --mode=eval
    python -m diffjax.main --config configs/vae_photos.py --workdir runs/vae_photos \
        --mode=reconstruct --input photo.png --output photo_reconstructed.png

The embedded `photos` dataset (`diffjax.data.photos`): crops of six photographs to train on, and
of two others (chelsea the cat, a cup of coffee) held out for --mode=eval, so PSNR/SSIM are
measured on photographs the autoencoder never saw. 3 levels of 32/64/64 channels and 4 latent
channels turn 64x64x3 images into 16x16x4 latents (12x fewer values), trained with L1 + β·KL
and the PatchGAN from step 800 of 1200. The README gives the measured PSNR/SSIM
against the bicubic baseline and the time. Any image size divisible by 4 can be reconstructed
(the network is convolutional).
"""

from configs import vae_digits


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"unknown variant {arg!r} of configs/vae_photos.py; use ''")
    config = vae_digits.get_config()  # the same network and recipe, on 64x64 RGB crops
    config.data.update(name="photos", image_size=64, channels=3, random_flip=True)
    config.autoencoder.update(disc_start_steps=800, disc_layers=3)
    config.train.update(batch_size=16, num_steps=1200, num_samples=16)
    return config
