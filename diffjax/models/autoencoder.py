"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), in the layout of
Stable Diffusion's VAE, with diffusers' module names so its checkpoints map one to one."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.layers import Conv, GroupNorm, ShapeError, attention

Array = jnp.ndarray
Dtype = Any

LOGVAR_RANGE = (-30.0, 20.0)  # LDM clamps the posterior's log-variance to this range


@flax.struct.dataclass
class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(exp(logvar))), [B, h, w, z] each."""

    mean: Array
    logvar: Array

    @classmethod
    def from_moments(cls, moments: Array) -> DiagonalGaussian:
        """From the encoder's 2·z channels: mean first, then log-variance (clamped as LDM)."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: Array) -> Array:
        """z = mean + std · ε, ε ~ N(0, I) (the reparameterisation: differentiable in both)."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> Array:
        return self.mean

    def kl(self) -> Array:
        """KL(q ‖ N(0, I)) per example [B], summed over latent positions and channels:
        ½ Σ (μ² + σ² − 1 − log σ²) (Kingma & Welling 2014, appendix B)."""
        terms = jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


class ResnetBlock(nn.Module):
    """GN → SiLU → conv, GN → SiLU → dropout → conv, plus a 1x1-projected shortcut when the width
    changes (diffusers' `ResnetBlock2D` without a time embedding)."""

    features: int
    num_groups: int = 32
    norm_eps: float = 1e-6
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: GroupNorm(self.num_groups, self.norm_eps, name=name, **kw)
        h = Conv(self.features, name="conv1", **kw)(nn.silu(norm("norm1")(x)))
        h = nn.silu(norm("norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Conv(self.features, name="conv2", **kw)(h)
        if x.shape[-1] != self.features:
            x = Conv(self.features, kernel_size=1, name="conv_shortcut", **kw)(x)
        return x + h


class SelfAttention(nn.Module):
    """One-head self-attention over all positions with a residual (the VAE's middle block)."""

    num_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hgt, wid, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.num_groups, self.norm_eps, name="group_norm", **kw)(x)
        h = h.reshape(b, hgt * wid, c)
        q, k, v = (nn.Dense(c, name=n, **kw)(h) for n in ("to_q", "to_k", "to_v"))
        h = nn.Dense(c, name="to_out_0", **kw)(attention(q, k, v))
        return x + h.reshape(x.shape)


class MidBlock(nn.Module):
    """ResnetBlock, self-attention, ResnetBlock at the lowest resolution."""

    num_groups: int = 32
    norm_eps: float = 1e-6
    attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock(c, self.num_groups, self.norm_eps, name="resnets_0", **kw)(x)
        if self.attention:
            x = SelfAttention(self.num_groups, self.norm_eps, name="attentions_0", **kw)(x)
        return ResnetBlock(c, self.num_groups, self.norm_eps, name="resnets_1", **kw)(x)


class Encoder(nn.Module):
    """x [B, H, W, C] → moments [B, H/f, W/f, 2·z], f = 2^(levels − 1)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    num_groups: int
    norm_eps: float
    mid_attention: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g, eps = self.num_groups, self.norm_eps
        h = Conv(self.block_out_channels[0], name="conv_in", **kw)(x)
        last = len(self.block_out_channels) - 1
        for i, ch in enumerate(self.block_out_channels):
            for j in range(self.layers_per_block):
                h = ResnetBlock(ch, g, eps, name=f"down_blocks_{i}_resnets_{j}", **kw)(h)
            if i != last:  # a stride-2 conv padded bottom/right only, as LDM and diffusers
                name = f"down_blocks_{i}_downsamplers_0_conv"
                h = Conv(ch, stride=2, padding=((0, 1), (0, 1)), name=name, **kw)(h)
        h = MidBlock(g, eps, self.mid_attention, name="mid_block", **kw)(h)
        h = nn.silu(GroupNorm(g, eps, name="conv_norm_out", **kw)(h))
        return Conv(2 * self.latent_channels, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """z [B, h, w, z] → x [B, h·f, w·f, C]; `features=True` also returns the activations that
    enter `conv_out` (for the GAN's adaptive weight at the last layer)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    num_groups: int
    norm_eps: float
    mid_attention: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, z: Array, features: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g, eps = self.num_groups, self.norm_eps
        channels = tuple(reversed(self.block_out_channels))
        h = Conv(channels[0], name="conv_in", **kw)(z)
        h = MidBlock(g, eps, self.mid_attention, name="mid_block", **kw)(h)
        for i, ch in enumerate(channels):
            for j in range(self.layers_per_block + 1):
                h = ResnetBlock(ch, g, eps, name=f"up_blocks_{i}_resnets_{j}", **kw)(h)
            if i != len(channels) - 1:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = Conv(ch, name=f"up_blocks_{i}_upsamplers_0_conv", **kw)(h)
        h = nn.silu(GroupNorm(g, eps, name="conv_norm_out", **kw)(h))
        out = Conv(self.out_channels, name="conv_out", **kw)(h)
        return (out, h) if features else out


class AutoencoderKL(nn.Module):
    """Encoder → diagonal Gaussian posterior → decoder, as LDM's `AutoencoderKL`.

    Attributes:
      in_channels, out_channels: image channels (1 or 3).
      block_out_channels: channels per level; levels L give the factor f = 2^(L − 1).
      layers_per_block: ResnetBlocks per encoder level (the decoder has one more per level).
      latent_channels: z, the latent's channels (4 in Stable Diffusion).
      num_groups, norm_eps: GroupNorm settings.
      mid_attention: self-attention in both middle blocks.
      dtype, param_dtype: compute and parameter dtypes.

    Parameter names follow diffusers (`down_blocks_0_resnets_1/conv1` is diffusers'
    `encoder.down_blocks.0.resnets.1.conv1`), so `diffusers_vae.load_autoencoder_kl` maps them
    without a table. Images are NHWC in [-1, 1].
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    num_groups: int = 32
    norm_eps: float = 1e-6
    mid_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def factor(self) -> int:
        """f, the side of the image over the side of its latent."""
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """[H, W, C] → [H/f, W/f, z]."""
        h, w, _ = image_shape
        return (h // self.factor, w // self.factor, self.latent_channels)

    def check_shapes(self, image_shape: tuple[int, int, int]) -> None:
        """Raises ShapeError (naming the setting) for images this network cannot encode."""
        h, w, c = image_shape
        if c != self.in_channels:
            raise ShapeError("in_channels", f"{self.in_channels}, but the images have {c}")
        if h % self.factor or w % self.factor:
            raise ShapeError(
                "input",
                f"{h}x{w} images are not divisible by the factor f = {self.factor} of "
                f"{len(self.block_out_channels)} levels",
            )
        for ch in self.block_out_channels:
            if ch % self.num_groups:
                raise ShapeError(
                    "num_groups", f"{ch} channels are not divisible into {self.num_groups} groups"
                )

    def setup(self):
        kw = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            num_groups=self.num_groups,
            norm_eps=self.norm_eps,
            mid_attention=self.mid_attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        z = self.latent_channels
        self.encoder = Encoder(latent_channels=z, **kw)
        self.decoder = Decoder(out_channels=self.out_channels, **kw)
        pkw = dict(kernel_size=1, dtype=self.dtype, param_dtype=self.param_dtype)
        self.quant_conv = Conv(2 * z, **pkw)
        self.post_quant_conv = Conv(z, **pkw)

    def encode(self, x: Array) -> DiagonalGaussian:
        """Images [B, H, W, C] in [-1, 1] → the posterior over z [B, H/f, W/f, z]."""
        self.check_shapes(x.shape[1:])
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

    def decode(self, z: Array, features: bool = False):
        """Latents [B, h, w, z] → images [B, h·f, w·f, C] (and `Decoder`'s features)."""
        if z.shape[-1] != self.latent_channels:
            raise ShapeError(
                "latent_channels", f"{self.latent_channels}, but the latents have {z.shape[-1]}"
            )
        return self.decoder(self.post_quant_conv(z), features)

    def __call__(self, x: Array, key: Array | None = None):
        """Reconstruction of x through a posterior sample (its mean when `key` is None), and the
        posterior: (x̂ [B, H, W, C], DiagonalGaussian)."""
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z), posterior


def from_diffusers_config(config: dict, dtype: Dtype = jnp.float32) -> AutoencoderKL:
    """The module of a diffusers `AutoencoderKL` config.json's fields (the options it cannot
    express are refused by `diffusers_vae`)."""
    return AutoencoderKL(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        block_out_channels=tuple(config.get("block_out_channels", (64,))),
        layers_per_block=config.get("layers_per_block", 1),
        latent_channels=config.get("latent_channels", 4),
        num_groups=config.get("norm_num_groups", 32),
        mid_attention=config.get("mid_block_add_attention", True),
        dtype=dtype,
    )
