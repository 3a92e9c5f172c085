"""Trains the diffusers peer's digits recipe under a chosen seed and writes its samples.

The peer's sample files (`../shared/peers/samples/`) are one draw of one training run each, so
they say nothing about how much the peer's own recipe moves from one training seed to another.
This script trains that recipe again, as `../shared/peers/samples/README.md` states it, so that
`experiments/peer_quality.py --peer-dir <out>` can score several of its runs with diffjax's
measure. It is a harness for the peer (PyTorch + diffusers), never a dependency of diffjax: run
it in the peer's own virtualenv (`../shared/peers/README.md`), not the project's.

    ~/peer_env/bin/pip install torch==2.13.0 diffusers scikit-learn
    ~/peer_env/bin/python experiments/peer_train.py --seed 1 --out runs/peer
    python experiments/peer_quality.py --peer-dir runs/peer --resize nearest

The recipe: all 1797 digits of `sklearn.datasets.load_digits`, scaled to uint8 as diffjax's
builder does, nearest 2x2 upsampling to 16x16, one channel, in [-1, 1]; `UNet2DModel` 16x16x1,
channels (32, 64, 64), one layer per block, attention at 8x8 and in the middle (1,112,801
parameters); `DDPMScheduler(1000, linear 1e-4..0.02)`; epsilon-MSE at a uniform timestep;
AdamW at lr 2e-4 (torch's other defaults) with a linear 100-step warm-up, then constant; batch
64 from a reshuffled stream of epochs; EMA decay min(0.999, (1 + t) / (10 + t)); 2464 steps
(the peer's "10 min" run). Samples come from the EMA weights: ancestral DDPM over all 1000
steps (fixed-small variance, x0 clipped) and DDIM 50 (leading spacing, eta 0, x0 clipped),
512 each in one batch, written as `diffusers_digits_s<seed>_<sampler>.npz` with the peer's key
`x` ([N, 16, 16] float32 in [-1, 1]). The README's peer paragraph says what the stated recipe
leaves open (the rate after warm-up, the data order) and which choice this script makes.
"""

import argparse
import os
import time

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from sklearn.datasets import load_digits

UNET = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
SAMPLERS = {"ddpm1000": 1000, "ddim50": 50}


def digits_16(split: str) -> torch.Tensor:
    """[N, 1, 16, 16] float32 in [-1, 1]: the 8x8 digits through uint8, nearest 2x2 up.

    `split` 'all' is the peer's 1797 digits; 'train' leaves out diffjax's test split (within each
    class, in scikit-learn's order, every 6th digit: `diffjax.data.digits.split_indices`), the
    296 digits `peer_quality.py` scores against, and keeps the 1501 that diffjax trains on.
    """
    digits = load_digits()
    images = digits.images  # 0..16
    if split == "train":
        keep = np.ones(len(images), dtype=bool)
        for c in range(10):
            keep[np.flatnonzero(digits.target == c)[5::6]] = False
        images = images[keep]
    u8 = np.floor(images * (255 / 16) + 0.5).astype(np.uint8)
    x = u8.astype(np.float32) / 127.5 - 1.0
    x = x.repeat(2, axis=1).repeat(2, axis=2)
    return torch.from_numpy(x[:, None])


def batches(n: int, batch: int, gen: torch.Generator):
    """Indices of consecutive batches from a stream of freshly shuffled epochs."""
    stream = torch.empty(0, dtype=torch.long)
    while True:
        while len(stream) < batch:
            stream = torch.cat([stream, torch.randperm(n, generator=gen)])
        yield stream[:batch]
        stream = stream[batch:]


def train(seed: int, split: str, steps: int, batch: int, lr: float, warmup: int) -> UNet2DModel:
    torch.manual_seed(seed)
    data = digits_16(split)
    model = UNet2DModel(**UNET)
    ema = UNet2DModel(**UNET)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    sched = DDPMScheduler(**SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rate = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(seed)
    order = batches(len(data), batch, gen)
    t0 = time.perf_counter()
    for step in range(steps):
        x0 = data[next(order)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (batch,), generator=gen)
        pred = model(sched.add_noise(x0, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rate.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.mul_(decay).add_(p, alpha=1 - decay)
        if (step + 1) % 200 == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - t0
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} {elapsed:.0f} s", flush=True)
    return ema.eval()


@torch.inference_mode()
def sample(model: UNet2DModel, key: str, num: int, seed: int) -> np.ndarray:
    ddpm = DDPMScheduler(**SCHEDULE)  # variance fixed_small, clip_sample=True by default
    sched = ddpm if key == "ddpm1000" else DDIMScheduler.from_config(ddpm.config)
    sched.set_timesteps(SAMPLERS[key])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((num, 1, 16, 16), generator=gen)
    for t in sched.timesteps:
        eps = model(x, t).sample
        if key == "ddpm1000":
            x = sched.step(eps, t, x, generator=gen).prev_sample
        else:
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    return x[:, 0].clamp(-1, 1).numpy().astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True, help="Training seed.")
    parser.add_argument("--out", required=True, help="Folder for the sample files.")
    parser.add_argument(
        "--split",
        choices=("all", "train"),
        default="all",
        help="all: the peer's 1797 digits; train: without the 296 test digits scored against.",
    )
    parser.add_argument("--steps", type=int, default=2464)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--samplers", default="ddpm1000,ddim50")
    parser.add_argument("--num", type=int, default=512)
    parser.add_argument("--sample-seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    n_params = sum(p.numel() for p in UNet2DModel(**UNET).parameters())
    print(
        f"UNet2DModel: {n_params:,} parameters; seed {args.seed}; {args.split} digits; "
        f"{args.steps} steps",
        flush=True,
    )
    t0 = time.perf_counter()
    model = train(args.seed, args.split, args.steps, args.batch, args.lr, args.warmup)
    print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)
    for key in args.samplers.split(","):
        t0 = time.perf_counter()
        x = sample(model, key, args.num, args.sample_seed)
        split = "" if args.split == "all" else f"{args.split}_"
        path = os.path.join(args.out, f"diffusers_digits_{split}s{args.seed}_{key}.npz")
        np.savez_compressed(path, x=x)
        print(f"{key}: {path} in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
