"""U-Net building blocks: time embedding, convolutions, residual and attention blocks."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jnp.ndarray
Dtype = Any
Padding = str | tuple[tuple[int, int], tuple[int, int]]


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal embedding of t: [B] → [B, dim] (Transformer §3.5, as used by DDPM).

    Frequencies are max_period^(-i / (dim/2 - 1)) for i < dim/2; sines then cosines.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def conv2d(x: Array, kernel: Array, stride: int, padding: Padding) -> Array:
    """2-D convolution, NHWC input and HWIO kernel."""
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nn.Module):
    """A square convolution with bias; one place to choose how convolutions are computed."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Padding = "SAME"
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv2d(x, kernel, self.stride, self.padding) + bias


def zero_init():
    # DDPM initialises the last layer of every residual branch (and the output) near zero, so
    # each block starts as the identity.
    return nn.initializers.variance_scaling(1e-10, "fan_avg", "uniform")


class ResBlock(nn.Module):
    """DDPM residual block: GN → SiLU → conv, + Dense(SiLU(temb)), GN → SiLU → dropout → conv."""

    features: int
    dropout: float = 0.0
    num_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array, train: bool) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda: nn.GroupNorm(self.num_groups, epsilon=self.norm_eps, **kw)
        h = Conv(self.features, **kw)(nn.silu(norm()(x)))
        h = h + nn.Dense(self.features, **kw)(nn.silu(temb))[:, None, None, :]
        h = nn.silu(norm()(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Conv(self.features, kernel_init=zero_init(), **kw)(h)
        if x.shape[-1] != self.features:
            x = Conv(self.features, kernel_size=1, **kw)(x)
        return x + h


def _softmax(logits: Array) -> Array:
    """Softmax over the last axis, in float32; the max shift is a constant to autodiff."""
    logits = logits.astype(jnp.float32)
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


class AttentionBlock(nn.Module):
    """Self-attention over all positions with a residual connection (DDPM §B, multi-head option).

    `head_dim=None` gives one head over all channels, as in DDPM.
    """

    head_dim: int | None = None
    num_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hgt, wid, c = x.shape
        heads = 1 if self.head_dim is None else c // self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.GroupNorm(self.num_groups, epsilon=self.norm_eps, **kw)(x).reshape(b, -1, c)
        # One projection for q, k and v. Heads are folded into the batch, so that both attention
        # products are matrix products with a single batch dimension [B·heads, L, ·], which XLA
        # hands to its fast matmul library on CPU (two batch dimensions are ~2x slower there).
        d = c // heads
        qkv = nn.DenseGeneral((3, heads, d), name="qkv", **kw)(h)
        q, k, v = jnp.moveaxis(qkv, (2, 3), (0, 2)).reshape(3, b * heads, -1, d)
        weights = _softmax(jnp.einsum("nqd,nkd->nqk", q * d**-0.5, k)).astype(v.dtype)
        h = jnp.einsum("nqk,nkd->nqd", weights, v).reshape(b, heads, -1, d)
        h = jnp.moveaxis(h, 1, 2)  # [B, L, heads, d]
        h = nn.DenseGeneral(c, axis=(-2, -1), kernel_init=zero_init(), name="out", **kw)(h)
        return x + h.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
    """3x3 stride-2 conv, padding bottom/right only (DDPM's TF 'SAME' for even sizes)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return Conv(x.shape[-1], stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                    param_dtype=self.param_dtype)(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3x3 conv."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return Conv(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype)(x)
