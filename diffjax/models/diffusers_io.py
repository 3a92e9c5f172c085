"""diffusers model directories (config.json + safetensors), read and written tensor by tensor."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors.numpy

from diffjax.models.pretrained import PretrainedError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def read_json(path: Path, class_names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A diffusers JSON file (config.json, scheduler_config.json, model_index.json) as a dict;
    with `class_names`, its `_class_name` must be one of them."""
    if not path.is_file():
        raise PretrainedError(f"{path} is missing")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PretrainedError(f"{path} is not readable JSON: {err}") from err
    if not isinstance(config, dict):
        raise PretrainedError(f"{path} holds a {type(config).__name__}, not a JSON object")
    if class_names is not None and config.get("_class_name") not in class_names:
        want = " or ".join(repr(c) for c in class_names)
        raise PretrainedError(
            f"{path}: _class_name={config.get('_class_name')!r} is not supported (want {want})"
        )
    return config


def check_settings(path: Path, config: dict, required: dict[str, Any]) -> None:
    """Refuses, by name, a setting whose value the diffjax network does not implement (a key
    that config.json leaves out has diffusers' default, the value in `required`)."""
    for key, want in required.items():
        if config.get(key, want) != want:
            raise PretrainedError(f"{path}: {key}={config[key]!r} is not supported (want {want!r})")


def weights_file(directory: Path, class_name: str) -> Path:
    """`directory`'s safetensors weights; pickled PyTorch files are refused, with the command
    that converts them."""
    file = directory / WEIGHTS_FILE
    if file.is_file():
        return file
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    if any(name.endswith(".safetensors") for name in others):
        raise PretrainedError(f"{file} is missing (the directory has {', '.join(others)})")
    if others:
        raise PretrainedError(
            f"{file} is missing; {', '.join(others)} (pickled PyTorch) is not read, as unpickling "
            f"runs code: convert it once with diffusers, `{class_name}.from_pretrained(dir)"
            ".save_pretrained(dir, safe_serialization=True)`"
        )
    raise PretrainedError(f"{file} is missing")


def torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A flax param's shape as PyTorch stores it: convs [O, I, H, W], linears [out, in]."""
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1] if leaf == "kernel" else shape


def to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
    """torch layout → flax: convs [O, I, H, W] → [H, W, I, O], linears [out, in] → [in, out]."""
    if leaf != "kernel":
        return value
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def to_torch(value: np.ndarray, leaf: str) -> np.ndarray:
    """The inverse of `to_flax`."""
    if leaf != "kernel":
        return value
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T


def checkpoint_name(path: tuple[str, ...]) -> str:
    """The PyTorch tensor behind a param path of a module named after PyTorch's layout.

    An index "_{i}" in a component is PyTorch's ".{i}", components join with ".", and every
    leaf but "bias" (kernel, scale, embedding) is "weight": ("encoder", "down_blocks_0_resnets_1",
    "conv1", "kernel") → "encoder.down_blocks.0.resnets.1.conv1.weight"; "to_out_0" → "to_out.0".
    """
    *parts, leaf = path
    index = lambda m: f".{m[1]}." if m[2] else f".{m[1]}"
    parts = [re.sub(r"_(\d+)(_|$)", index, part) for part in parts]
    return ".".join([*parts, torch_name(leaf)])


def torch_name(leaf: str) -> str:
    return "bias" if leaf == "bias" else "weight"


# safetensors dtype names → numpy (bfloat16 from ml_dtypes, which jax depends on).
DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class TensorReader:
    """Reads named tensors from one safetensors file, one at a time, with plain file reads: a
    model never needs more host memory than its loaded params plus one tensor (a memory map
    would add every page it touched). Remembers which were read, to refuse a file with tensors
    the network has no place for.

    The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the tensors' bytes (row-major, little-endian).
    """

    def __init__(self, file: Path):
        self.file = file
        try:
            self._f = open(file, "rb")  # closed by `close` or the with block
            size = os.fstat(self._f.fileno()).st_size
            (length,) = struct.unpack("<Q", self._f.read(8))
            if length > size - 8:
                raise ValueError(f"its header claims {length} bytes, the file has {size}")
            header = json.loads(self._f.read(length))
            header.pop("__metadata__", None)
            self._start = 8 + length
            self._entries = {k: self._entry(k, v, size - self._start) for k, v in header.items()}
        except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
            raise PretrainedError(f"{file} is corrupt or truncated: {err}") from err
        self.names = set(self._entries)
        self.used: set[str] = set()

    @staticmethod
    def _entry(name: str, info: dict, data_size: int) -> tuple[Any, tuple[int, ...], int]:
        dtype, shape = np.dtype(DTYPES[info["dtype"]]), tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name}'s bytes [{begin}, {end}) do not fit {shape} {dtype}")
        return dtype, shape, begin

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def shape_of(self, name: str) -> tuple[int, ...] | None:
        """Tensor `name`'s stored shape, from the header (None if there is no such tensor)."""
        return self._entries[name][1] if name in self._entries else None

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name` as float32, which must have `shape` (PyTorch's layout)."""
        if name not in self.names:
            raise PretrainedError(f"{self.file} lacks tensor {name}")
        dtype, stored, begin = self._entries[name]
        if stored != tuple(shape):
            raise PretrainedError(
                f"{self.file}: tensor {name} has shape {stored}, expected {tuple(shape)}"
            )
        value = np.empty(stored, dtype.newbyteorder("<"))
        self._f.seek(self._start + begin)
        if self._f.readinto(value.reshape(-1).view(np.uint8)) != value.nbytes:
            raise PretrainedError(f"{self.file} is truncated inside tensor {name}")
        self.used.add(name)
        return value.astype(np.float32, copy=False)

    def check_all_used(self) -> None:
        unexpected = sorted(self.names - self.used)
        if unexpected:
            more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
            raise PretrainedError(
                f"{self.file}: unexpected tensors {', '.join(unexpected[:5])}{more}"
            )


def write_model(
    directory: Path,
    config: dict[str, Any],
    tensors: dict[str, np.ndarray],
    weights_name: str = WEIGHTS_FILE,
) -> None:
    """Writes config.json and the safetensors weights as diffusers' `save_pretrained` does; each
    file is written beside its final name and renamed, so a crash leaves no half-written file."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    tmp = directory / (weights_name + ".tmp")
    safetensors.numpy.save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / weights_name)
    write_json(directory / CONFIG_FILE, config)


def write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
