"""Cost of classifier-free guidance per DDIM step, against the unguided and unconditional nets.

    python experiments/bench/bench_guidance.py [--batch 64] [--steps 50] [--rounds 5] [--devices 1]

The networks are configs/digits_class.py's U-Net (16x16x1, 10 classes and the null class, its
`Conditioner(num_classes=10, drop_prob=0.1)`) and, for reference, the same U-Net without the
class embedding (configs/digits.py); random weights, as speed does not depend on them. Every row
is `sampling.make_sample_fn`'s DDIM over `--steps` steps for the same `--batch` outputs: w = 1 runs
the conditional network on the batch, w = 3 the conditional and null sides as one call on the
doubled batch (`guidance.classifier_free`). Both w come from one compiled program (w is traced;
a `lax.switch` picks the plain or the doubled call). Rounds interleave the rows after a warm-up
call each, and the medians are reported, so a noisy shared machine biases them alike. `--devices
N` gives the process N CPU devices (`jax_num_cpu_devices`) and splits the batch over a mesh of
them. Prints a markdown table.
"""

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repository's configs/ package

from configs import digits, digits_class  # noqa: E402
from diffjax import build, samplers, sampling, sharding  # noqa: E402
from diffjax.cond import NONE  # noqa: E402


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _time(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def _sampler(config, mesh, batch: int):
    """`(sample_fn, params, cond)` for the config's network, random weights, DDIM."""
    model, conditioner = build.model(config), build.conditioner(config)
    size, channels = config.data.image_size, config.data.channels
    x = jnp.zeros((1, size, size, channels))
    params = model.init(jax.random.key(1), x, jnp.zeros((1,), jnp.int32), conditioner.example())
    params = jax.device_put(params["params"], sharding.replicated(mesh))
    fn = sampling.make_sample_fn(
        model,
        build.schedule(config),
        mesh,
        sampler="ddim",
        pred=build.prediction(config),
        conditioner=conditioner,
    )
    labels = np.arange(batch, dtype=np.int32) % max(conditioner.num_classes, 1)
    cond = sharding.from_global(conditioner.labels(labels), sharding.batch_sharded(mesh))
    return fn, params, cond


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="outputs per call")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per call")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per row (median)")
    parser.add_argument(
        "--devices", type=int, default=1, help="CPU: XLA devices, the batch split over them"
    )
    args = parser.parse_args()
    if args.devices > 1:  # before anything starts the backend
        jax.config.update("jax_num_cpu_devices", args.devices)

    mesh = sharding.make_mesh(jax.device_count())
    cls_config = digits_class.get_config()
    guided, params, cond = _sampler(cls_config, mesh, args.batch)
    plain, params_u, _ = _sampler(digits.base(), mesh, args.batch)
    d = cls_config.data
    noise_key, loop_key = jax.random.split(jax.random.key(0))
    x_T = sampling.make_noise_fn(mesh, (args.batch, d.image_size, d.image_size, d.channels))(
        noise_key
    )
    table, n = samplers.timestep_table(1000, args.steps), args.steps
    rows = {
        "unconditional (reference)": (
            lambda: plain(params_u, x_T, NONE, loop_key, table, n),
            args.batch,
        ),
        "conditional, w = 1": (
            lambda: guided(params, x_T, cond, loop_key, table, n, guidance_scale=1.0),
            args.batch,
        ),
        "guided, w = 3": (
            lambda: guided(params, x_T, cond, loop_key, table, n, guidance_scale=3.0),
            2 * args.batch,
        ),
    }
    for f, _ in rows.values():  # compile and warm up
        _time(f)
    times = {k: [] for k in rows}
    for _ in range(args.rounds):
        for k, (f, _) in rows.items():
            times[k].append(_time(f) / n)
    base = statistics.median(times["unconditional (reference)"])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"digits_class U-Net ({n_params:,} params), {args.batch} outputs of "
        f"{d.image_size}x{d.image_size}x{d.channels}, DDIM "
        f"{n} steps, {jax.device_count()} device(s), {jax.default_backend()}, {_cpu_model()}; "
        f"medians of {args.rounds} rounds\n"
    )
    print("| program | network batch | ms per step | vs unconditional |")
    print("|---|---|---|---|")
    for k, (_, net_batch) in rows.items():
        m = statistics.median(times[k])
        print(f"| {k} | {net_batch} | {1000 * m:.2f} | {m / base:.2f}x |")


if __name__ == "__main__":
    main()
