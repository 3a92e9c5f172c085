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

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Root of every random key: init, training, sampling, eval.

    config.data = dict(
        name="cifar10",  # "digits" (embedded), "image_folder", or a tfds catalog name.
        folder="",  # Directory of your images, for name="image_folder".
        data_dir="",  # Where tfds datasets are prepared/read; "" = ~/tensorflow_datasets.
        train_split="train",  # tfds split to train on (50,000 images).
        eval_split="test",  # tfds split for --mode=eval (10,000 images).
        image_size=32,  # Images are resized to image_size x image_size (CIFAR-10 is 32x32).
        channels=3,  # 1 (grey) or 3 (RGB).
        random_flip=True,  # Random horizontal flips, as in the paper.
        worker_count=0,  # grain worker processes; 0 = read in the main process.
    )
    config.model = dict(
        base_channels=128,  # Channels of the first level.
        channel_mults=(1, 2, 2, 2),  # One multiplier per level; sizes 32, 16, 8, 4.
        num_res_blocks=2,  # Residual blocks per encoder level.
        attention_resolutions=(16,),  # Self-attention at these feature-map sizes.
        mid_attention=True,  # Self-attention in the middle block.
        head_dim=None,  # Channels per attention head; None = one head.
        dropout=0.1,  # Dropout inside residual blocks.
        num_groups=32,  # GroupNorm groups.
        norm_eps=1e-6,  # GroupNorm epsilon.
        num_classes=0,  # >0: class-conditional on the dataset's labels.
        remat=False,  # Recompute block activations in the backward pass (saves memory).
        dtype="float32",  # Compute dtype: float32 or bfloat16.
    )
    config.diffusion = dict(
        schedule="linear",  # linear | cosine | scaled_linear | sigmoid.
        num_steps=1000,  # T, the number of diffusion steps.
        target="eps",  # What the network predicts: eps | x0 | v.
        zero_terminal_snr=False,  # Rescale the schedule so ᾱ_T = 0 (needs target v or x0).
        learned_variance=False,  # The network also outputs the reverse variance (2C channels).
        loss="simple",  # simple | hybrid (simple + λ·VLB, learned variance) | vlb.
        vlb_weight=0.001,  # λ of the hybrid loss.
        t_sampling="uniform",  # uniform | importance (from the per-t VLB history).
        min_snr_gamma=0.0,  # Min-SNR-γ weighting of the MSE; 0 = off, 5 is typical.
    )
    config.sampler = dict(
        name="ddpm",  # ddpm | ddim | dpm_solver_pp | heun.
        steps=1000,  # Sampling steps (network calls; heun makes 2·steps - 1).
        max_steps=1000,  # Largest `steps` served by one compilation.
        spacing="uniform",  # Which timesteps: uniform | trailing | leading.
        eta=0.0,  # DDIM noise: 0 = deterministic, 1 = ancestral-like.
        variance="beta",  # Fixed reverse variance (ddpm sampler, bits/dim): beta | posterior.
        clip_x0=True,  # Clip the predicted x_0 to [-1, 1] at every step.
        dynamic_threshold=0.0,  # >0: dynamic thresholding at this percentile of |x_0|.
        batch_size=64,  # Samples drawn per compiled call.
    )
    config.optim = dict(
        lr=2e-4,  # Peak Adam learning rate.
        warmup_steps=5000,  # Linear warm-up from 0 to lr.
        weight_decay=0.0,  # AdamW decoupled weight decay (0: plain Adam, as in the paper).
        b1=0.9,  # Adam β1.
        b2=0.999,  # Adam β2.
        grad_clip=1.0,  # Clip gradients to this global norm (0 = off).
        ema_decay=0.9999,  # EMA of the parameters used for sampling and eval.
    )
    config.train = dict(
        batch_size=128,  # Global batch, split over all devices and processes.
        grad_accum_steps=1,  # Microbatches per step (gradients averaged; saves memory).
        num_steps=800_000,  # Training steps in total (a resumed run stops here too).
        log_every_steps=500,  # Loss to TensorBoard and metrics.jsonl.
        checkpoint_every_steps=10_000,  # Orbax checkpoint cadence.
        keep_checkpoints=3,  # Checkpoints kept on disk.
        sample_every_steps=50_000,  # PNG grid of EMA samples (0 = only at the end).
        num_samples=64,  # Samples per grid.
        eval_batch_size=128,  # Batch for --mode=eval.
    )
    config.mesh = dict(
        data=-1,  # Devices on the data axis; -1 = all the devices / fsdp.
        fsdp=1,  # Devices that split parameters and optimizer state (FSDP); batch uses both.
    )

    if arg == "small":  # A narrower, shallower U-Net for quicker runs.
        config.model.update(base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=1)
        config.train.update(num_steps=100_000, checkpoint_every_steps=5_000,
                            sample_every_steps=25_000)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/cifar10.py; use '' or 'small'")
    return config
