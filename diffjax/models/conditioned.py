"""A U-Net with its own text encoder, the two trained together (the LDM recipe for text)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffjax.cond import NONE, Cond
from diffjax.models.text import BertEncoder
from diffjax.models.unet import UNet

Array = jnp.ndarray


class TextUNet(nn.Module):
    """`unet` cross-attending to `encoder`'s hidden states of the prompt's tokens.

    Here `cond.context` holds token ids [B, L] int32 (and `cond.context_mask` [B, L] bool); the
    encoder, trained with the U-Net, turns them into the [B, L, D] context. Parameters are
    {"unet": ..., "encoder": ...}.
    """

    unet: UNet
    encoder: BertEncoder

    @nn.compact
    def __call__(self, x: Array, t: Array, cond: Cond | None = None, *, train: bool = False):
        cond = NONE if cond is None else cond
        if cond.context is None:
            raise ValueError("a TextUNet needs Cond(context=token ids [B, L], context_mask=...)")
        context = self.encoder(cond.context, cond.context_mask)
        return self.unet(x, t, cond.replace(context=context), train=train)
