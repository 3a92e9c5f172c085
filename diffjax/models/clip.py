"""CLIP's text transformer (Radford et al. 2021), Stable Diffusion 1.x's text encoder, and its
loader from a transformers `CLIPTextModel` folder (config.json + model.safetensors).

Token + learned position embeddings, then pre-LayerNorm blocks (causal multi-head
self-attention, an MLP with quick-GELU), then a final LayerNorm; Stable Diffusion conditions on
the last hidden states [B, 77, D]. Module names follow the checkpoint's
(`text_model.encoder.layers.{i}.self_attn.q_proj`, …), so loading maps names by rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import diffusers_io as io
from diffjax.models.pretrained import PretrainedError

Array = jnp.ndarray
WEIGHTS_FILE = "model.safetensors"
ACTIVATIONS = {  # CLIP's quick-GELU, x·σ(1.702x), and OpenCLIP's (SD 2.x) exact GELU
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
}
CONFIG_FIELDS = {  # config.json → ClipTextEncoder field
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_positions",
    "layer_norm_eps": "layer_norm_eps",
    "hidden_act": "hidden_act",
}
MODEL_TYPES = ("clip_text_model",)
IGNORED = {"embeddings.position_ids"}  # a buffer some saves include


def causal_attention(q: Array, k: Array, v: Array) -> Array:
    """softmax(q kᵀ/√d) v over [N, L, d], position i attending to positions ≤ i only."""
    length = q.shape[1]
    logits = jnp.einsum("nqd,nkd->nqk", q * q.shape[-1] ** -0.5, k).astype(jnp.float32)
    causal = jnp.tril(jnp.ones((length, length), bool))
    logits = jnp.where(causal[None], logits, jnp.finfo(jnp.float32).min)
    return jnp.einsum("nqk,nkd->nqd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


class ClipAttention(nn.Module):
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, length, d = x.shape
        proj = lambda name: nn.Dense(d, name=name, dtype=self.dtype)

        def split(y):  # [B, L, D] → [B·heads, L, D/heads]
            y = y.reshape(b, length, self.heads, d // self.heads)
            return jnp.moveaxis(y, 2, 1).reshape(b * self.heads, length, -1)

        q, k, v = (split(proj(f"{n}_proj")(x)) for n in "qkv")
        out = causal_attention(q, k, v).reshape(b, self.heads, length, -1)
        return proj("out_proj")(jnp.moveaxis(out, 1, 2).reshape(b, length, d))


class ClipMlp(nn.Module):
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.Dense(self.intermediate_size, name="fc1", dtype=self.dtype)(x)
        return nn.Dense(x.shape[-1], name="fc2", dtype=self.dtype)(ACTIVATIONS[self.hidden_act](h))


class ClipLayer(nn.Module):
    heads: int
    intermediate_size: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, name=name, dtype=self.dtype)
        x = x + ClipAttention(self.heads, self.dtype, name="self_attn")(norm("layer_norm1")(x))
        mlp = ClipMlp(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")
        return x + mlp(norm("layer_norm2")(x))


class ClipTextEncoder(nn.Module):
    """tokens [B, L] int32 (and an unused mask, for the `TextEncoder` interface) → the final
    LayerNorm's hidden states [B, L, hidden_size] in float32."""

    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, mask: Array | None = None) -> Array:
        del mask  # CLIP's text model sees every position, with its causal mask only
        length = tokens.shape[1]
        embed = lambda n, name: nn.Embed(n, self.hidden_size, name=name, dtype=self.dtype)
        x = embed(self.vocab_size, "token_embedding")(tokens)
        x = x + embed(self.max_positions, "position_embedding")(jnp.arange(length))[None]
        for i in range(self.num_layers):
            layer = ClipLayer(
                self.num_heads,
                self.intermediate_size,
                self.layer_norm_eps,
                self.hidden_act,
                self.dtype,
                name=f"layers_{i}",
            )
            x = layer(x)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="final_layer_norm", dtype=self.dtype)(x)
        return x.astype(jnp.float32)


def checkpoint_name(path: tuple[str, ...], root: str = "text_model.") -> str:
    """("layers_1", "self_attn", "q_proj", "kernel") →
    "text_model.encoder.layers.1.self_attn.q_proj.weight". transformers 5 saves the names
    without the "text_model." root; earlier versions (Stable Diffusion's own files) with it."""
    head = path[0]
    if head in ("token_embedding", "position_embedding"):
        prefix = "embeddings."
    else:
        prefix = "encoder." if head.startswith("layers_") else ""
    return f"{root}{prefix}{io.checkpoint_name(path)}"


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / io.CONFIG_FILE
    config = io.read_json(path)
    if config.get("model_type") not in MODEL_TYPES:
        raise PretrainedError(
            f"{path}: model_type={config.get('model_type')!r} is not a CLIP text model "
            f"(want {MODEL_TYPES[0]!r}: transformers' CLIPTextModel)"
        )
    if config.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
        raise PretrainedError(
            f"{path}: hidden_act={config['hidden_act']!r} is not supported (want one of "
            f"{sorted(ACTIVATIONS)})"
        )
    missing = [k for k in CONFIG_FIELDS if k not in config and k != "hidden_act"]
    if missing:
        raise PretrainedError(f"{path} lacks {', '.join(missing)}")
    return config


def load(directory: str | Path, dtype: Any = jnp.float32) -> tuple[ClipTextEncoder, dict, dict]:
    """Loads a transformers `CLIPTextModel` folder (Stable Diffusion's `text_encoder/`).

    Returns:
      (module, params, config): `module.apply({"params": params}, tokens)` gives the last
      hidden states; config is config.json's content.

    Raises:
      PretrainedError: a missing or unreadable file, an unsupported setting, or a missing,
        unexpected or mis-shaped tensor; the message names it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PretrainedError(f"CLIPTextModel directory {directory} does not exist")
    config = read_config(directory)
    fields = {f: config[k] for k, f in CONFIG_FIELDS.items() if k in config}
    module = ClipTextEncoder(**fields, dtype=dtype)
    file = directory / WEIGHTS_FILE
    if not file.is_file():
        bins = sorted(p.name for p in directory.glob("*.bin"))
        hint = (
            f"; {', '.join(bins)} (pickled PyTorch) is not read: convert it once with "
            "transformers, `CLIPTextModel.from_pretrained(dir).save_pretrained(dir)`"
            if bins
            else ""
        )
        raise PretrainedError(f"{file} is missing{hint}")
    tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), tokens)["params"]

    def convert(path, want):
        path = tuple(k.key for k in path)
        value = reader.get(checkpoint_name(path, root), io.torch_shape(path[-1], want.shape))
        return jnp.asarray(io.to_flax(value, path[-1]), want.dtype)

    with io.TensorReader(file) as reader:
        root = "text_model." if any(n.startswith("text_model.") for n in reader.names) else ""
        params = jax.tree_util.tree_map_with_path(convert, shapes)
        reader.used |= {root + name for name in IGNORED} & reader.names
        reader.check_all_used()
    return module, params, config


def save(directory: str | Path, module: ClipTextEncoder, params: dict, config: dict) -> None:
    """Writes the params as a `CLIPTextModel` folder (config.json as given, model.safetensors)."""
    tensors = {}
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        path = tuple(k.key for k in path)
        tensors[checkpoint_name(path)] = io.to_torch(np.asarray(value, np.float32), path[-1])
    io.write_model(Path(directory), config, tensors, WEIGHTS_FILE)
