"""SIGKILL the real CLI at random moments of a tiny run; every resume must end where an
uninterrupted run ends, bit for bit, with no checkpoint left unreadable."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS

from configs import digits
from diffjax import build, checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS, EVERY = 300, 20  # steps of the run; the checkpoint interval
# Kills after the first (in start-up): at a random moment of start-up and compilation (before the
# first logged step), at a random training step, and inside an asynchronous checkpoint write.
# Each kill lets the run progress at most ~1.5 intervals, so all of them land before the end.
PLAN = {"compile": 2, "training": 4, "mid_write": 3}
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _config(data_dir):
    config = digits.get_config("tiny")
    config.data.data_dir = str(data_dir)
    config.train.update(num_steps=NUM_STEPS, checkpoint_every_steps=EVERY, log_every_steps=1)
    return config


def _cli(workdir, data_dir):
    return [
        sys.executable,
        "-m",
        "diffjax.main",
        "--config",
        f"{ROOT}/configs/digits.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.train.num_steps={NUM_STEPS}",
        f"--config.train.checkpoint_every_steps={EVERY}",
        "--config.train.log_every_steps=1",
    ]


def _env():
    # One device, as users run it, and no compilation cache: every restart compiles anew, so
    # kills land in compilation too.
    env = {**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def _run_to_end(workdir, data_dir) -> None:
    """One uninterrupted CLI run (from wherever the workdir stands) that must succeed."""
    res = subprocess.run(
        _cli(workdir, data_dir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]


def _logged_step(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(x)["step"] for x in open(path).read().splitlines() if x.endswith("}")]
    return max(steps, default=0)


def _tmp_dirs(workdir) -> list[str]:
    ckpts = os.path.join(workdir, "checkpoints")
    return [p for p in os.listdir(ckpts) if p.endswith(TMP_SUFFIX)] if os.path.isdir(ckpts) else []


def _restore_all(config, workdir):
    """Restores every step on disk (each must read back), then the newest: (state, data, step)."""
    setup = build.Setup(config)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)
    try:
        for s in ckpt.all_steps():
            ckpt.restore(setup.abstract_state, s)  # raises if a step is unreadable
        return ckpt.restore(setup.abstract_state) if ckpt.all_steps() else (None, None, 0)
    finally:
        ckpt.close()


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    rng = random.Random(0)
    config = _config(tmp_path / "tfds")
    ref_dir, work = tmp_path / "reference", tmp_path / "killed"
    t0 = time.time()
    _run_to_end(ref_dir, tmp_path / "tfds_ref")
    run_time = time.time() - t0

    counts = {"kills": 0, "mid_write": 0, "resumes": 0, "max_steps_lost": 0, "steps_lost": 0}
    plan = [kind for kind, n in PLAN.items() for _ in range(n)]
    saved = 0
    rng.shuffle(plan)
    plan.insert(0, "startup")  # the first launch also prepares the dataset
    for kind in plan:
        proc = subprocess.Popen(
            _cli(work, tmp_path / "tfds"),
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if kind == "mid_write":  # poll for Orbax's temporary directory: kill inside the write
            deadline = time.time() + run_time
            while proc.poll() is None and not _tmp_dirs(work) and time.time() < deadline:
                time.sleep(0.0005)
            caught = bool(_tmp_dirs(work))
        else:
            start = saved  # the step this launch resumes from
            # Until the resumed run trims them, metrics.jsonl still holds the killed run's lines
            # past `start`: a step counts only once the file has been back at `start`.
            trimmed = _logged_step(work) <= start
            delay = rng.uniform(0.5, 3.0) if kind == "startup" else rng.uniform(3.0, run_time)
            target = start + (rng.randint(1, EVERY + EVERY // 2) if kind == "training" else 1)
            end = time.time() + (delay if kind != "training" else run_time)
            while proc.poll() is None and time.time() < end:  # compile: delay or first step
                logged = _logged_step(work)
                trimmed = trimmed or logged <= start
                if trimmed and logged >= target:
                    break
                time.sleep(0.01)
            caught = bool(_tmp_dirs(work))  # a random kill may land inside a write too
        if proc.poll() is not None:  # the run finished before the kill: nothing left to kill
            break
        reached = _logged_step(work)
        _kill(proc)
        counts["kills"] += 1
        counts["mid_write"] += caught
        _, _, saved = _restore_all(config, work)  # every checkpoint on disk reads back
        lost = max(reached - saved, 0)
        # One interval; a kill inside an asynchronous write also loses the steps trained while
        # that write was in flight (training goes on as Orbax writes).
        assert lost <= EVERY or (caught and lost < 2 * EVERY), (kind, reached, saved)
        counts["steps_lost"] += lost
        counts["max_steps_lost"] = max(counts["max_steps_lost"], lost)
        counts["resumes"] += 1

    _run_to_end(work, tmp_path / "tfds")
    print(f"\ncrash test: {counts}, reference run {run_time:.1f} s")
    assert counts["kills"] == len(plan) and counts["mid_write"] >= 1, counts

    a, a_data, a_step = _restore_all(config, work)
    b, b_data, b_step = _restore_all(config, ref_dir)
    assert a_step == b_step == NUM_STEPS and a_data == b_data
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    losses = lambda d: [
        (r["step"], r["train/loss"])
        for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
        if "train/loss" in r
    ]
    assert losses(work) == losses(ref_dir)  # the metrics read as one uninterrupted run
