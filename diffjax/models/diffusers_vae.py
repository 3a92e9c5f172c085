"""Pretrained weights: a diffusers AutoencoderKL directory (config.json, safetensors) → params."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from diffjax.models.autoencoder import AutoencoderKL, from_diffusers_config
from diffjax.models.layers import ShapeError
from diffjax.models.pretrained import PretrainedError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
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
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PretrainedError(f"{path} is not readable JSON: {err}") from err
    if not isinstance(config, dict) or config.get("_class_name") != CLASS_NAME:
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise PretrainedError(
            f"{path}: _class_name={found!r} is not supported (want {CLASS_NAME!r})"
        )
    for key, want in CONFIG_REQUIRED.items():
        if config.get(key, want) != want:
            raise PretrainedError(f"{path}: {key}={config[key]!r} is not supported (want {want!r})")
    levels = len(config.get("block_out_channels", (64,)))
    for key, want in BLOCK_TYPES.items():
        types = list(config.get(key, [want] * levels))
        if types != [want] * levels:
            raise PretrainedError(
                f"{path}: {key}={types!r} is not supported (want {want!r} at each of the "
                f"{levels} levels of block_out_channels)"
            )
    return {**LATENT_DEFAULTS, **config}


def _weights_file(directory: Path) -> Path:
    file = directory / WEIGHTS_FILE
    if file.is_file():
        return file
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    if any(name.endswith(".safetensors") for name in others):
        raise PretrainedError(f"{file} is missing (the directory has {', '.join(others)})")
    if others:
        raise PretrainedError(
            f"{file} is missing; {', '.join(others)} (pickled PyTorch) is not read, as unpickling "
            "runs code: convert it once with diffusers, "
            "`AutoencoderKL.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`"
        )
    raise PretrainedError(f"{file} is missing")


def checkpoint_name(path: tuple[str, ...]) -> str:
    """The diffusers tensor behind an AutoencoderKL param path.

    An index "_{i}" in a component is diffusers' ".{i}", components join with ".", and kernel /
    scale are "weight": ("encoder", "down_blocks_0_resnets_1", "conv1", "kernel") →
    "encoder.down_blocks.0.resnets.1.conv1.weight"; "to_out_0" → "to_out.0".
    """
    *parts, leaf = path
    index = lambda m: f".{m[1]}." if m[2] else f".{m[1]}"
    parts = [re.sub(r"_(\d+)(_|$)", index, part) for part in parts]
    return ".".join([*parts, "bias" if leaf == "bias" else "weight"])


def _legacy_name(name: str) -> str | None:
    """The pre-0.15 name of a middle-block attention projection's tensor, else None."""
    module, leaf = name.rsplit(".", 1)
    head, found, projection = module.partition("attentions.0.")
    if found and projection in LEGACY_NAMES:
        return f"{head}attentions.0.{LEGACY_NAMES[projection]}.{leaf}"
    return None


def _checkpoint_shape(leaf: str, want: tuple[int, ...]) -> tuple[int, ...]:
    """A param's shape as PyTorch stores it: convs [O, I, H, W], linears [out, in]."""
    if leaf == "kernel" and len(want) == 4:
        return (want[3], want[2], want[0], want[1])
    return want[::-1] if leaf == "kernel" else want


def _convert(
    path: tuple[str, ...],
    tensors: dict[str, np.ndarray],
    want: jax.ShapeDtypeStruct,
    file: Path,
    used: set[str],
) -> jnp.ndarray:
    name = checkpoint_name(path)
    legacy = _legacy_name(name)
    if name not in tensors and legacy in tensors:
        name = legacy
    elif name not in tensors:
        raise PretrainedError(f"{file} lacks tensor {name}")
    value, stored = tensors[name], _checkpoint_shape(path[-1], want.shape)
    if name == legacy and value.shape == (*stored, 1, 1):
        value = value[:, :, 0, 0]  # a 1x1 convolution is a linear map over channels
    if value.shape != stored:
        raise PretrainedError(
            f"{file}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {stored}"
        )
    used.add(name)
    if path[-1] == "kernel":
        # torch convs are [O, I, H, W] and flax's [H, W, I, O]; torch linears [out, in].
        value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    return jnp.asarray(np.asarray(value, np.float32), want.dtype)


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
    if not (directory / CONFIG_FILE).is_file():
        raise PretrainedError(f"{directory / CONFIG_FILE} is missing")
    config = _read_config(directory / CONFIG_FILE)
    file = _weights_file(directory)
    module = from_diffusers_config(config, dtype)
    try:
        image = (1, module.factor, module.factor, module.in_channels)
        image = jax.ShapeDtypeStruct(image, jnp.float32)
        shapes = jax.eval_shape(module.init, jax.random.key(0), image)["params"]
    except ShapeError as err:
        raise PretrainedError(f"{directory / CONFIG_FILE}: {err}") from err
    try:
        tensors = safetensors.numpy.load_file(file)  # bfloat16 too: jax registers ml_dtypes
    except (OSError, safetensors.SafetensorError) as err:
        raise PretrainedError(f"{file} is corrupt or truncated: {err}") from err
    used = set()
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: _convert(tuple(k.key for k in p), tensors, s, file, used), shapes
    )
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise PretrainedError(f"{file}: unexpected tensors {', '.join(unexpected[:5])}{more}")
    return module, params, config
