"""The DDPM U-Net (Ho et al. 2020, Appendix B), with hooks for class and spatial conditions."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffjax.cond import NONE, Cond
from diffjax.models.layers import (
    AttentionBlock,
    Conv,
    Downsample,
    GroupNorm,
    ResBlock,
    ShapeError,
    Upsample,
    timestep_embedding,
    zero_init,
)
from diffjax.models.transformer import SpatialTransformer

Array = jnp.ndarray
LABEL_INIT = nn.initializers.normal(1.0)
TRANSFORMER_NORM_EPS = 1e-6


class UNet(nn.Module):
    """ε/x_0/v-prediction U-Net with equal encoder and decoder levels.

    Attributes:
      base_channels: channels of the first level; level i has base_channels * channel_mults[i].
      channel_mults: one multiplier per level; the image is halved between levels.
      num_res_blocks: residual blocks per encoder level (the decoder has one more per level).
      attention_resolutions: spatial sizes (e.g. (16,)) at which self-attention follows each block.
      mid_attention: self-attention between the two middle residual blocks.
      head_dim: channels per attention head; None = one head over all channels (DDPM).
      num_heads: a fixed number of heads at every level instead (Stable Diffusion 1.x: 8);
        wins over head_dim.
      context_dim: > 0: text-conditioned. The attention at attention_resolutions (and in the
        middle) becomes a SpatialTransformer (self-attention, cross-attention on the context
        [B, L, context_dim], GEGLU feed-forward), Stable Diffusion's layout.
      transformer_depth: TransformerBlocks per SpatialTransformer.
      pooled_context: also add a projection of the context's mean over its real tokens to the
        time embedding (the global text signal of GLIDE and Imagen), besides cross-attention.
      dropout: dropout rate inside residual blocks (active when train=True).
      num_groups, norm_eps: GroupNorm settings.
      time_freq_shift, time_flip_sin_to_cos: the sinusoidal time embedding's convention
        (`layers.timestep_embedding`): DDPM's is 1 and False, diffusers' UNet2DModel's 0 and True.
      downsample_padding: 0 pads the stride-2 convolutions bottom/right (DDPM), 1 on every side
        (diffusers' default).
      patch_size: p > 1 folds each p x p patch of the input (with any concatenated condition)
        into channels before the first convolution and unfolds the output the same way (space
        to depth, as in Hoogeboom et al. 2023's "simple diffusion"): every level runs at 1/p of
        the image's side, ~p² fewer FLOPs. The feature-map sizes of attention_resolutions are
        then image size / p / 2^level.
      out_channels: output channels; None = the channels of x (2x that for learned variances).
      num_classes: >0 adds a class embedding to the time embedding; label `num_classes` is the
        reserved "no label" class (for classifier-free guidance).
      classifier_classes: > 0: the noise-conditional classifier of classifier guidance instead
        (Dhariwal & Nichol 2021, §4): the encoder half and the middle block only, then
        GroupNorm, SiLU, the mean over positions and a Dense to this many logits [B, K].
      remat: recompute each residual and attention block's activations in the backward pass
        (`jax.checkpoint`) instead of storing them: less memory, ~1/3 more compute. Parameter
        names do not change, so checkpoints move freely between remat on and off.
      dtype, param_dtype: compute and parameter dtypes.
    """

    base_channels: int = 128
    channel_mults: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)
    mid_attention: bool = True
    head_dim: int | None = None
    num_heads: int | None = None
    context_dim: int = 0
    transformer_depth: int = 1
    pooled_context: bool = False
    dropout: float = 0.1
    num_groups: int = 32
    norm_eps: float = 1e-6
    time_freq_shift: float = 1.0
    time_flip_sin_to_cos: bool = False
    downsample_padding: int = 0
    patch_size: int = 1
    out_channels: int | None = None
    num_classes: int = 0
    classifier_classes: int = 0
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _check_shapes(self, size: tuple[int, int]) -> None:
        levels = len(self.channel_mults)
        if levels < 1:
            raise ShapeError("channel_mults", "needs at least one level")
        if self.patch_size < 1:
            raise ShapeError("patch_size", f"must be >= 1, got {self.patch_size}")
        factor = self.patch_size * 2 ** (levels - 1)
        if min(size) < 1 or size[0] % factor or size[1] % factor:
            raise ShapeError(
                "input",
                f"{size[0]}x{size[1]} must be a positive multiple of patch_size * 2^(levels-1) = "
                f"{factor} on each side for {levels} levels (channel_mults="
                f"{tuple(self.channel_mults)}, patch_size={self.patch_size})",
            )
        sizes = {size[0] // self.patch_size // 2**i for i in range(levels)}
        if set(self.attention_resolutions) - sizes:
            raise ShapeError(
                "attention_resolutions",
                f"{tuple(self.attention_resolutions)} names sizes the network never has; its "
                f"sizes are {sorted(sizes, reverse=True)}",
            )

    def _heads(self, channels: int) -> int:
        if self.num_heads:
            if channels % self.num_heads:
                raise ShapeError("num_heads", f"{self.num_heads} does not divide {channels}")
            return self.num_heads
        if self.head_dim:
            if channels % self.head_dim:
                raise ShapeError("head_dim", f"{self.head_dim} does not divide {channels}")
            return channels // self.head_dim
        return 1

    def _check_context(self, cond: Cond) -> None:
        if self.context_dim and cond.context is None:
            raise ValueError("this UNet has context_dim > 0: pass Cond(context=[B, L, D], ...)")
        if not self.context_dim and cond.context is not None:
            raise ValueError("Cond.context given to a UNet with context_dim=0 (no cross-attention)")
        if self.context_dim and cond.context.shape[-1] != self.context_dim:
            raise ShapeError(
                "context_dim",
                f"{self.context_dim}, but the context has width {cond.context.shape[-1]}",
            )

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        cond: Cond | None = None,
        *,
        train: bool = False,
    ) -> Array:
        """Predicts the target for a noisy batch.

        Args:
          x: x_t [B, H, W, C].
          t: timesteps [B] int32 (or float, for continuous time).
          cond: the condition (`diffjax.cond.Cond`; None = unconditional): `label` [B] int32
            when num_classes > 0 (`num_classes` itself is the null class), `context`
            [B, L, context_dim] with `context_mask` [B, L] bool when context_dim > 0, `concat`
            [B, H, W, C'] concatenated to x along channels.
          train: enables dropout (needs a 'dropout' rng).

        Returns:
          [B, H, W, out_channels] in float32.
        """
        cond = NONE if cond is None else cond
        self._check_shapes(x.shape[1:3])
        self._check_context(cond)
        out_channels = self.out_channels or x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(num_groups=self.num_groups, norm_eps=self.norm_eps, **kw)
        counts = {}

        def block(cls, *args, static_argnums=(), **override):
            # Named as Flax would name them unwrapped, so remat does not rename parameters.
            index = counts[cls.__name__] = counts.get(cls.__name__, -1) + 1
            if self.remat:
                cls = nn.remat(cls, static_argnums=static_argnums)
            name = f"{cls.__name__.removeprefix('Checkpoint')}_{index}"
            return cls(*args, **{**block_kw, **override}, name=name)

        def attn(h):
            if not self.context_dim:
                return block(AttentionBlock, self.head_dim)(h)
            heads = self._heads(h.shape[-1])
            # Its GroupNorm's eps is 1e-6 whatever norm_eps is, as in Stable Diffusion.
            st = block(
                SpatialTransformer,
                heads,
                h.shape[-1] // heads,
                self.transformer_depth,
                norm_eps=TRANSFORMER_NORM_EPS,
            )
            return st(h, cond.context, cond.context_mask)

        # static_argnums counts self: (self, x, temb, train) → train is 3.
        res = lambda h, ch: block(ResBlock, ch, self.dropout, static_argnums=(3,))(h, temb, train)

        temb_dim = 4 * self.base_channels
        temb = timestep_embedding(
            t,
            self.base_channels,
            freq_shift=self.time_freq_shift,
            flip_sin_to_cos=self.time_flip_sin_to_cos,
        )
        temb = nn.Dense(temb_dim, **kw)(nn.silu(nn.Dense(temb_dim, **kw)(temb)))
        if self.num_classes:
            if cond.label is None:
                raise ValueError("this UNet has num_classes > 0: pass Cond(label=[B] int32)")
            # N(0, 1) rows, as in ADM (Dhariwal & Nichol 2021): flax's default (std 1/√D) starts
            # the label's signal ~10x weaker than the time embedding's, and a short run then
            # learns the classes late (measured on digits: README, "Conditioning").
            embed = nn.Embed(self.num_classes + 1, temb_dim, embedding_init=LABEL_INIT, **kw)
            temb = temb + embed(cond.label)
        elif cond.label is not None:
            raise ValueError("Cond.label given to a UNet with num_classes=0 (unconditional)")
        if self.context_dim and self.pooled_context:
            mask = cond.context_mask.astype(jnp.float32)[..., None]
            pooled = jnp.sum(cond.context * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)
            temb = temb + nn.Dense(temb_dim, name="context_embed", **kw)(pooled)
        if cond.concat is not None:
            x = jnp.concatenate([x, cond.concat.astype(x.dtype)], axis=-1)
        x = space_to_depth(x, self.patch_size)

        h = Conv(self.base_channels, **kw)(x)
        skips = [h]
        for level, mult in enumerate(self.channel_mults):
            for _ in range(self.num_res_blocks):
                h = res(h, self.base_channels * mult)
                if h.shape[1] in self.attention_resolutions:
                    h = attn(h)
                skips.append(h)
            if level != len(self.channel_mults) - 1:
                h = Downsample(self.downsample_padding, **kw)(h)
                skips.append(h)

        h = res(h, h.shape[-1])
        if self.mid_attention:
            h = attn(h)
        h = res(h, h.shape[-1])
        if self.classifier_classes:
            h = nn.silu(GroupNorm(self.num_groups, self.norm_eps, **kw)(h)).mean(axis=(1, 2))
            return nn.Dense(self.classifier_classes, **kw)(h).astype(jnp.float32)

        for level, mult in reversed(list(enumerate(self.channel_mults))):
            for _ in range(self.num_res_blocks + 1):
                h = res(jnp.concatenate([h, skips.pop()], axis=-1), self.base_channels * mult)
                if h.shape[1] in self.attention_resolutions:
                    h = attn(h)
            if level != 0:
                h = Upsample(**kw)(h)

        h = nn.silu(GroupNorm(self.num_groups, self.norm_eps, **kw)(h))
        h = Conv(out_channels * self.patch_size**2, kernel_init=zero_init(), **kw)(h)
        return depth_to_space(h, self.patch_size).astype(jnp.float32)


def space_to_depth(x: Array, p: int) -> Array:
    """[B, H, W, C] → [B, H/p, W/p, p·p·C]: each p x p patch's pixels as channels (row, column,
    channel order)."""
    if p == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: Array, p: int) -> Array:
    """The inverse of `space_to_depth`: [B, h, w, p·p·C] → [B, h·p, w·p, C]."""
    if p == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c // (p * p))
