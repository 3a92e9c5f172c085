"""Transformer blocks for the U-Net in the Stable Diffusion layout: self-attention, cross-attention
on a context sequence (text), GEGLU feed-forward; parameter names follow diffusers' modules
(`to_q`, `attn2`, `ff`, `proj_in`, …) so that loading its weights is a mechanical mapping."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models.layers import Dtype, GroupNorm, attention, zero_init

Array = jnp.ndarray


class Attention(nn.Module):
    """Multi-head attention of x [B, L, D] on a context [B, L_c, D_c] (x itself when None):
    bias-free to_q / to_k / to_v, to_out with bias; `mask` [B, L_c] bool marks real tokens."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None, mask: Array | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = x if context is None else context
        inner = self.heads * self.head_dim
        b = x.shape[0]

        def heads(name, y):  # [B, L, inner] → [B·heads, L, d]: one batch dimension (fast on CPU)
            h = nn.Dense(inner, use_bias=False, name=name, **kw)(y)
            h = h.reshape(b, -1, self.heads, self.head_dim)
            return jnp.moveaxis(h, 2, 1).reshape(b * self.heads, -1, self.head_dim)

        q, k, v = heads("to_q", x), heads("to_k", context), heads("to_v", context)
        if mask is not None:
            mask = jnp.repeat(mask.astype(bool), self.heads, axis=0)
        out = attention(q, k, v, mask).reshape(b, self.heads, -1, self.head_dim)
        out = jnp.moveaxis(out, 1, 2).reshape(b, -1, inner)
        return nn.Dense(x.shape[-1], name="to_out", **kw)(out)


class FeedForward(nn.Module):
    """GEGLU (Shazeer 2020): proj to 2·inner, value · GELU(gate), then back to D."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        value, gate = jnp.split(nn.Dense(2 * self.mult * x.shape[-1], name="proj", **kw)(x), 2, -1)
        return nn.Dense(x.shape[-1], name="out", **kw)(value * nn.gelu(gate, approximate=False))


class TransformerBlock(nn.Module):
    """LayerNorm + self-attention, LayerNorm + cross-attention, LayerNorm + GEGLU; each residual."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array, mask: Array | None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kw)
        x = x + Attention(self.heads, self.head_dim, name="attn1", **kw)(norm("norm1")(x))
        x = x + Attention(self.heads, self.head_dim, name="attn2", **kw)(
            norm("norm2")(x), context, mask
        )
        return x + FeedForward(name="ff", **kw)(norm("norm3")(x))


class SpatialTransformer(nn.Module):
    """GroupNorm → proj_in → `depth` TransformerBlocks over the H·W positions → proj_out, + x.

    proj_in/proj_out are linear (Stable Diffusion 2's `use_linear_projection`; SD 1's 1x1
    convolutions are the same map with a reshaped kernel). proj_out starts at zero, so the block
    starts as the identity, like the U-Net's other residual branches.
    """

    heads: int
    head_dim: int
    depth: int = 1
    num_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array, mask: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x.shape
        h = GroupNorm(self.num_groups, self.norm_eps, name="norm", **kw)(x).reshape(b, -1, c)
        h = nn.Dense(self.heads * self.head_dim, name="proj_in", **kw)(h)
        context = context.astype(h.dtype)
        for i in range(self.depth):
            h = TransformerBlock(self.heads, self.head_dim, name=f"transformer_blocks_{i}", **kw)(
                h, context, mask
            )
        h = nn.Dense(c, kernel_init=zero_init(), name="proj_out", **kw)(h)
        return x + h.reshape(b, hgt, wid, c)
