"""End to end through the real CLI: train, SIGTERM, resume in a new process, sample, eval."""

import json
import logging
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, cli

from configs import digits
from diffjax import build, checkpoint, config_check, infer, train


def _config(data_dir, **train_overrides):
    config = digits.get_config("tiny")
    config.data.data_dir = str(data_dir)
    config.train.update(train_overrides)
    return config


def _cli(workdir, data_dir, *flags):
    return cli("digits.py:tiny", workdir, data_dir, *flags)


def _restore(config, workdir, step=None):
    setup = build.Setup(config)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.restore(setup.abstract_state, step)
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.mark.slow  # the slow tier: `pytest -m slow`, CI's second step
def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path, data_dir):
    """SIGTERM mid-run, resume in a new process: bit-identical to an uninterrupted run."""
    work = tmp_path / "interrupted"
    proc = subprocess.Popen(
        _cli(
            work,
            data_dir,
            "--config.train.num_steps=100000",
            "--config.train.checkpoint_every_steps=0",
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = work / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by signal" in out
    stopped = checkpoint.Checkpointer(str(work / "checkpoints")).latest_step()
    assert stopped is not None and stopped >= 4

    total = stopped + 3
    res = subprocess.run(
        _cli(work, data_dir, f"--config.train.num_steps={total}"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from step {stopped}" in res.stderr

    fresh = tmp_path / "fresh"
    config = _config(data_dir, num_steps=total)
    train.train_and_evaluate(config, str(fresh))
    a, a_data, a_step = _restore(config, str(work))
    b, b_data, b_step = _restore(config, str(fresh))
    assert a_step == b_step == total and a_data == b_data
    # Same programs, same keys (fold_in(key, step)), same batches: bit-identical on CPU.
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # Sample and eval from the resumed run.
    path = infer.sample(config, str(work), num_samples=20)
    images = np.load(path.replace(".png", ".npz"))["images"]
    assert images.shape == (20, 8, 8, 1) and np.abs(images).max() <= 1.0
    result = infer.evaluate(config, str(work))
    assert result["eval/examples"] == 296 and np.isfinite(result["eval/loss"])
    # The bound: its parts add up (an untrained 9-step model's bound is loose: hundreds of bits).
    parts = result["eval/bpd_prior"] + result["eval/bpd_decoder"] + result["eval/bpd_kl"]
    np.testing.assert_allclose(result["eval/bpd"], parts, rtol=1e-5)
    assert np.isfinite(result["eval/bpd"]) and result["eval/bpd_prior"] > 0
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in x for x in lines) and any("train/loss" in x for x in lines)
    assert (work / "samples" / f"step_{total:07d}.png").exists()
    assert list((work / "tensorboard").iterdir())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
    config = _config(data_dir, num_steps=6, checkpoint_every_steps=1, log_every_steps=1)
    config.optim.update(lr=1e30, warmup_steps=0, grad_clip=0.0)
    with pytest.raises(train.NonFiniteLossError, match=r"at step (\d+).*last good checkpoint"):
        train.train_and_evaluate(config, str(tmp_path))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    steps = ckpt.all_steps()
    assert steps, "the finite first step should have been checkpointed"
    state, _, step = _restore(config, str(tmp_path))
    assert step == steps[-1]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    # Resumed with another network: refused, and the run's config.json and checkpoints stay.
    before = (tmp_path / "config.json").read_text()
    config.model.base_channels = 64
    with pytest.raises(checkpoint.CheckpointError, match="config probably differs"):
        train.train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == before
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == steps


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(tmp_path, data_dir, caplog):
    caplog.set_level(logging.INFO, logger="diffjax")
    config = _config(data_dir, num_steps=4, checkpoint_every_steps=2)
    train.train_and_evaluate(config, str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4]
    for f in (ckpts / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f):
            f.write_bytes(b"\0garbage")
    _, _, step = _restore(config, str(tmp_path))
    assert step == 2
    assert "step 4" in caplog.text and "cannot be restored" in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint for step 7"):
        _restore(config, str(tmp_path), 7)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        _restore(config, str(tmp_path / "empty"))

    # Training on: the unreadable step 4 is moved aside (kept), then written again.
    caplog.clear()
    train.train_and_evaluate(
        _config(data_dir, num_steps=6, checkpoint_every_steps=2), str(tmp_path)
    )
    assert "moved the unreadable checkpoint of step 4 aside" in caplog.text
    assert [p.name for p in ckpts.iterdir() if p.name.startswith("4.corrupt-")]
    assert checkpoint.Checkpointer(str(ckpts)).all_steps() == [2, 4, 6]
    for s in (4, 6):
        assert _restore(config, str(tmp_path), s)[2] == s

    # At or past train.num_steps: said, nothing trained, no new grid.
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    for num_steps in (6, 5):
        caplog.clear()
        state = train.train_and_evaluate(_config(data_dir, num_steps=num_steps), str(tmp_path))
        assert int(state.step) == 6 and "already at step 6" in caplog.text
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == grids

    # Another global batch size: the stream goes on at the next example.
    caplog.clear()
    train.train_and_evaluate(_config(data_dir, num_steps=8, batch_size=8), str(tmp_path))
    assert "train.batch_size changed from 16 to 8" in caplog.text
    _, data_state, step = _restore(config, str(tmp_path))
    assert step == 8 and data_state["train_iter"]["next_example"] == 6 * 16 + 2 * 8


@pytest.mark.slow
def test_init_from_starts_a_fresh_run_from_another_runs_ema(tmp_path, data_dir):
    source = str(tmp_path / "source")
    train.train_and_evaluate(_config(data_dir, num_steps=4, checkpoint_every_steps=0), source)
    ema = _restore(_config(data_dir), source)[0].ema_params
    # One step at the warm-up's zero rate: the fine-tuned run's parameters are the source's EMA.
    config = _config(data_dir, num_steps=1, checkpoint_every_steps=0, init_from=source)
    config.optim.warmup_steps = 10
    state = train.train_and_evaluate(config, str(tmp_path / "tuned"))
    assert int(state.step) == 1
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ema), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    _, data_state, _ = _restore(_config(data_dir), str(tmp_path / "tuned"))
    assert data_state["train_iter"]["next_example"] == 16  # its own stream, from the start

    config.train.init_from = str(tmp_path / "nothing")
    with pytest.raises(config_check.ConfigError, match="init_from: .*no checkpoints/ folder"):
        train.train_and_evaluate(config, str(tmp_path / "other"))
    config.train.init_from = str(tmp_path / "other")
    with pytest.raises(config_check.ConfigError, match="this run's own --workdir"):
        train.train_and_evaluate(config, str(tmp_path / "other"))
    config.train.init_from = source
    config.model.base_channels = 64  # another network than the source's: named, nothing read
    with pytest.raises(config_check.ConfigError, match="model.base_channels is 64 here, 32 there"):
        train.train_and_evaluate(config, str(tmp_path / "wider"))


def test_another_diffusion_process_is_refused_on_resume_and_sample(tmp_path, data_dir):
    """A run's checkpoints restore under any schedule without an error, so a config whose
    diffusion process differs from the run's config.json is refused, naming the field and the
    flag that fixes it, before anything is read or written."""
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(_config(data_dir, num_steps=2, checkpoint_every_steps=0), workdir)
    stored = (tmp_path / "run" / "config.json").read_text()
    other = _config(data_dir, num_steps=4, checkpoint_every_steps=0)
    other.diffusion.schedule = "cosine"
    words = "schedule is 'cosine' here, 'linear' there.*--config.diffusion.schedule=linear"
    with pytest.raises(config_check.ConfigError, match=words):
        train.train_and_evaluate(other, workdir)
    with pytest.raises(config_check.ConfigError, match=words):
        infer.load_ema(other, workdir)
    assert (tmp_path / "run" / "config.json").read_text() == stored
    assert _restore(_config(data_dir), workdir)[2] == 2  # the run's own config still reads it
    # A config.json from before a field existed does not hold it: nothing to compare.
    old = json.loads(stored)
    del old["diffusion"]["zero_terminal_snr"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(old))
    other.diffusion.update(schedule="linear", zero_terminal_snr=True, target="v")
    with pytest.raises(config_check.ConfigError, match="diffusion.target is 'v' here, 'eps'") as e:
        infer.load_ema(other, workdir)
    assert "zero_terminal_snr" not in str(e.value)
    # ... except a field whose absence says what the run used: it predates snr_scale, so 1.
    other.diffusion.update(zero_terminal_snr=False, target="eps", snr_scale=0.5)
    with pytest.raises(config_check.ConfigError, match="snr_scale is 0.5 here, 1.0 there"):
        infer.load_ema(other, workdir)


def test_cli_rejects_bad_config_before_compiling(tmp_path, data_dir):
    res = subprocess.run(
        _cli(tmp_path, data_dir, "--config.data.image_size=7"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "config.data.image_size: 7" in res.stderr
    res = subprocess.run(
        _cli(tmp_path, data_dir, "--config.optim.learning_rate=1"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "learning_rate" in res.stderr
    res = subprocess.run(
        _cli(tmp_path, data_dir, "--config.data.name=no_such_dataset"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "no_such_dataset" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.slow
def test_hybrid_loss_with_importance_sampling_then_fast_sampling_from_the_cli(tmp_path, data_dir):
    """Learned variances + the hybrid loss + importance-sampled t: the per-t history is part of
    the checkpoint; then --mode=sample with DPM-Solver++ at 5 steps, set on the command line."""
    config = _config(data_dir, num_steps=4, checkpoint_every_steps=2)
    config.diffusion.update(learned_variance=True, loss="hybrid", t_sampling="importance")
    train.train_and_evaluate(config, str(tmp_path))
    state, _, step = _restore(config, str(tmp_path))
    assert step == 4 and int(state.loss_history.count.sum()) == 4 * 16
    seen = np.asarray(state.loss_history.count) > 0
    assert np.all(np.asarray(state.loss_history.values)[seen, 0] > 0)  # VLB terms were recorded
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["train/vlb_bpd"]) for x in lines if "train/vlb_bpd" in x)

    flags = [
        "--mode=sample",
        "--num_samples=8",
        "--config.diffusion.learned_variance=True",
        "--config.diffusion.loss=hybrid",
        "--config.sampler.name=dpm_solver_pp",
        "--config.sampler.steps=5",
        "--config.sampler.spacing=trailing",
    ]
    res = subprocess.run(
        _cli(tmp_path, data_dir, *flags), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    images = np.load(tmp_path / "samples" / "sample_0000004.npz")["images"]
    assert images.shape == (8, 8, 8, 1) and np.isfinite(images).all()
    assert "dpm_solver_pp" in res.stderr  # the progress bar names the sampler
