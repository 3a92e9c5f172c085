"""Text encoders for conditioning: a BERT encoder (post-LayerNorm, Devlin et al. 2019) and the
frozen `TextEncoder` interface the diffusion model calls: captions → (context, mask)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray
Dtype = Any

# Parameter names mirror the Hugging Face BERT checkpoint layout, so models/pretrained.py maps
# `encoder.layer.{i}.attention.self.query.weight` to ("layer_{i}", "attention", "self", "query",
# "kernel") by rule: the submodule names below are the checkpoint's path components.


class SelfAttention(nn.Module):
    """Multi-head self-attention whose padded keys get exactly zero weight."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        """x: [B, L, D], mask: [B, L] bool (True at real tokens) → [B, L, D]."""
        b, length, d = x.shape
        head = d // self.num_heads
        dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        split = lambda y: y.reshape(b, length, self.num_heads, head)
        q, k, v = (split(dense(name)(x)) for name in ("query", "key", "value"))
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(head)
        # where, not an added bias: a masked score is the float32 minimum, whose exp after the
        # max subtraction is exactly 0, so padding cannot leak into real positions.
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhc->bqhc", weights, v)
        return out.reshape(b, length, d)


class AddNorm(nn.Module):
    """Dense projection, residual add, then LayerNorm: BERT's post-LN sublayer output."""

    features: int
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, residual: Array) -> Array:
        y = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(x)
        y = y.astype(jnp.float32) + residual.astype(jnp.float32)
        # Two-pass variance, as the reference computes it: E[x²] - E[x]² loses digits on the
        # large-valued outlier channels of a BERT residual stream.
        return nn.LayerNorm(
            epsilon=self.layer_norm_eps,
            use_fast_variance=False,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            name="LayerNorm",
        )(y)


class Attention(nn.Module):
    """Self-attention sublayer: attention, then output projection + residual + LayerNorm."""

    num_heads: int
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = SelfAttention(self.num_heads, **kw, name="self")(x, mask)
        return AddNorm(x.shape[-1], self.layer_norm_eps, **kw, name="output")(y, x)


class Intermediate(nn.Module):
    """The feed-forward expansion with exact (erf) GELU, as BERT uses."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(x)
        return jax.nn.gelu(y, approximate=False)


class Layer(nn.Module):
    """One post-LN Transformer encoder layer."""

    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Attention(self.num_heads, self.layer_norm_eps, **kw, name="attention")(x, mask)
        y = Intermediate(self.intermediate_size, **kw, name="intermediate")(x)
        return AddNorm(x.shape[-1], self.layer_norm_eps, **kw, name="output")(y, x)


class Embeddings(nn.Module):
    """Word + absolute position + token-type (all type 0) embeddings, then LayerNorm."""

    vocab_size: int
    hidden_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        length = tokens.shape[1]
        if length > self.max_positions:
            raise ValueError(f"{length} tokens exceed the encoder's {self.max_positions} positions")
        embed = lambda n, name: nn.Embed(
            n, self.hidden_size, dtype=jnp.float32, param_dtype=self.param_dtype, name=name
        )
        x = embed(self.vocab_size, "word_embeddings")(tokens)
        x = x + embed(self.max_positions, "position_embeddings")(jnp.arange(length))[None]
        x = x + embed(self.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(tokens))
        return nn.LayerNorm(
            epsilon=self.layer_norm_eps,
            use_fast_variance=False,
            param_dtype=self.param_dtype,
            name="LayerNorm",
        )(x)


class BertEncoder(nn.Module):
    """BERT encoder without pooler or dropout (inference only): tokens → last hidden states.

    Defaults are MiniLM-L6 (all-MiniLM-L6-v2): 6 layers, 384 wide, 12 heads.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, mask: Array) -> Array:
        """Encodes token ids.

        Args:
          tokens: [B, L] int32 token ids.
          mask: [B, L] bool, True at real tokens; padded keys get no attention weight.

        Returns:
          [B, L, D] float32 hidden states of the last layer (values at padded positions are
          meaningless; real positions do not depend on them).
        """
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads")
        x = Embeddings(
            self.vocab_size,
            self.hidden_size,
            self.max_positions,
            self.type_vocab_size,
            self.layer_norm_eps,
            param_dtype=self.param_dtype,
            name="embeddings",
        )(tokens)
        mask = mask.astype(bool)
        for i in range(self.num_layers):
            x = Layer(
                self.num_heads,
                self.intermediate_size,
                self.layer_norm_eps,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"layer_{i}",
            )(x, mask)
        return x.astype(jnp.float32)


Tokenize = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """A frozen text encoder: a module whose params the caller holds, plus its tokenizer.

    The diffusion model's `cond` takes (context, mask) from here; params are never trained
    (gradients are stopped), so callers may compute a caption's context once and cache it.

    Attributes:
      module: maps (tokens [B, L] int32, mask [B, L] bool) → hidden states [B, L, D].
      tokenizer: maps a list of B strings → (tokens [B, L] int32, mask [B, L] bool), with a
        fixed L so compiled programs see one shape.
    """

    module: nn.Module
    tokenizer: Tokenize

    def encode(self, params: Any, tokens: Array, mask: Array) -> tuple[Array, Array]:
        """Encodes tokenized text; jit-able (`jax.jit(encoder.encode)`).

        Args:
          params: the module's parameters (the "params" collection).
          tokens: [B, L] int32.
          mask: [B, L] bool, True at real tokens.

        Returns:
          context [B, L, D] float32, zero at padded positions, and mask [B, L] bool.
        """
        mask = jnp.asarray(mask, bool)
        hidden = self.module.apply({"params": params}, tokens, mask)
        hidden = jax.lax.stop_gradient(hidden)
        # Zero padding so a caption's context is a function of its real tokens alone.
        return jnp.where(mask[..., None], hidden, 0.0), mask

    def encode_texts(self, params: Any, texts: Sequence[str]) -> tuple[Array, Array]:
        """Tokenizes and encodes B strings; returns context [B, L, D] and mask [B, L]."""
        tokens, mask = self.tokenizer(texts)
        return self.encode(params, jnp.asarray(tokens), jnp.asarray(mask))
