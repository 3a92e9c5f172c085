"""Two JAX processes on localhost form one cluster: train, stop, resume, lose a peer."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import digits
from diffjax import build, checkpoint, data, sharding, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, data_dir, port, *flags):
    """Starts the 2-process cluster, each process with 2 CPU devices (4 in all)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = []
    for i in range(2):
        cmd = [
            sys.executable,
            "-m",
            "diffjax.main",
            "--config",
            f"{ROOT}/configs/digits.py:tiny",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            f"--coordinator=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            "--cpu_devices=2",
            "--heartbeat_timeout_s=10",
            *flags,
        ]
        log = open(os.path.join(str(workdir) + f".p{i}.log"), "w")
        procs.append(
            (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        )
    return procs


def _log(workdir, i) -> str:
    with open(str(workdir) + f".p{i}.log") as f:
        return f.read()


def _wait(procs, timeout=300):
    codes = [p.wait(timeout=timeout) for p, _ in procs]
    for _, log in procs:
        log.close()
    return codes


def _until(predicate, procs, what, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline or any(p.poll() is not None for p, _ in procs):
            for p, _ in procs:
                p.kill()
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.3)


@pytest.mark.slow  # the slow tier: `pytest -m slow`, CI's second step
def test_two_processes_stop_resume_match_one_process_and_fail_fast(tmp_path):
    data_dir, work = tmp_path / "tfds", tmp_path / "cluster"
    # 1. Train until the first metrics line, then SIGTERM process 1 only: both processes agree
    #    to stop at the same step and write one checkpoint together.
    procs = _launch(
        work,
        data_dir,
        _free_port(),
        "--config.train.num_steps=100000",
        "--config.train.checkpoint_every_steps=0",
    )
    metrics = work / "metrics.jsonl"
    _until(lambda: metrics.exists() and metrics.read_text().strip(), procs, "training")
    procs[1][0].send_signal(signal.SIGTERM)
    assert _wait(procs) == [0, 0], _log(work, 0)[-3000:] + _log(work, 1)[-3000:]
    stopped = checkpoint.Checkpointer(str(work / "checkpoints")).latest_step()
    assert stopped is not None and stopped >= 2
    assert "stopped by a signal to another process" in _log(work, 0)

    # 2. Restart: it resumes at the right step and checkpoints every step; once two more steps
    #    are safely written, kill -9 process 1. Process 0 must exit with an error, not hang.
    total = stopped + 2
    procs = _launch(
        work,
        data_dir,
        _free_port(),
        "--config.train.num_steps=100000",
        "--config.train.checkpoint_every_steps=1",
    )
    _until(lambda: (work / "checkpoints" / str(total + 1)).exists(), procs, "resumed steps")
    procs[1][0].kill()
    t0 = time.time()
    code = procs[0][0].wait(timeout=120)
    _wait(procs)
    assert code != 0 and time.time() - t0 < 60
    assert f"resumed from step {stopped}" in _log(work, 0)
    assert "another task died" in _log(work, 0)

    # 3. The cluster's step-`total` state equals one process (8 devices) trained `total` steps
    #    from scratch on the same global batches: process 0's shard then process 1's.
    config = digits.get_config("tiny")
    config.data.data_dir = str(data_dir)
    setup = build.Setup(config)
    d = config.data
    iters = [
        data.make_train_iterator(
            build.open_split(config, "train"),
            image_size=d.image_size,
            channels=d.channels,
            global_batch=16,
            seed=config.seed,
            random_flip=False,
            process_index=i,
            process_count=2,
        )
        for i in range(2)
    ]
    state = setup.create_state()
    # The trainer's own step for this config (its loss weighting, t sampling, EMA), so the
    # comparison follows the config rather than restating it.
    step = tasks.diffusion(setup).train_step
    for _ in range(total):
        parts = [next(it) for it in iters]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        state, _ = step(state, sharding.global_batch(batch, setup.mesh), setup.train_key, None)
    ckpt = checkpoint.Checkpointer(str(work / "checkpoints"))
    cluster = ckpt.restore(setup.abstract_state, total)[0]
    ckpt.close()
    assert int(cluster.step) == total
    for a, b in zip(jax.tree.leaves(cluster.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
