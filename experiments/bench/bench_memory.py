"""Memory and throughput of the train step under each memory/precision lever.

    python experiments/bench/bench_memory.py [--case ddpm-cifar] [--steps 3]

Levers (config fields): bf16 compute with float32 parameters and optimizer state
(`model.dtype`), rematerialisation of residual and attention blocks (`model.remat`), and
gradient accumulation over microbatches (`train.grad_accum_steps`). Each lever runs in a fresh
child process: XLA's compiled memory analysis of the train step (temporary buffers = the
activations and gradients in flight; arguments = state + batch), the median step time after one
warm-up step, and the process's peak RSS. Networks and batches are bench_unet.py's cases.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from bench_unet import CASES, MARK, _timed

LEVERS = {
    "float32": {},
    "bfloat16": dict(dtype="bfloat16"),
    "remat": dict(remat=True),
    "grad accum ×4": dict(grad_accum_steps=4),
    "remat + bfloat16": dict(remat=True, dtype="bfloat16"),
    "remat + bf16 + accum ×4": dict(remat=True, dtype="bfloat16", grad_accum_steps=4),
}


def worker(case: str, lever: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diffjax import schedules, sharding, train_state
    from diffjax import steps as steps_lib
    from diffjax.models.unet import UNet

    spec, opts = CASES[case], dict(LEVERS[lever])
    b, shape = spec["batch"], spec["shape"]
    mesh = sharding.make_mesh(1)
    model = UNet(
        **spec["model"],
        dtype=jnp.dtype(opts.get("dtype", "float32")),
        remat=opts.get("remat", False),
    )
    tx = train_state.make_optimizer(2e-4, 1, 0.0, 0.9, 0.999, 1.0)
    state = train_state.create_train_state(
        model, tx, shape, jax.random.key(0), mesh, num_timesteps=1000
    )
    abstract = train_state.abstract_train_state(model, tx, shape, mesh, num_timesteps=1000)
    step = steps_lib.make_train_step(
        model,
        schedules.make_schedule("linear", 1000),
        tx,
        mesh,
        abstract,
        grad_accum_steps=opts.get("grad_accum_steps", 1),
    )
    batch = sharding.global_batch(
        {
            "image": np.random.default_rng(0).uniform(-1, 1, (b, *shape)).astype(np.float32),
            "label": np.zeros(b, np.int32),
        },
        mesh,
    )
    key = jax.random.key(1)
    mem = step.lower(state, batch, key, None).compile().memory_analysis()
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch, key, None)
        return metrics["loss"]

    median, _ = _timed(run, steps, 1)
    return dict(
        case=case,
        lever=lever,
        batch=b,
        median_s=median,
        images_per_s=b / median,
        temp_mib=getattr(mem, "temp_size_in_bytes", 0) / 2**20,
        argument_mib=getattr(mem, "argument_size_in_bytes", 0) / 2**20,
        loss=float(run()),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="ddpm-cifar", choices=sorted(CASES))
    ap.add_argument("--levers", default=",".join(LEVERS))
    ap.add_argument("--steps", type=int, default=3, help="timed train steps (median)")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        print(MARK + json.dumps(worker(args.case, args._worker, args.steps)), flush=True)
        return 0
    rows = []
    for lever in args.levers.split(","):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--case",
            args.case,
            "--steps",
            str(args.steps),
            "--_worker",
            lever,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = [json.loads(x[len(MARK) :]) for x in proc.stdout.splitlines() if x.startswith(MARK)]
        if not found:
            print(f"{lever} failed: {proc.stderr.strip().splitlines()[-3:]}", file=sys.stderr)
            continue
        rows.append(found[0])
        print(json.dumps(found[0]), file=sys.stderr, flush=True)
    print(f"\n{args.case}, batch {rows[0]['batch'] if rows else '?'}, one CPU device\n")
    print("| lever | XLA temp buffers (MiB) | arguments (MiB) | peak RSS (MiB) | s/step | img/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['lever']} | {r['temp_mib']:.0f} | {r['argument_mib']:.0f} | "
            f"{r['peak_rss_mib']:.0f} | {r['median_s']:.3f} | {r['images_per_s']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
