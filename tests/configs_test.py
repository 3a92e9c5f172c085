"""Every shipped config, with each variant it declares, passes the config checks, and its
network takes the shapes its data and conditions give (no dataset, no training)."""

import importlib
import os

import jax
import pytest

from diffjax import build, config_check

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
NAMES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "default.py")


def _variants(module) -> tuple:
    if hasattr(module, "VARIANTS"):
        return module.VARIANTS
    variants = [""]
    for arg in ("tiny", "hybrid", "class", "text"):  # the names the configs use
        try:
            module.get_config(arg)
        except ValueError:
            continue
        variants.append(arg)
    return tuple(variants)


@pytest.mark.parametrize("name", NAMES)
def test_every_config_and_variant_checks_and_shapes(name):
    module = importlib.import_module(f"configs.{name}")
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("no_such_variant")
    for arg in _variants(module):
        config = module.get_config(arg or None)
        config_check.check_config(config)
        if config.latent.autoencoder_workdir or config.latent.diffusers_vae:
            continue  # the latent shapes need the trained autoencoder (latent_test.py)
        model = build.model(config)
        cond = build.conditioner(config).example(2)
        size, c = config.data.image_size, config.data.channels
        x = jax.ShapeDtypeStruct((2, size, size, c), "float32")
        if config.task == "autoencoder":
            continue  # its shapes: autoencoder_test.py
        t = jax.ShapeDtypeStruct((2,), "int32")
        variables = jax.eval_shape(
            lambda x, t, cond, model=model: model.init(jax.random.key(0), x, t, cond), x, t, cond
        )
        assert variables["params"], (name, arg)
