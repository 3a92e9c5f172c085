"""Train and sampling throughput of diffjax's U-Net on the two peer benchmark networks.

    python experiments/bench/bench_unet.py                        # both cases, a table
    python experiments/bench/bench_unet.py --peer-json peer.jsonl # plus ratios to the peer
    python experiments/bench/bench_unet.py --devices 2            # a 2-device CPU mesh
    python experiments/bench/bench_unet.py --malloc default       # glibc's malloc untouched

Cases (the networks of ../shared/peers/README.md, built with diffjax.models.UNet):
  ddpm-cifar  DDPM's CIFAR-10 U-Net, 35,746,307 params, 32x32x3, batch 16.
  small       16x16x1, channels (32, 64, 64), 1 res block/level, attention at 8x8, batch 64.
and, with --cases, configs/digits.py's U-Nets at batch 64:
  digits-base the earlier full-resolution one (no attention at 8x8).
  digits-32   the same on 2x2 patches folded into channels (patch_size=2).
  digits      the three-level default before today's: folded patches, 64 channels at 3 levels.
  digits-b32, digits-b16  the same at batch 32 and 16.
  digits-2lv  today's default: the same with two levels (8, 4) instead of three.
  digits-2lv48  the same with 48 channels.

Each measurement runs in a fresh child process (so its peak RSS is its own): the compiled train
step (ε-MSE, AdamW, EMA) and the compiled DDPM sampling loop, median of --steps timed calls after
warm-up. The sampling time per step is the loop time over --sample-steps steps divided by that
number. `--peer-json` takes the JSON lines of diffusers_cpu_bench.py --json and prints ratios.
Workers set glibc's malloc as the command line does (`diffjax.cli.keep_freed_memory`);
`--malloc default` leaves it as glibc ships it.
`--devices N` gives the process N CPU devices (`jax_num_cpu_devices`, as `diffjax.main
--cpu_devices`) and splits the batch over a mesh of them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CASES = {
    "ddpm-cifar": dict(
        batch=16,
        shape=(32, 32, 3),
        model=dict(
            base_channels=128,
            channel_mults=(1, 2, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(16,),
            head_dim=None,
            dropout=0.1,
            norm_eps=1e-6,
        ),
    ),
    "small": dict(
        batch=64,
        shape=(16, 16, 1),
        model=dict(
            base_channels=32,
            channel_mults=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(8,),
            head_dim=8,
            dropout=0.0,
            norm_eps=1e-5,
        ),
    ),
}
# The default digits network (configs/digits.py: 2x2 patches folded into channels), the
# 32/64/64 one before it and the earlier full-resolution one (`digits.base()`):
# `--cases digits-base,digits-32,digits` compares them.
DIGITS = dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=())
CASES["digits-base"] = dict(batch=64, shape=(16, 16, 1), model=dict(DIGITS, dropout=0.0))
CASES["digits-32"] = dict(
    batch=64, shape=(16, 16, 1), model=dict(DIGITS, dropout=0.0, patch_size=2)
)
CASES["digits"] = dict(
    batch=64,
    shape=(16, 16, 1),
    model=dict(DIGITS, dropout=0.0, patch_size=2, base_channels=64, channel_mults=(1, 1, 1)),
)
# The same network at smaller batches: on a 2-core CPU the step's cost is not linear in the batch.
CASES["digits-b32"] = dict(CASES["digits"], batch=32)
CASES["digits-b16"] = dict(CASES["digits"], batch=16)
# Two levels (8 and 4 on the folded grid, the middle blocks at 4x4): about the same FLOPs as
# three, but the 2x2 level's many small operations cost ~20% of the step on a 2-core CPU.
TWO_LEVELS = dict(CASES["digits"]["model"], channel_mults=(1, 1))
CASES["digits-2lv"] = dict(CASES["digits"], model=TWO_LEVELS)
CASES["digits-2lv48"] = dict(
    CASES["digits"], model=dict(TWO_LEVELS, base_channels=48, num_groups=16)
)
MARK = "@@BENCH@@"


def _timed(fn, steps: int, warmup: int) -> tuple[float, float]:
    import jax

    t0 = time.perf_counter()
    for _ in range(warmup):
        jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times), first


def worker(
    case: str, mode: str, timed: int, warmup: int, sample_steps: int, dtype: str, devices: int = 1
) -> dict:
    import jax

    from diffjax import cli

    cli.keep_freed_memory()  # as the command line does (--malloc default: glibc's own)
    if devices > 1:  # CPU: this many XLA devices in one process, the batch split over them
        jax.config.update("jax_num_cpu_devices", devices)
    import jax.numpy as jnp
    import numpy as np

    from diffjax import samplers, sampling, schedules, sharding, steps, train_state
    from diffjax.cond import NONE
    from diffjax.models.unet import UNet

    spec = CASES[case]
    b, shape = spec["batch"], spec["shape"]
    mesh = sharding.make_mesh(jax.device_count())
    model = UNet(**spec["model"], dtype=jnp.dtype(dtype))
    tx = train_state.make_optimizer(2e-4, 1, 0.0, 0.9, 0.999, 0.0)
    state = train_state.create_train_state(
        model, tx, shape, jax.random.key(0), mesh, num_timesteps=1000
    )
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    out = dict(
        case=case,
        mode=mode,
        batch=b,
        params=n_params,
        dtype=dtype,
        devices=jax.device_count(),
        backend=jax.default_backend(),
    )
    if mode == "train":
        abstract = train_state.abstract_train_state(model, tx, shape, mesh, num_timesteps=1000)
        step = steps.make_train_step(
            model, schedules.make_schedule("linear", 1000), tx, mesh, abstract
        )
        batch = sharding.global_batch(
            {
                "image": np.random.default_rng(0).uniform(-1, 1, (b, *shape)).astype(np.float32),
                "label": np.zeros(b, np.int32),
            },
            mesh,
        )
        holder = {"state": state}

        def run():
            holder["state"], metrics = step(holder["state"], batch, jax.random.key(1), None)
            return metrics["loss"]

        median, first = _timed(run, timed, warmup)
        out.update(median_s=median, images_per_s=b / median, warmup_s=first)
    else:
        sched = schedules.make_schedule("linear", sample_steps)
        fn = sampling.make_sample_fn(model, sched, mesh)
        table = samplers.timestep_table(sample_steps, sample_steps)
        noise_key, loop_key = jax.random.split(jax.random.key(2))
        x_T = sampling.make_noise_fn(mesh, (b, *shape))(noise_key)
        median, first = _timed(
            lambda: fn(state.ema_params, x_T, NONE, loop_key, table, sample_steps),
            max(1, timed // 3),
            1,
        )
        out.update(
            median_s=median / sample_steps,
            full_1000_step_sample_s=median / sample_steps * 1000,
            warmup_s=first,
        )
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _child(args, case, mode) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_worker",
        case,
        mode,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--sample-steps",
        str(args.sample_steps),
        "--dtype",
        args.dtype,
        "--devices",
        str(args.devices),
    ]
    env = dict(os.environ)
    if args.ynn_fusion:
        env["DIFFJAX_CPU_YNN_FUSION"] = args.ynn_fusion
    if args.malloc:
        env["DIFFJAX_MALLOC"] = args.malloc
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    return dict(case=case, mode=mode, error=proc.stderr.strip().splitlines()[-3:])


def _load_peer(path: str) -> dict:
    peer = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            for mode, result in (r.get("eager") or {}).items():
                peer[(r.get("case"), mode)] = result
    return peer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="ddpm-cifar,small")
    ap.add_argument("--steps", type=int, default=10, help="timed train steps (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sample-steps", type=int, default=20, help="steps of the timed sampler loop")
    ap.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    ap.add_argument(
        "--devices",
        type=int,
        default=1,
        help="CPU: XLA devices in the process (a mesh over them splits the batch); "
        "on a 2-core machine 2 devices sample faster than 1",
    )
    ap.add_argument("--peer-json", default=None, help="diffusers_cpu_bench.py --json output")
    ap.add_argument(
        "--ynn-fusion",
        default=None,
        help="CPU: override diffjax's YNNPACK fusion list ('default' = XLA's)",
    )
    ap.add_argument(
        "--malloc",
        default=None,
        help="'default': glibc's malloc as it is, not diffjax's setting (cli.keep_freed_memory)",
    )
    ap.add_argument("--json", action="store_true", help="also print one JSON line per result")
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        res = worker(
            *args._worker, args.steps, args.warmup, args.sample_steps, args.dtype, args.devices
        )
        print(MARK + json.dumps(res), flush=True)
        return 0

    peer = _load_peer(args.peer_json) if args.peer_json else {}
    rows = []
    for case in args.cases.split(","):
        tr, sa = _child(args, case, "train"), _child(args, case, "sample")
        for r in (tr, sa):
            if "error" in r:
                print(f"{case} {r['mode']} failed: {r['error']}", file=sys.stderr)
            if args.json:
                print(json.dumps(r))
        rows.append((case, tr, sa))

    head = (
        "| case | devices | batch | params | train s/step | train img/s | sample s/step | "
        "peak RSS train (MiB) | peak RSS sample (MiB) |"
    )
    print(head + "\n|" + "---|" * 9)
    for case, tr, sa in rows:
        print(
            f"| {case} | {tr.get('devices')} | {tr.get('batch')} | {tr.get('params', 0):,} | "
            f"{tr.get('median_s', float('nan')):.3f} | {tr.get('images_per_s', float('nan')):.1f}"
            f" | {sa.get('median_s', float('nan')):.4f} | {tr.get('peak_rss_mib', 0):.0f} | "
            f"{sa.get('peak_rss_mib', 0):.0f} |"
        )
    if peer:
        print(
            "\n| case | peer train img/s | diffjax train img/s | ratio | peer sample s/step | "
            "diffjax sample s/step | ratio (step rate) |\n|" + "---|" * 7
        )
        for case, tr, sa in rows:
            pt, ps = peer.get((case, "train"), {}), peer.get((case, "sample"), {})
            pi, di = pt.get("images_per_s", float("nan")), tr.get("images_per_s", float("nan"))
            pss, dss = ps.get("median_s", float("nan")), sa.get("median_s", float("nan"))
            print(
                f"| {case} | {pi:.1f} | {di:.1f} | {di / pi:.2f}x | {pss:.4f} | {dss:.4f} | "
                f"{pss / dss:.2f}x |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
