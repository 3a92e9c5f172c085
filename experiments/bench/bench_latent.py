"""Latent against pixel diffusion on 32x32 digits, and the latent cache against encoding on the fly.

    python experiments/bench/bench_latent.py --autoencoder_workdir runs/vae_digits

Rows (all on one device, batch `--batch`, medians over `--rounds` interleaved rounds after a
warm-up, the same CPU and run, so the ratios are what to read):
- train: the compiled train step of `configs/digits_latent.py` (8x8x4 latents) fed from the
  latent cache (a posterior draw from the cached mean and std), the same step encoding the
  32x32 images inside it (no cache), and `configs/digits.py`'s U-Net trained on 32x32 pixels;
  each also with its input pipeline (`data.make_train_iterator` + the step), the rate a run sees.
- sample: seconds per image with DDIM (`--steps`) for the latent model, decoding included, and
  for the pixel model.
The autoencoder's weights are the workdir's; the U-Nets' are random (speed does not depend on
them). Prints a markdown table.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repository's configs/ package

from bench_text import _cpu_model  # noqa: E402 - the same CPU line in every table

from configs import digits, digits_latent  # noqa: E402
from diffjax import build, data, latent_setup, sharding, steps  # noqa: E402


def _configs(args, data_dir):
    lat = digits_latent.get_config()
    lat.latent.autoencoder_workdir = args.autoencoder_workdir
    pix = digits.base()
    pix.data.image_size = 32
    for c in (lat, pix):
        c.data.data_dir = data_dir
        c.train.batch_size = args.batch
        c.sampler.update(name="ddim", steps=args.steps, batch_size=args.batch)
    return lat, pix


def _trainer(setup, source, cache: bool, data_dir: str):
    """(step-only run, pipeline+step run) for a setup, from the cache or from images."""
    config = setup.config
    if setup.codec is not None:
        config.latent.cache = cache
        source = latent_setup.prepare_training(setup, source, None, data_dir, None)
    d = config.data
    it = data.make_train_iterator(
        source, image_size=d.image_size, channels=d.channels, global_batch=config.train.batch_size,
        seed=0, random_flip=False,
    )  # fmt: skip
    step = steps.make_train_step(
        setup.model, setup.schedule, setup.tx, setup.mesh, setup.abstract_state,
        to_x0=setup.to_x0, **build.loss_kwargs(config),
    )  # fmt: skip
    box = {"state": setup.create_state()}
    fixed = sharding.global_batch(next(it), setup.mesh)

    def run_step():
        box["state"], m = step(box["state"], fixed, setup.train_key, setup.frozen)
        jax.block_until_ready(m["loss"])

    def run_pipeline():
        batch = sharding.global_batch(next(it), setup.mesh)
        box["state"], m = step(box["state"], batch, setup.train_key, setup.frozen)
        jax.block_until_ready(m["loss"])

    return run_step, run_pipeline


def _sampler(setup, batch):
    fn = setup.sample_fn(batch)
    params = setup.create_state().ema_params
    cond = setup.labels_cond(np.zeros(batch))

    def run():
        jax.block_until_ready(setup.decode(fn(params, jax.random.key(1), cond)))

    return run


def _median(fn, rounds):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--autoencoder_workdir", default="runs/vae_digits")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-latent-")
    lat_cfg, pix_cfg = _configs(args, tmp)
    lat, pix = build.Setup(lat_cfg), build.Setup(pix_cfg)
    source = build.open_split(lat_cfg, "train")
    rows = {}
    t0 = time.perf_counter()
    cached = _trainer(lat, source, True, tmp)
    rows["encode the training set once (s)"] = time.perf_counter() - t0
    lat_nocache = build.Setup(lat_cfg.copy_and_resolve_references())
    on_the_fly = _trainer(lat_nocache, source, False, tmp)
    pixel = _trainer(pix, source, False, tmp)
    trains = {"latent, cache": cached, "latent, encode per step": on_the_fly, "pixel 32x32": pixel}
    samples = {
        "latent 8x8x4 (decode included)": _sampler(lat, args.batch),
        "pixel 32x32 ": _sampler(pix, args.batch),
    }
    for fns in trains.values():  # warm-up: compile
        fns[0](), fns[1]()
    for fn in samples.values():
        fn()
    results = {name: [] for name in list(trains) + list(samples)}
    for _ in range(args.rounds):
        for name, (step_only, with_pipeline) in trains.items():
            results[name].append((_median(step_only, 1), _median(with_pipeline, 1)))
    for name, fn in samples.items():
        results[name] = _median(fn, max(2, args.rounds // 3))
    print(
        f"\n{_cpu_model()}, jax {jax.__version__}, {jax.device_count()} device, "
        f"batch {args.batch}\n"
    )
    print("| train step | step only (ms) | with input pipeline (ms) | steps/s | vs pixel |")
    print("|---|---|---|---|---|")
    pixel_ms = statistics.median(p for _, p in results["pixel 32x32"]) * 1e3
    for name in trains:
        s = statistics.median(a for a, _ in results[name]) * 1e3
        p = statistics.median(b for _, b in results[name]) * 1e3
        print(f"| {name} | {s:.1f} | {p:.1f} | {1e3 / p:.2f} | {pixel_ms / p:.2f}x |")
    print(
        f"\n(the latent cache was built once in {rows['encode the training set once (s)']:.1f} s, "
        f"scale estimate included)\n"
    )
    print(
        f"| sampling, DDIM {args.steps} | s per batch of {args.batch} | ms per image | vs pixel |"
    )
    print("|---|---|---|---|")
    pix_s = results["pixel 32x32 "]
    for name in samples:
        s = results[name]
        print(f"| {name} | {s:.2f} | {s / args.batch * 1e3:.1f} | {pix_s / s:.2f}x |")


if __name__ == "__main__":
    main()
