"""Per-step cost of the compiled samplers against a bare U-Net forward at the same batch.

    python experiments/bench/bench_samplers.py [--batch 64] [--steps 50] [--rounds 5]

The network is the default digits config's U-Net (random weights; speed does not depend on
them). Three baselines: one jitted forward call; a compiled loop of forwards that feeds each
output back (the loop machinery with no sampler math); then every sampler over `--steps` steps,
per network call (Heun: 2·steps - 1 calls). Rounds interleave the candidates and medians are
reported, so a noisy shared machine biases them alike. Prints a markdown table.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repository's configs/ package

from configs import digits  # noqa: E402
from diffjax import build, samplers, sampling, schedules, sharding, steps  # noqa: E402
from diffjax.cond import NONE  # noqa: E402


def _time(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    config = digits.get_config()
    model = build.model(config)
    s = schedules.make_schedule("linear", 1000)
    mesh = sharding.make_mesh(1)
    shape = (args.batch, config.data.image_size, config.data.image_size, config.data.channels)
    x = jax.random.normal(jax.random.key(0), shape)
    t = jnp.full((args.batch,), 500, jnp.int32)
    params = model.init(jax.random.key(1), x[:1], t[:1], NONE)["params"]
    opts = steps.compiler_options()

    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, t, NONE), compiler_options=opts)

    def loop(p, x, n):
        body = lambda i, x: model.apply({"params": p}, x, t, NONE)
        return jax.lax.fori_loop(0, n, body, x)

    bare_loop = jax.jit(loop, compiler_options=opts)
    n = np.int32(args.steps)
    table = samplers.timestep_table(1000, args.steps, "uniform", 1000)
    cands = {
        "forward (1 jitted call)": (lambda: forward(params, x), 1),
        "loop of forwards": (lambda: bare_loop(params, x, n), args.steps),
    }
    for name in samplers.SAMPLERS:
        fn = sampling.make_sample_fn(model, s, mesh, sampler=name)
        calls = samplers.network_calls(name, args.steps)
        cands[name] = ((lambda fn=fn: fn(params, x, NONE, jax.random.key(2), table, n)), calls)
    for f, _ in cands.values():  # compile and warm up
        _time(f)
    times = {k: [] for k in cands}
    for _ in range(args.rounds):
        for k, (f, calls) in cands.items():
            times[k].append(_time(f) / calls)
    base = statistics.median(times["loop of forwards"])
    fwd = statistics.median(times["forward (1 jitted call)"])
    print(
        f"digits U-Net, batch {args.batch}, {args.steps} steps, {jax.device_count()} device(s), "
        f"{jax.default_backend()}; medians of {args.rounds} rounds\n"
    )
    print("| program | ms per network call | vs loop of forwards | vs one forward call |")
    print("|---|---|---|---|")
    for k in cands:
        m = statistics.median(times[k])
        print(
            f"| {k} | {1000 * m:.2f} | {100 * (m / base - 1):+.1f}% | {100 * (m / fwd - 1):+.1f}% |"
        )


if __name__ == "__main__":
    main()
