"""diffjax's digits against the diffusers peer's, at the peer's sampler settings, in one table.

    python -m diffjax.main --config configs/digits.py --workdir runs/digits   # the default job
    python experiments/peer_quality.py --workdir runs/digits

Scores the peer's sample files (`../shared/peers/samples/*.npz`, 512 digits each, from diffusers
trained 3/10/20 minutes on the same data) and `--num` samples of the workdir's EMA parameters
drawn with the same two samplers as the peer's files: DDPM ancestral with all 1000 steps and
diffusers' default "fixed_small" variance (the posterior's β̃: `sampler.variance=posterior`
here), and DDIM with 50 steps, leading spacing, η = 0; x̂₀ clipped to [-1, 1] in both, as
diffusers' `clip_sample=True` does. All rows go through `diffjax.quality` at the
same N. The diffjax samples are written to `<workdir>/samples/peer_<sampler>.npz`. On a 2-core
CPU the 1000-step rows take most of the time (~6-10 min at N = 512); `--samplers ddim50` is
about 30 s. `--seeds 0,1,2` draws each sampler's N images under several sampling seeds (seed s
> 0 written to `peer_<sampler>_s<s>.npz`) and adds their mean: at N = 512 one draw's FD moves by
several tenths and its class KL by ~0.01 from one seed to another (README), and the peer's files
are one draw each; `--saved` scores the draws an earlier run wrote instead of drawing again;
`--peer-dir` scores another folder of files in the peer's format instead of the shared ones,
e.g. the peer's recipe retrained under other seeds by `experiments/peer_train.py`.
After the table come real train digits scored the same way (`--real-draws` draws of N: their
mean and range, what a perfect model's draws would score) and, for every row's images, the mean
distance to the nearest test digit and to the nearest of as many train digits
(`quality.nearest_real`): samples that copy training digits sit nearer the train digits.
"""

import argparse
import glob
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's configs/ package

from configs import digits  # noqa: E402
from diffjax import build, infer, latent_setup, quality, samplers, sampling, sharding  # noqa: E402
from diffjax.cond import NONE  # noqa: E402

PEER_DIR = os.path.join(ROOT, "..", "shared", "peers", "samples")
# The peer's two samplers: (diffjax sampler, steps, spacing, eta, variance).
SAMPLERS = {
    "ddpm1000": ("ddpm", 1000, "uniform", 0.0, "posterior"),
    "ddim50": ("ddim", 50, "leading", 0.0, "posterior"),
}
BATCH = 128
SPREAD = {"class_kl": 3, "fd": 2, "fd_balanced": 2}  # the real rows' ranged columns: decimals


def _row(name: str, r: dict) -> str:
    return (
        f"| {name} | {r['n']} | {r['confidence']:.3f} | {r['coverage']:g}/10 | "
        f"{r['class_kl']:.3f} | {r['fd']:.2f} | {r['fd_balanced']:.2f} |"
    )


def _score(images: np.ndarray, n: int, resize: str) -> dict:
    """digits_quality at N = n: the mean over the disjoint n-chunks of `images` (FD depends on
    N, so the peer's 512 are scored at the diffjax rows' N); the real reference goes through
    `resize` to 16x16 for every row."""
    chunks = [images[i : i + n] for i in range(0, len(images) - n + 1, n)]
    scores = [quality.digits_quality(c, 16, resize) for c in chunks]
    return {k: float(np.mean([r[k] for r in scores])) if k != "n" else n for k in scores[0]}


def _sample(setup, params, config, key: str, num: int, seed: int) -> np.ndarray:
    name, n_steps, spacing, eta, variance = SAMPLERS[key]
    df = config.diffusion
    pred = samplers.Prediction(df.target, df.learned_variance, True)
    fn = sampling.make_sample_fn(
        setup.model,
        setup.schedule,
        setup.mesh,
        sampler=name,
        pred=pred,
        variance=variance,
        params_sharding=setup.params_sharding,
    )
    noise = sampling.make_noise_fn(setup.mesh, (BATCH, *setup.image_shape))
    table = samplers.timestep_table(setup.schedule.num_steps, n_steps, spacing)
    root = jax.random.fold_in(setup.sample_key, seed) if seed else setup.sample_key
    out = []
    for b in range(-(-num // BATCH)):
        noise_key, loop_key = jax.random.split(jax.random.fold_in(root, b))
        x_T = noise(noise_key)
        out.append(sharding.to_host(fn(params, x_T, NONE, loop_key, table, n_steps, eta)))
    return np.concatenate(out)[:num]


def _at(step: int | None) -> str:
    return "saved" if step is None else f"step {step}"


def _print_real_rows(n: int, resize: str, draws: int) -> None:
    """The real train digits' rows: `draws` draws of n scored like samples, their mean and range
    (standard deviation); the confidence is the held-out test digits' (the classifier's own
    training digits read ~0.998)."""
    scores = quality.real_draw_scores(n, 16, resize, draws)
    mean = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    test = quality.to_digit_grid(quality.real_digits("test", 16, resize)[0])
    mean.update(n=n, confidence=quality.label_stats(test)["confidence"])
    print(_row(f"real train digits, mean of {draws} draws (confidence: test digits')", mean))
    cells = []
    for key, d in SPREAD.items():  # d: decimals shown
        v = [s[key] for s in scores]
        cells.append(f"{min(v):.{d}f}–{max(v):.{d}f} ({np.std(v, ddof=1):.{d}f})")
    print(f"| the {draws} draws' range (standard deviation) | {n} | | | {' | '.join(cells)} |")


def _print_nearest(rows: list[tuple[str, np.ndarray]], resize: str) -> None:
    """Each set's mean distance to its nearest test digit and to its nearest of as many train
    digits (`quality.nearest_real`): a set that copies training digits sits nearer the latter."""
    print("\n| images | nearest test digit | nearest of as many train digits | gap |")
    print("|---|---|---|---|")
    for name, images in rows:
        r = quality.nearest_real(images, 16, resize)
        print(f"| {name} | {r['to_test']:.3f} | {r['to_train']:.3f} | {r['gap']:+.3f} |")


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: want integers >= 0, e.g. 0,1,2")
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="A digits workdir; omit for peer rows.")
    parser.add_argument(
        "--peer-dir",
        default=PEER_DIR,
        help="Folder of peer sample files (default: the shared peer's; experiments/peer_train.py "
        "writes more in the same format).",
    )
    parser.add_argument(
        "--config", default="", help="Variant of configs/digits.py (default: the run's own config)."
    )
    parser.add_argument("--num", type=int, default=512, help="diffjax samples per sampler.")
    parser.add_argument("--samplers", default="ddpm1000,ddim50")
    parser.add_argument("--label", default="diffjax", help="Name of the diffjax rows.")
    parser.add_argument(
        "--seeds",
        type=_seeds,
        default="0",
        help="Sampling seeds, comma-separated (0: the run's sample key); several add a mean row.",
    )
    parser.add_argument("--raw", action="store_true", help="The raw parameters, not the EMA.")
    parser.add_argument(
        "--saved",
        action="store_true",
        help="Score the draws an earlier run wrote to <workdir>/samples/ instead of drawing.",
    )
    parser.add_argument(
        "--real-draws",
        type=int,
        default=20,
        help="Real train-digit draws of N scored like samples: their mean and range rows.",
    )
    parser.add_argument(
        "--resize",
        default="",
        help="The real reference's filter to 16x16 (default: the run's data.resize, else bicubic).",
    )
    args = parser.parse_args()
    config = None
    if args.workdir:  # the config the run was trained with, overrides included
        default = lambda: digits.get_config(args.config or None)
        read = latent_setup.read_run_config_or
        config = default() if args.config else read(args.workdir, default)
    resize = args.resize or (config.data.resize if config else "bicubic")
    print(f"(real reference: digits resized to 16x16 with {resize})")

    print("| images | N | confidence | coverage | class KL | FD | FD, class-balanced |")
    print("|---|---|---|---|---|---|---|")
    nearest = []  # (row name, images) for the nearest-digit table
    for path in sorted(glob.glob(os.path.join(args.peer_dir, "*.npz"))):
        with np.load(path) as npz:
            peer = npz["x"][..., None]
        name = f"peer {os.path.basename(path)[len('diffusers_digits_') : -4]}"
        print(_row(name, _score(peer, min(args.num, len(peer)), resize)), flush=True)
        nearest.append((name, peer))
    if args.workdir:
        if args.saved:  # the draws an earlier run of this script wrote
            setup = params = None
            step = None
        elif args.raw:
            setup = build.Setup(config)
            state, step = infer.restore_for_inference(setup, args.workdir, None)
            params = state.params
        else:
            setup, params, step = infer.load_ema(config, args.workdir)
        for key in args.samplers.split(","):
            rows = []
            for seed in args.seeds:
                t0 = time.perf_counter()
                suffix = f"_s{seed}" if seed else ""
                path = os.path.join(args.workdir, "samples", f"peer_{key}{suffix}.npz")
                if args.saved:
                    with np.load(path) as npz:
                        images = npz["images"][: args.num]
                else:
                    images = _sample(setup, params, config, key, args.num, seed)
                    np.savez_compressed(path, images=images)
                r = _score(images, args.num, resize)
                rows.append(r)
                nearest.append((f"{args.label} {_at(step)} {key} seed {seed}", images))
                print(
                    _row(f"{args.label} {_at(step)} {key} seed {seed}", r)
                    + f" <!-- {time.perf_counter() - t0:.0f} s -->",
                    flush=True,
                )
            if len(rows) > 1:
                mean = {k: float(np.mean([x[k] for x in rows])) for k in rows[0]}
                mean["n"] = args.num
                print(_row(f"{args.label} {_at(step)} {key} mean of {len(rows)} seeds", mean))
    _print_real_rows(args.num, resize, args.real_draws)
    _print_nearest(nearest, resize)


if __name__ == "__main__":
    main()
