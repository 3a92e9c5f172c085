"""The compiled train step: sharding invariance, a single compilation, config validation, the
bound on steps in flight."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT

from configs import digits
from diffjax import build, config_check, infer, schedules, sharding, steps, train_state
from diffjax.models.unet import UNet

MODEL = dict(
    base_channels=32,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_groups=8,
    dropout=0.1,
)


def _setup(data, fsdp=1, *, grad_accum_steps=1, **model_kw):
    mesh = sharding.make_mesh(data, fsdp)
    model = UNet(**{**MODEL, **model_kw})
    tx = train_state.make_optimizer(1e-3, 2, 0.0, 0.9, 0.999, 1.0)
    shape = (8, 8, 1)
    abstract = train_state.abstract_train_state(model, tx, shape, mesh, num_timesteps=100)
    state = train_state.create_train_state(
        model, tx, shape, jax.random.key(0), mesh, num_timesteps=100
    )
    step = steps.make_train_step(
        model,
        schedules.make_schedule("linear", 100),
        tx,
        mesh,
        abstract,
        ema_decay=0.99,
        grad_accum_steps=grad_accum_steps,
    )
    return mesh, state, step


def _batches(n):
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
            "label": np.zeros(16, np.int32),
        }
        for _ in range(n)
    ]


def _run(data, fsdp=1, n_batches=3, **kw):
    mesh, state, step = _setup(data, fsdp, **kw)
    losses = []
    for b in _batches(n_batches):
        state, metrics = step(state, sharding.global_batch(b, mesh), jax.random.key(1), None)
        losses.append(float(metrics["loss"]))
    return state, losses, step


@pytest.fixture(scope="module")
def one_device():
    return _run(1)


def _assert_same_run(a, b, rtol=1e-4):
    (sa, la, _), (sb, lb, _) = a, b
    np.testing.assert_allclose(la, lb, rtol=rtol)
    for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6)


def _bytes_per_device(tree) -> float:
    """The largest per-device share of the tree's bytes, as a fraction of the whole."""
    total = sum(x.nbytes for x in jax.tree.leaves(tree))
    per_device = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values()) / total


# (4, 2) exercises both axes in the fast tier; the pure layouts run in the slow tier.
@pytest.mark.parametrize(
    "data,fsdp",
    [
        pytest.param(8, 1, marks=pytest.mark.slow),
        (4, 2),
        pytest.param(1, 8, marks=pytest.mark.slow),
    ],
)
def test_every_mesh_layout_matches_one_device(data, fsdp, one_device, compiles):
    assert jax.device_count() == 8
    run = _run(data, fsdp)
    # Same global batch, same keys: only the order of floating-point reductions differs.
    _assert_same_run(run, one_device)
    state, _, step = run
    assert int(state.step) == 3
    batch = sharding.global_batch(_batches(1)[0], sharding.make_mesh(data, fsdp))
    with compiles.none_expected("a fourth train step"):
        state, _ = step(state, batch, jax.random.key(1), None)
    leaf = jax.tree.leaves(state.params)[0]
    assert len(leaf.sharding.device_set) == 8
    if fsdp == 1:
        assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
    else:
        # Parameters, both Adam moments and the EMA are split: each device holds about 1/fsdp
        # (small tensors such as biases and norms stay replicated, hence the margin).
        for part in (state.params, state.opt_state, state.ema_params):
            assert _bytes_per_device(part) < 1.2 / fsdp, _bytes_per_device(part)


@pytest.mark.slow  # the slow tier: `pytest -m slow`, CI's second step
def test_gradient_accumulation_equals_the_whole_batch(one_device):
    # Dropout draws its masks per microbatch, so compare without it.
    whole = _run(8, dropout=0.0)
    _assert_same_run(_run(8, grad_accum_steps=4, dropout=0.0), whole)
    _assert_same_run(_run(2, 4, grad_accum_steps=2, dropout=0.0), whole)


def test_remat_does_not_change_the_training(one_device):
    _assert_same_run(_run(1, remat=True), one_device, rtol=1e-5)


def test_bfloat16_compute_trains_with_float32_state():
    state, losses, _ = _run(8, dtype=jax.numpy.bfloat16)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] * 1.5
    assert all(
        x.dtype == np.float32
        for x in jax.tree.leaves((state.params, state.opt_state, state.ema_params))
        if np.issubdtype(x.dtype, np.floating)
    )


def test_ema_tracks_params_with_warmup():
    mesh, state, step = _setup(8)
    before = [np.asarray(p) for p in jax.tree.leaves(state.params)]  # the state is donated
    new, _ = step(state, sharding.global_batch(_batches(1)[0], mesh), jax.random.key(1), None)
    # At step 0 the warm-up decay is min(0.99, 1/10) = 0.1: ema = 0.1·old + 0.9·new params.
    for e, p, o in zip(
        jax.tree.leaves(new.ema_params), jax.tree.leaves(new.params), before, strict=True
    ):
        np.testing.assert_allclose(e, 0.1 * o + 0.9 * np.asarray(p), atol=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("final", [0.0, 0.1])
def test_learning_rate_schedules_closed_form(schedule, final):
    lr, warmup, total = 3e-3, 100, 2200
    rate = train_state.learning_rate(lr, warmup, schedule, total, final)
    steps_ = np.array([0, 37, 100, 640, 1150, 1900, 2199, 2200, 2600])
    progress = np.clip((steps_ - warmup) / (total - warmup), 0.0, 1.0)  # of the decay
    after = {
        "constant": np.ones_like(progress),
        "cosine": final + (1 - final) * 0.5 * (1 + np.cos(np.pi * progress)),
        "linear": 1 - (1 - final) * progress,
    }[schedule]
    want = lr * np.where(steps_ < warmup, steps_ / warmup, after)
    got = np.array([float(rate(s)) for s in steps_])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("data.image_size", 10, "data.image_size: 10x10 must be a positive multiple of"),
        ("train.batch_size", 12, "train.batch_size: 12 must be a positive multiple of the 8"),
        ("diffusion.schedule", "cosin", "diffusion.schedule: unknown 'cosin'"),
        ("diffusion.target", "score", "diffusion.target"),
        ("model.attention_resolutions", (3,), "model.attention_resolutions"),
        ("model.num_groups", 5, "model.num_groups"),
        ("sampler.variance", "big", "sampler.variance"),
        ("sampler.name", "euler", "sampler.name: unknown 'euler'"),
        ("sampler.steps", 2000, r"sampler.steps: 2000 must be in \[1, diffusion.num_steps=1000\]"),
        ("sampler.spacing", "log", "sampler.spacing"),
        ("sampler.eta", 1.5, "sampler.eta"),
        ("sampler.dynamic_threshold", 1.5, "sampler.dynamic_threshold"),
        ("diffusion.loss", "kl", "diffusion.loss: unknown 'kl'"),
        ("diffusion.t_sampling", "importance", "diffusion.t_sampling: importance sampling"),
        ("diffusion.zero_terminal_snr", True, "diffusion.zero_terminal_snr: ε-prediction"),
        ("diffusion.snr_scale", 0.0, "diffusion.snr_scale: must be a positive number"),
        ("diffusion.snr_scale", float("nan"), "diffusion.snr_scale: must be a positive number"),
        ("diffusion.loss", "hybrid", "diffusion.loss: 'hybrid' trains the learned variance"),
        ("diffusion.learned_variance", True, "diffusion.learned_variance: L_simple never trains"),
        ("train.num_samples", 0, "train.num_samples"),
        ("data.resize", "lanczos", "data.resize: unknown 'lanczos'"),
        ("model.patch_size", 3, "data.image_size: 16x16 must be a positive multiple of patch"),
        ("mesh.data", 9, "mesh.data"),
        ("mesh.fsdp", 3, "mesh.fsdp: 3 must be >= 1 and divide the 8 devices"),
        ("train.grad_accum_steps", 3, "train.grad_accum_steps: 3 microbatches"),
        ("optim.lr_schedule", "step", "optim.lr_schedule: unknown 'step'.*'linear'"),
        ("optim.final_lr_ratio", 1.5, "optim.final_lr_ratio: must be in"),
    ],
)
def test_bad_config_values_name_the_field(field, value, match):
    config = digits.get_config()
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(config_check.ConfigError, match=match):
        build.Setup(config)  # the config's rules, then the network's shape rules


def test_unknown_config_key_is_rejected():
    config = digits.get_config()
    config.lock()
    with pytest.raises(AttributeError, match="lr_peak"):
        config.optim.lr_peak = 1.0


def test_sampler_steps_above_the_compiled_maximum():
    config = digits.get_config()
    config.sampler.update(steps=500, max_steps=100)
    with pytest.raises(ValueError, match="sampler.max_steps: 100 < sampler.steps=500"):
        config_check.check_config(config)


def test_digits_configs_are_valid():
    config_check.check_config(digits.get_config())
    config_check.check_config(digits.get_config("hybrid"))
    config_check.check_config(digits.get_config("tiny"))
    with pytest.raises(ValueError, match="unknown variant"):
        digits.get_config("huge")


def test_sample_grids_reuse_one_compiled_sampler(tmp_path, compiles):
    config = digits.get_config("tiny")
    setup = build.Setup(config)
    state = setup.create_state()
    grid = lambda i: infer.write_samples(
        setup, state.ema_params, 20, setup.sample_key, str(tmp_path / f"grid_{i}.png")
    )
    grid(0)
    with compiles.none_expected("the second grid"):
        images = grid(1)
    assert images.shape == (20, 8, 8, 1) and (tmp_path / "grid_1.png").exists()


# A cheap step with an all-reduce over 8 CPU devices, dispatched 600 times. Without a bound
# the host runs hundreds of steps ahead and XLA:CPU (jax 0.10) deadlocks once more than 32 are
# queued on a device: the all-reduce waits, then the process aborts (here after 10 s, not 40).
_DISPATCH = """
import os, sys
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
    "--xla_cpu_collective_call_terminate_timeout_seconds=10 "
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=5")
import jax, jax.numpy as jnp
from diffjax import sharding, steps
mesh = sharding.make_mesh(-1, 1)
rep, split = sharding.replicated(mesh), sharding.batch_sharded(mesh)
def step(w, x):
    g = jax.grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w)
    return w - 0.01 * g, jnp.mean(x @ w)
f = jax.jit(step, in_shardings=(rep, split), out_shardings=(rep, rep), donate_argnums=0)
w, x = jax.device_put(jnp.eye(32), rep), jax.device_put(jnp.ones((64, 32)), split)
in_flight = steps.InFlight(int(sys.argv[1]))
for _ in range(600):
    w, out = f(w, x)
    in_flight.add(out)
print("done", float(out))
"""


def test_in_flight_bounds_the_queue_xla_cpu_would_deadlock_on():
    # Depth 4, as the training loop uses. Checked by hand that the test can fail: the same
    # script with depth 10**6 (no bound) aborts on jax 0.10.
    r = subprocess.run(
        [sys.executable, "-c", _DISPATCH, "4"], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]
    with pytest.raises(ValueError, match="depth"):
        steps.InFlight(0)
