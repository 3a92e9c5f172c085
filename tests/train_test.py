"""The compiled train step: sharding invariance, a single compilation, config validation."""

import jax
import numpy as np
import pytest

from configs import digits
from diffjax import schedules, sharding, steps, train
from diffjax.models.unet import UNet

MODEL = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
             num_groups=8, dropout=0.1)


def _setup(n_devices):
    mesh = sharding.make_mesh(n_devices)
    model = UNet(**MODEL)
    tx = steps.make_optimizer(1e-3, 2, 0.0, 0.9, 0.999, 1.0)
    shape = (8, 8, 1)
    abstract = steps.abstract_train_state(model, tx, shape, mesh, num_timesteps=100)
    state = steps.create_train_state(model, tx, shape, jax.random.key(0), mesh,
                                     num_timesteps=100)
    step = steps.make_train_step(model, schedules.make_schedule("linear", 100), tx, mesh,
                                 abstract, ema_decay=0.99)
    return mesh, state, step


def _batches(n):
    rng = np.random.default_rng(0)
    return [{"image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
             "label": np.zeros(16, np.int32)} for _ in range(n)]


def _run(n_devices, batches):
    mesh, state, step = _setup(n_devices)
    losses = []
    for b in batches:
        state, metrics = step(state, sharding.global_batch(b, mesh), jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return state, losses, step


def test_eight_devices_match_one_device():
    assert jax.device_count() == 8
    batches = _batches(3)
    s8, l8, step8 = _run(8, batches)
    s1, l1, _ = _run(1, batches)
    # Same global batch, same keys: only the order of floating-point reductions differs.
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(s8.step) == 3
    # The params really live on all 8 devices, replicated; the step compiled exactly once.
    leaf = jax.tree.leaves(s8.params)[0]
    assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated
    assert step8._cache_size() == 1


def test_ema_tracks_params_with_warmup():
    mesh, state, step = _setup(8)
    before = [np.asarray(p) for p in jax.tree.leaves(state.params)]  # the state is donated
    new, _ = step(state, sharding.global_batch(_batches(1)[0], mesh), jax.random.key(1))
    # At step 0 the warm-up decay is min(0.99, 1/10) = 0.1: ema = 0.1·old + 0.9·new params.
    for e, p, o in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(new.params), before,
                       strict=True):
        np.testing.assert_allclose(e, 0.1 * o + 0.9 * np.asarray(p), atol=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("data.image_size", 10, "data.image_size: 10 must be a positive multiple of"),
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
    ("diffusion.loss", "hybrid", "diffusion.loss: 'hybrid' trains the learned variance"),
    ("mesh.data", 9, "mesh.data"),
])
def test_bad_config_values_name_the_field(field, value, match):
    config = digits.get_config()
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ValueError, match=match):
        train.check_config(config)


def test_unknown_config_key_is_rejected():
    config = digits.get_config()
    config.lock()
    with pytest.raises(AttributeError, match="lr_peak"):
        config.optim.lr_peak = 1.0


def test_sampler_steps_above_the_compiled_maximum():
    config = digits.get_config()
    config.sampler.update(steps=500, max_steps=100)
    with pytest.raises(ValueError, match="sampler.max_steps: 100 < sampler.steps=500"):
        train.check_config(config)


def test_digits_configs_are_valid():
    train.check_config(digits.get_config())
    train.check_config(digits.get_config("hybrid"))
    train.check_config(digits.get_config("tiny"))
    with pytest.raises(ValueError, match="unknown variant"):
        digits.get_config("huge")


def test_sample_grids_reuse_one_compiled_sampler(tmp_path):
    config = digits.get_config("tiny")
    setup = train._Setup(config)
    state = steps.create_train_state(setup.model, setup.tx, setup.image_shape, setup.init_key,
                                     setup.mesh, num_timesteps=setup.schedule.num_steps)
    for i in range(2):
        images = train._write_samples(setup, state.ema_params, 20, setup.sample_key,
                                      str(tmp_path / f"grid_{i}.png"))
    assert images.shape == (20, 8, 8, 1) and (tmp_path / "grid_1.png").exists()
    assert setup._sample_fns[16]._cache_size() == 1
