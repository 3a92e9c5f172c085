"""The frozen autoencoder of a latent diffusion run: where it comes from, its fingerprint, the
latent scale, and the cache of the encoded training set."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models.autoencoder import AutoencoderKL

Array = jnp.ndarray

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"  # in every training run's workdir: the run's whole config
CACHE_VERSION = 1


class LatentError(ValueError):
    """The autoencoder a latent config names is missing, or does not fit the run."""


@dataclasses.dataclass
class Codec:
    """A frozen autoencoder: module, parameters (host or device), and what identifies them.

    Attributes:
      module: the `AutoencoderKL`.
      params: its parameters.
      origin: where they came from (for messages): a workdir and step, or a diffusers directory.
      scale: the latent scale the autoencoder ships with (diffusers' `scaling_factor`), or None.
    """

    module: AutoencoderKL
    params: Any
    origin: str
    scale: float | None = None

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the architecture and every parameter's bytes: the cache's and the
        checkpoint's key (a retrained or swapped autoencoder has another)."""
        h = hashlib.sha256(repr(self.module).encode())
        for path, leaf in jax.tree_util.tree_leaves_with_path(self.params):
            h.update(jax.tree_util.keystr(path).encode())
            h.update(np.ascontiguousarray(_host(leaf), np.float32).tobytes())
        return h.hexdigest()


def _host(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from diffjax import sharding  # several processes: gather the whole value

        return sharding.to_host(leaf)
    return np.asarray(jax.device_get(leaf))


def estimate_scale(z: np.ndarray) -> float:
    """1 / std of latent samples z [N, h, w, c] (Rombach et al. 2022, §G: the latents are scaled
    to unit variance before diffusion)."""
    std = float(np.std(np.asarray(z, np.float64)))
    if not np.isfinite(std) or std <= 0:
        raise LatentError(f"the latents' std is {std}: the autoencoder's encoder is degenerate")
    return 1.0 / std


def make_encode_fn(module: AutoencoderKL, mesh, params_sharding=None):
    """Compiled `(params, images [B, H, W, C]) -> (mean, std)` of the posterior, batch split."""
    from diffjax import sharding  # the top floor's, kept out of this module's import time

    batch_sh = sharding.batch_sharded(mesh)
    params_sh = sharding.replicated(mesh) if params_sharding is None else params_sharding

    def encode(params, x):
        post = module.apply({"params": params}, x, method="encode")
        return post.mean, post.std

    return jax.jit(encode, in_shardings=(params_sh, batch_sh), out_shardings=(batch_sh, batch_sh))


def encode_batches(encode, params, images_of, num: int, batch: int, mesh):
    """(mean, std) host arrays [num, ...] of the examples `images_of(lo, hi)` returns, encoded in
    global batches of `batch` (the last one padded)."""
    from diffjax import sharding

    means, stds = [], []
    for lo in range(0, num, batch):
        x = images_of(lo, min(lo + batch, num))
        n = len(x)
        if n < batch:
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
        x = sharding.from_global(x, sharding.batch_sharded(mesh))
        m, s = encode(params, x)
        means.append(sharding.to_host(m)[:n])
        stds.append(sharding.to_host(s)[:n])
    return np.concatenate(means), np.concatenate(stds)


def cache_path(data_dir: str, dataset: str, split: str, image_size: int, channels: int,
               flips: bool, fingerprint: str) -> str:  # fmt: skip
    """Where the latents of (dataset, split, size, channels, flips) under an autoencoder live."""
    name = f"{dataset}-{split}-{image_size}px-{channels}ch{'-flips' if flips else ''}"
    return os.path.join(data_dir, "latent_cache", f"{name}-{fingerprint[:16]}.npz")


def read_cache(path: str, fingerprint: str, num_examples: int) -> dict | None:
    """The cache's arrays if it is complete and made by this autoencoder for this many examples;
    None otherwise (missing, stale or corrupt: it is then rebuilt)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
            if (
                meta.get("version") != CACHE_VERSION
                or meta.get("fingerprint") != fingerprint
                or meta.get("num_examples") != num_examples
            ):
                log.warning("latent cache %s is stale: rebuilding it", path)
                return None
            return {k: f[k] for k in ("mean", "std", "label")}
    except (OSError, ValueError, KeyError) as err:
        log.warning("latent cache %s is unreadable (%s): rebuilding it", path, err)
        return None


def write_cache(path: str, fingerprint: str, mean, std, label) -> None:
    """Writes the cache atomically (a crash leaves no half file) and removes the caches of the
    same data made by other autoencoders."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    meta = json.dumps(
        {"version": CACHE_VERSION, "fingerprint": fingerprint, "num_examples": len(label)}
    )
    tmp = path + ".tmp.npz"
    np.savez(tmp, mean=mean, std=std, label=label, meta=np.asarray(meta))
    os.replace(tmp, path)
    prefix = os.path.basename(path)[: -len(fingerprint[:16]) - len(".npz")]
    for other in os.listdir(os.path.dirname(path)):
        if other.startswith(prefix) and other != os.path.basename(path) and other.endswith(".npz"):
            os.remove(os.path.join(os.path.dirname(path), other))
            log.info("removed the latent cache of another autoencoder: %s", other)


class CachedSource:
    """A training source of encoded examples: records {'latent_mean', 'latent_std' [V, h, w, z],
    'label' (and 'text')}, V = 2 with flips (the image and its mirror), else 1. Random access
    like `data.RecordSource`, without decoding any image, unless `images` (the source the cache
    was encoded from) is given: then each record has its 'image' too, for the spatial condition
    of a latent super-resolution or inpainting model."""

    def __init__(self, cache: dict, texts: list[str] | None = None, images=None):
        self._mean, self._std, self._label = cache["mean"], cache["std"], cache["label"]
        self._texts = texts
        self._images = images

    def __len__(self) -> int:
        return len(self._label)

    def __getitem__(self, index: int) -> dict:
        record = {
            "latent_mean": self._mean[index],
            "latent_std": self._std[index],
            "label": int(self._label[index]),
        }
        if self._texts is not None:
            record["text"] = self._texts[index]
        if self._images is not None:
            record["image"] = self._images[index]["image"]
        return record

    def __getitems__(self, indices) -> list[dict]:
        return [self[i] for i in indices]
