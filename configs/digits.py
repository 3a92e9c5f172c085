"""DDPM on the embedded handwritten digits (scikit-learn's 1797 8x8 digits, upsampled to 16x16).

    python -m diffjax.main --config configs/digits.py --workdir runs/digits

On a 2-core CPU this trains for about 10 minutes and writes recognizable digits to
runs/digits/samples/ (a PNG grid every `train.sample_every_steps` and at the end).
Variants: `configs/digits.py:tiny` is a seconds-long smoke-test setting used by the tests;
`configs/digits.py:hybrid` learns the reverse variances with the hybrid loss (Improved DDPM).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Root of every random key: init, training, sampling, eval.

    config.data = dict(
        name="digits",  # "digits" (embedded), "image_folder", or a tfds catalog name.
        folder="",  # Directory of your images, for name="image_folder".
        data_dir="",  # Where tfds datasets are prepared/read; "" = ~/tensorflow_datasets.
        train_split="train",  # tfds split to train on.
        eval_split="test",  # tfds split for --mode=eval.
        image_size=16,  # Images are resized to image_size x image_size.
        channels=1,  # 1 (grey) or 3 (RGB).
        random_flip=False,  # Random horizontal flips (not for digits).
        worker_count=0,  # grain worker processes; 0 = read in the main process.
    )
    config.model = dict(
        base_channels=32,  # Channels of the first level.
        channel_mults=(1, 2, 2),  # One multiplier per level; sizes 16, 8, 4.
        num_res_blocks=1,  # Residual blocks per encoder level.
        attention_resolutions=(),  # Self-attention at these feature-map sizes.
        mid_attention=True,  # Self-attention in the middle block.
        head_dim=None,  # Channels per attention head; None = one head.
        dropout=0.0,  # Dropout inside residual blocks.
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
        lr=1e-3,  # Peak AdamW learning rate.
        warmup_steps=200,  # Linear warm-up from 0 to lr.
        weight_decay=0.0,  # AdamW decoupled weight decay.
        b1=0.9,  # Adam β1.
        b2=0.999,  # Adam β2.
        grad_clip=1.0,  # Clip gradients to this global norm (0 = off).
        ema_decay=0.999,  # EMA of the parameters used for sampling and eval.
    )
    config.train = dict(
        batch_size=64,  # Global batch, split over all devices and processes.
        grad_accum_steps=1,  # Microbatches per step (gradients averaged; saves memory).
        num_steps=2500,  # Training steps in total (a resumed run stops here too).
        log_every_steps=100,  # Loss to TensorBoard and metrics.jsonl.
        checkpoint_every_steps=500,  # Orbax checkpoint cadence.
        keep_checkpoints=3,  # Checkpoints kept on disk.
        sample_every_steps=0,  # PNG grid of EMA samples (0 = only at the end).
        num_samples=64,  # Samples per grid.
        eval_batch_size=64,  # Batch for --mode=eval.
    )
    config.mesh = dict(
        data=-1,  # Devices on the data axis; -1 = all the devices / fsdp.
        fsdp=1,  # Devices that split parameters and optimizer state (FSDP); batch uses both.
    )

    if arg == "tiny":
        config.data.image_size = 8
        config.model.update(base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                            attention_resolutions=(4,))
        config.diffusion.num_steps = 20
        config.sampler.update(steps=20, max_steps=20)
        config.train.update(batch_size=16, num_steps=6, log_every_steps=2,
                            checkpoint_every_steps=3, sample_every_steps=0, num_samples=16,
                            eval_batch_size=16)
        config.sampler.batch_size = 16
        config.optim.warmup_steps = 2
    elif arg == "hybrid":  # Improved DDPM: learned variances, L_simple + λ L_vlb.
        config.diffusion.update(learned_variance=True, loss="hybrid")
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/digits.py; use '', 'tiny' or "
                         f"'hybrid'")
    return config
