"""The PatchGAN discriminator (Isola et al. 2017) that LDM trains its autoencoder against."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models.layers import Conv, GroupNorm

Array = jnp.ndarray


class PatchDiscriminator(nn.Module):
    """x [B, H, W, C] → real/fake logits [B, h, w, 1], one per overlapping patch.

    4x4 convolutions: stride 2 for the first `num_layers` (channels doubling up to 8×), then one
    at stride 1 and a 1-channel output, LeakyReLU(0.2) between them. pix2pix normalises with
    BatchNorm; here GroupNorm, so the step has no batch statistics to carry or synchronise
    across devices.
    """

    channels: int = 64
    num_layers: int = 3
    num_groups: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(kernel_size=4, padding=((1, 1), (1, 1)), dtype=self.dtype)
        kw["param_dtype"] = self.param_dtype
        lrelu = lambda h: nn.leaky_relu(h, 0.2)
        h = lrelu(Conv(self.channels, stride=2, **kw)(x))
        for i in range(1, self.num_layers + 1):
            ch = self.channels * min(2**i, 8)
            stride = 2 if i < self.num_layers else 1
            h = Conv(ch, stride=stride, **kw)(h)
            groups = min(self.num_groups, ch)
            h = lrelu(GroupNorm(groups, 1e-6, dtype=self.dtype, param_dtype=self.param_dtype)(h))
        return Conv(1, **kw)(h)
