"""Loading and sampling a diffusers DDPM pipeline: diffjax against diffusers, on this machine.

    python experiments/bench/bench_pretrained.py --diffusers DIR [--peer-python PY]
    python experiments/bench/bench_pretrained.py --unet DIR [--peer-python PY]   # load only

DIR is a DDPM pipeline, e.g. a random one of google/ddpm-cifar10-32's shape made with
`tests/fixtures/make_unet2d_fixture.py --ddpm-cifar DIR` (in a torch venv). Each measurement runs
in its own process: the U-Net's load time and the growth of peak resident memory over the
process's size after its imports; then DDIM sampling (η = 0, the same steps and batch) as
seconds per denoising step, the median of 3 timed runs after a warm-up (which compiles). With
`--peer-python` (a Python that has torch and diffusers, never the project's), diffusers is
measured the same way (`UNet2DModel.from_pretrained`, its U-Net + `DDIMScheduler.step` loop,
torch at 2 threads). `--unet DIR` times loading one U-Net folder only (UNet2DModel or
UNet2DConditionModel, e.g. a random one of Stable Diffusion 1.5's shape from
`tests/fixtures/make_sd_fixture.py --sd15-unet DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEER = r"""
import json, resource, sys, time
import numpy as np, torch, diffusers
torch.set_num_threads(int(sys.argv[4]))
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
directory, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
folder = directory if steps == 0 else directory + "/unet"
kind = json.load(open(folder + "/config.json"))["_class_name"]
base = rss()
t0 = time.perf_counter()
unet = getattr(diffusers, kind).from_pretrained(folder).eval()
load = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
if steps == 0:
    print(json.dumps(dict(load_s=load, peak_mib=peak, step_s=float("nan"))))
    sys.exit()
scheduler = diffusers.DDIMScheduler.from_pretrained(directory + "/scheduler")
c, s = unet.config.in_channels, unet.config.sample_size
def run():
    scheduler.set_timesteps(steps)
    x = torch.randn(batch, c, s, s, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x
run()
times = []
for _ in range(3):
    t0 = time.perf_counter(); run(); times.append((time.perf_counter() - t0) / steps)
print(json.dumps(dict(load_s=load, peak_mib=peak, step_s=float(np.median(times)))))
"""


def child(directory: str, batch: int, steps: int) -> None:
    """diffjax's side, in this process: prints one JSON line."""
    import resource
    import time

    import jax
    import numpy as np

    sys.path.insert(0, ROOT)
    from configs import default
    from diffjax import infer, pipelines, samplers, sharding
    from diffjax.cond import Cond
    from diffjax.models import diffusers_unet

    def rss():
        status = open("/proc/self/status").read()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024

    jax.numpy.zeros(1).block_until_ready()  # the backend's own start-up is not the load's
    base = rss()
    t0 = time.perf_counter()
    _, params, _ = diffusers_unet.load(directory if steps == 0 else f"{directory}/unet")
    jax.block_until_ready(params)
    load = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    param_mib = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
    del params
    if steps == 0:  # load only
        nan = float("nan")
        print(json.dumps(dict(load_s=load, peak_mib=peak, param_mib=param_mib, step_s=nan)))
        return
    with tempfile.TemporaryDirectory() as workdir:
        config = pipelines.import_diffusers(directory, workdir, default.get_config())
        config.sampler.update(name="ddim", steps=steps, spacing="leading", max_steps=steps)
        setup, ema, _ = infer.load_ema(config, workdir)
    table = samplers.timestep_table(config.diffusion.num_steps, steps, "leading", steps)
    fn = setup.sample_program()
    shape = (batch, *setup.image_shape)
    x_T = sharding.from_global(
        np.random.default_rng(0).standard_normal(shape, np.float32),
        sharding.batch_sharded(setup.mesh),
    )
    cond = sharding.from_global(Cond(), sharding.batch_sharded(setup.mesh))

    def run():
        out = fn(ema, x_T, cond, jax.random.key(0), table, steps, 0.0, 1.0, **setup.guidance_args())
        jax.block_until_ready(out)

    run()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) / steps)
    result = dict(load_s=load, peak_mib=peak, param_mib=param_mib, step_s=float(np.median(times)))
    print(json.dumps(result))


def measure(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers", help="a DDPM pipeline directory")
    parser.add_argument("--unet", help="a U-Net folder: time loading it, nothing else")
    parser.add_argument("--peer-python", default="", help="a Python with torch and diffusers")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the peer)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.diffusers, args.batch, args.steps)
    if bool(args.unet) == bool(args.diffusers):
        parser.error("give --diffusers PIPELINE or --unet FOLDER")
    if args.unet:
        args.diffusers, args.steps = args.unet, 0
    own = [sys.executable, os.path.abspath(__file__), "--child", "--diffusers", args.diffusers]
    own += ["--batch", str(args.batch), "--steps", str(args.steps)]
    rows = {"diffjax": measure(own)}
    if args.peer_python:
        peer = [args.peer_python, "-c", PEER, args.diffusers, str(args.batch), str(args.steps)]
        rows["diffusers"] = measure(peer + [str(args.threads)])
    sampling = f"DDIM {args.steps} steps, batch {args.batch}" if args.steps else "load only"
    print(f"{args.diffusers}: U-Net {rows['diffjax']['param_mib']:.0f} MiB of float32 params; "
          f"{sampling}")  # fmt: skip
    print("| library | load s | peak RSS growth MiB | DDIM s/step |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['load_s']:.2f} | {r['peak_mib']:.0f} | {r['step_s']:.3f} |")
    if "diffusers" in rows and args.steps:
        ratio = rows["diffusers"]["step_s"] / rows["diffjax"]["step_s"]
        print(f"diffjax samples {ratio:.2f}x diffusers' rate")


if __name__ == "__main__":
    main()
