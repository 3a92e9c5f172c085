"""Digits quality against network calls, for every sampler, from one trained checkpoint.

    python -m diffjax.main --config configs/digits.py --workdir runs/digits   # ~10 min
    python experiments/sampler_quality.py --workdir runs/digits --num 128

For each sampler and budget of network calls (NFE) it draws `--num` samples from the EMA
parameters with the same starting noise, times them (after one compilation per sampler: the step
count is traced) and scores them with `diffjax.quality.digits_quality`. Prints a markdown table
and writes it with the raw numbers to `<workdir>/sampler_quality.json`. Heun spends 2·steps - 1
calls, so its budgets are the nearest odd numbers below. About 4 s per 1000 calls at batch 128
on a 2-core CPU: ~15 min for the default grid.
"""

import argparse
import json
import os
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's configs/ package

from configs import digits  # noqa: E402
from diffjax import infer, latent_setup, quality, samplers, sampling, sharding  # noqa: E402
from diffjax.cond import NONE  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # JAX's public monitoring event


def _steps_for(name: str, nfe: int) -> int:
    return (nfe + 1) // 2 if name == "heun" else nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="A digits training workdir.")
    parser.add_argument("--config", default="", help="Variant of configs/digits.py it used.")
    parser.add_argument("--num", type=int, default=128, help="Samples per cell.")
    parser.add_argument("--nfe", default="10,20,50,100,1000", help="Network-call budgets.")
    parser.add_argument("--samplers", default=",".join(samplers.SAMPLERS))
    parser.add_argument(
        "--spacing",
        default="uniform,trailing",
        help="Spacings tried below 100 calls (the best is reported).",
    )
    args = parser.parse_args()

    # The config the run was trained with (overrides included), unless --config names a variant.
    default = lambda: digits.get_config(args.config or None)
    config = default() if args.config else latent_setup.read_run_config_or(args.workdir, default)
    setup, params, step = infer.load_ema(config, args.workdir)
    s = setup.schedule
    shape = (args.num, *setup.image_shape)
    df = config.diffusion
    pred = samplers.Prediction(df.target, df.learned_variance, True)
    noise_key, loop_key = jax.random.split(setup.sample_key)
    x_T = sampling.make_noise_fn(setup.mesh, shape)(noise_key)  # the same start for every cell
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == COMPILE_EVENT else None
    )
    rows, raw = [], []
    for name in args.samplers.split(","):
        fn = sampling.make_sample_fn(
            setup.model,
            s,
            setup.mesh,
            sampler=name,
            pred=pred,
            variance=config.sampler.variance,
            params_sharding=setup.params_sharding,
        )
        warm = samplers.timestep_table(s.num_steps, 1, "uniform", s.num_steps)
        fn(params, x_T, NONE, loop_key, warm, 1)  # the one compilation
        compiled = len(compiles)
        for nfe in (int(x) for x in args.nfe.split(",")):
            n = _steps_for(name, nfe)
            best = None
            for spacing in args.spacing.split(",") if nfe < 100 else ["uniform"]:
                table = samplers.timestep_table(s.num_steps, n, spacing, s.num_steps)
                t0 = time.perf_counter()
                images = sharding.to_host(fn(params, x_T, NONE, loop_key, table, n))
                secs = time.perf_counter() - t0
                q = quality.digits_quality(images, config.data.image_size)
                cell = dict(
                    sampler=name,
                    nfe=samplers.network_calls(name, n),
                    steps=n,
                    spacing=spacing,
                    s_per_image=secs / args.num,
                    **{
                        k: float(q[k])
                        for k in ("confidence", "coverage", "class_kl", "fd", "fd_real")
                    },
                )
                raw.append(cell)
                if best is None or cell["fd"] < best["fd"]:
                    best = cell
            rows.append(best)
            print(json.dumps(best), flush=True)
        assert len(compiles) == compiled, "the sampler recompiled"
    lines = [
        f"checkpoint step {step}, N = {args.num}, real-digit FD at this N: "
        f"{rows[0]['fd_real']:.2f}",
        "",
        "| sampler | NFE | spacing | confidence | coverage | class KL | FD | ms/image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['sampler']} | {r['nfe']} | {r['spacing']} | {r['confidence']:.3f} | "
        f"{r['coverage']:.0f}/10 | {r['class_kl']:.3f} | {r['fd']:.2f} | "
        f"{1000 * r['s_per_image']:.1f} |"
        for r in rows
    ]
    print("\n".join(lines))
    with open(os.path.join(args.workdir, "sampler_quality.json"), "w") as f:
        json.dump({"table": lines, "best": rows, "all": raw}, f, indent=1)


if __name__ == "__main__":
    jax.config.parse_flags_with_absl()
    main()
