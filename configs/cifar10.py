"""DDPM on CIFAR-10 (32x32 RGB), with the settings of Ho et al. 2020 (§4 and Appendix B).

    python -m diffjax.main --config configs/cifar10.py --workdir runs/cifar10

On a TPU (all cores on the `data` mesh axis) this trains the paper's 35.7M-parameter U-Net for
800k steps of batch 128 and writes 64-image EMA sample grids (the full 1000-step ancestral chain)
to runs/cifar10/samples/ every `train.sample_every_steps` and at the end; the paper reports 21
steps/s on a TPU v3-8 (10.6 hours for 800k steps) and FID 3.17 for this model. Preparing cifar10
downloads it once and needs TensorFlow: `pip install -e '.[prepare]'` first, or see
experiments/colab_tpu.ipynb, which runs all of this on a Colab TPU.
Variant: `configs/cifar10.py:small` is a 4.4M-parameter U-Net (64 base channels, three levels,
one residual block each) trained for 100k steps, for quicker runs.
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.data.update(name="cifar10", image_size=32, channels=3, random_flip=True)

    if arg == "small":  # A narrower, shallower U-Net for quicker runs.
        config.model.update(base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=1)
        config.train.update(
            num_steps=100_000, checkpoint_every_steps=5_000, sample_every_steps=25_000
        )
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/cifar10.py; use '' or 'small'")
    return config
