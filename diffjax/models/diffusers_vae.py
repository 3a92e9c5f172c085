"""Pretrained weights: a diffusers AutoencoderKL directory (config.json, safetensors) → params."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import diffusers_io as io
from diffjax.models.autoencoder import AutoencoderKL, from_diffusers_config
from diffjax.models.layers import ShapeError
from diffjax.models.pretrained import PretrainedError

CLASS_NAME = "AutoencoderKL"
# Settings AutoencoderKL implements (diffusers' defaults); a config asking for another is
# refused, not misread. The block types are checked per level.
CONFIG_REQUIRED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True}
BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
# Latent normalisation, z = scaling_factor · (x_latent − shift_factor): not weights, so handed
# back in the config, with diffusers' defaults where config.json leaves them out.
LATENT_DEFAULTS = {"scaling_factor": 0.18215, "shift_factor": None}
# Diffusers before 0.15 named the middle blocks' attention projections differently (and some
# checkpoints store them as 1x1 convolutions, [C, C, 1, 1]).
LEGACY_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _read_config(path: Path) -> dict[str, Any]:
    config = io.read_json(path, (CLASS_NAME,))
    io.check_settings(path, config, CONFIG_REQUIRED)
    levels = len(config.get("block_out_channels", (64,)))
    for key, want in BLOCK_TYPES.items():
        types = list(config.get(key, [want] * levels))
        if types != [want] * levels:
            raise PretrainedError(
                f"{path}: {key}={types!r} is not supported (want {want!r} at each of the "
                f"{levels} levels of block_out_channels)"
            )
    return {**LATENT_DEFAULTS, **config}


def _legacy_name(name: str) -> str | None:
    """The pre-0.15 name of a middle-block attention projection's tensor, else None."""
    module, leaf = name.rsplit(".", 1)
    head, found, projection = module.partition("attentions.0.")
    if found and projection in LEGACY_NAMES:
        return f"{head}attentions.0.{LEGACY_NAMES[projection]}.{leaf}"
    return None


def _convert(
    path: tuple[str, ...], reader: io.TensorReader, want: jax.ShapeDtypeStruct
) -> jnp.ndarray:
    name, stored = io.checkpoint_name(path), io.torch_shape(path[-1], want.shape)
    legacy = _legacy_name(name)
    if name not in reader.names and legacy in reader.names:
        name = legacy
        if reader.shape_of(name) == (*stored, 1, 1):  # a 1x1 convolution: a linear map
            value = reader.get(name, (*stored, 1, 1))[:, :, 0, 0]
            return jnp.asarray(io.to_flax(value, path[-1]), want.dtype)
    value = reader.get(name, stored)
    return jnp.asarray(io.to_flax(value, path[-1]), want.dtype)


def load_autoencoder_kl(
    directory: str | Path, dtype: Any = jnp.float32
) -> tuple[AutoencoderKL, dict, dict[str, Any]]:
    """Loads a diffusers `AutoencoderKL` (e.g. Stable Diffusion's VAE) as an AutoencoderKL.

    Args:
      directory: holds config.json and diffusion_pytorch_model.safetensors, as diffusers'
        `save_pretrained(..., safe_serialization=True)` writes them (the `vae/` folder of a
        Stable Diffusion pipeline).
      dtype: the module's compute dtype; params keep the module's param_dtype (float32).

    Returns:
      (module, params, config): params is the nested dict `module.apply` takes as
      {"params": params}; config is config.json's content, with `scaling_factor` (0.18215 when
      absent) and `shift_factor` (None when absent) for scaling latents.

    Raises:
      PretrainedError: the directory or a file is missing or unreadable, the config asks for
        an architecture AutoencoderKL does not implement, or a tensor is missing, unexpected or
        of the wrong shape; the message names the file, setting or tensor.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PretrainedError(f"AutoencoderKL directory {directory} does not exist")
    config = _read_config(directory / io.CONFIG_FILE)
    file = io.weights_file(directory, CLASS_NAME)
    module = from_diffusers_config(config, dtype)
    try:
        image = (1, module.factor, module.factor, module.in_channels)
        image = jax.ShapeDtypeStruct(image, jnp.float32)
        shapes = jax.eval_shape(module.init, jax.random.key(0), image)["params"]
    except ShapeError as err:
        raise PretrainedError(f"{directory / io.CONFIG_FILE}: {err}") from err
    with io.TensorReader(file) as reader:
        params = jax.tree_util.tree_map_with_path(
            lambda p, s: _convert(tuple(k.key for k in p), reader, s), shapes
        )
        reader.check_all_used()
    return module, params, config


def save(directory: str | Path, module: AutoencoderKL, params: dict) -> None:
    """Writes an AutoencoderKL and its params as a diffusers `AutoencoderKL` folder (float32).

    The latent scale is not the autoencoder's own (diffjax estimates it per latent run, which
    keeps it in its checkpoint), so config.json leaves `scaling_factor` at diffusers' default:
    set it to the latent run's scale before using the folder as a pipeline's vae/.
    """
    levels = len(module.block_out_channels)
    config = {
        "_class_name": CLASS_NAME,
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "block_out_channels": list(module.block_out_channels),
        "layers_per_block": module.layers_per_block,
        "latent_channels": module.latent_channels,
        "norm_num_groups": module.num_groups,
        "mid_block_add_attention": module.mid_attention,
        "down_block_types": [BLOCK_TYPES["down_block_types"]] * levels,
        "up_block_types": [BLOCK_TYPES["up_block_types"]] * levels,
        **CONFIG_REQUIRED,
    }
    tensors = {}
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        path = tuple(k.key for k in path)
        value = np.asarray(jax.device_get(value), np.float32)
        tensors[io.checkpoint_name(path)] = io.to_torch(value, path[-1])
    io.write_model(Path(directory), config, tensors)
