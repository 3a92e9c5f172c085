"""The condition pytree that travels from the data to the network through losses and samplers."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from diffjax import spatial

Array = jnp.ndarray


@flax.struct.dataclass
class Cond:
    """What the network is conditioned on, batched like x_t; unused fields are None.

    Attributes:
      label: class labels [B] int32; the U-Net's `num_classes` is the "no label" (null) class.
      context: a sequence [B, L, D] for cross-attention (e.g. a text encoder's hidden states).
      context_mask: [B, L] bool, True at real tokens; padded tokens get no attention weight.
      concat: spatial conditions [B, H, W, C'] concatenated to x_t along channels.
    """

    label: Array | None = None
    context: Array | None = None
    context_mask: Array | None = None
    concat: Array | None = None


NONE = Cond()  # the unconditional model's condition


def concat_batch(a: Cond, b: Cond) -> Cond:
    """[a; b] along the batch, field by field (both must use the same fields)."""
    return jax.tree.map(lambda u, v: jnp.concatenate([u, v.astype(u.dtype)]), a, b)


def null_like(c: Cond, null_label: int, null_context: Cond | None = None) -> Cond:
    """The "unconditional" side of `c` for classifier-free guidance and training dropout.

    Labels become the null class; the text side becomes `null_context`'s (context, mask) (e.g. the
    encoding of the empty prompt, or of a negative prompt), broadcast over the batch; a spatial
    `concat` stays: it is part of the input, not of the prompt.
    """
    label = None if c.label is None else jnp.full_like(c.label, null_label)
    context, mask = c.context, c.context_mask
    if c.context is not None:
        if null_context is None or null_context.context is None:
            raise ValueError("a text-conditioned Cond needs null_context (the empty prompt's)")
        b = c.context.shape[0]
        context = jnp.broadcast_to(null_context.context, (b, *null_context.context.shape[1:]))
        mask = jnp.broadcast_to(
            null_context.context_mask, (b, *null_context.context_mask.shape[1:])
        )
    return Cond(label=label, context=context, context_mask=mask, concat=c.concat)


def drop(c: Cond, key: Array, prob: float, null_label: int, null_context: Cond | None = None):
    """Replaces each example's condition by the null one with probability `prob` (independently
    per example, from `key`): the training side of classifier-free guidance (Ho & Salimans 2021).
    """
    if prob <= 0 or (c.label is None and c.context is None):
        return c
    batch = (c.label if c.label is not None else c.context).shape[0]
    dropped = jax.random.bernoulli(key, prob, (batch,))
    null = null_like(c, null_label, null_context)

    def pick(n, a):
        return jnp.where(dropped.reshape((-1,) + (1,) * (a.ndim - 1)), n, a)

    return Cond(
        label=None if c.label is None else pick(null.label, c.label),
        context=None if c.context is None else pick(null.context, c.context),
        context_mask=None if c.context_mask is None else pick(null.context_mask, c.context_mask),
        concat=c.concat,
    )


@dataclasses.dataclass(frozen=True)
class Conditioner:
    """How a training batch becomes the network's condition, and what its null side is.

    Attributes:
      num_classes: > 0: class-conditional on `batch["label"]`; the null label is `num_classes`.
      drop_prob: probability of training an example on the null condition (classifier-free
        guidance needs the model to know both sides).
      context_length: > 0: text-conditional on `batch["caption"]`, ids into the caption table
        that the steps get as `frozen` (`prompts.TextSide.table`); L tokens per prompt.
      context_width: D of a frozen encoder's context [B, L, D]; 0: the context is token ids
        [B, L] for a network with its own, jointly trained, encoder.
      spatial: "" or a `spatial.KINDS` condition made from the batch's images and concatenated
        to x_t: "upscale" (the bicubic of the image shrunk by `spatial_factor`), "inpaint" (the
        image with a random mask's region blanked, and the mask).
      spatial_fold: a latent model's autoencoder factor f: the condition, made at the images'
        size, is folded onto the latent grid (`spatial.fold`); 1 for pixel models.
      concat_shape: (H, W, C') of that condition as the network sees it (folded).
    """

    num_classes: int = 0
    drop_prob: float = 0.0
    context_length: int = 0
    context_width: int = 0
    spatial: str = ""
    spatial_factor: int = 0
    spatial_fold: int = 1
    concat_shape: tuple = ()

    @property
    def conditional(self) -> bool:
        """Whether there is a condition to guide by (and a null side to train)."""
        return self.num_classes > 0 or self.context_length > 0

    @property
    def text(self) -> bool:
        return self.context_length > 0

    def example(self, batch: int = 1) -> Cond:
        """A condition of the right structure and shapes, e.g. for initialising the network."""
        label = jnp.zeros((batch,), jnp.int32) if self.num_classes else None
        concat = jnp.zeros((batch, *self.concat_shape), jnp.float32) if self.spatial else None
        if not self.text:
            return Cond(label=label, concat=concat)
        shape = (batch, self.context_length)
        context = (
            jnp.zeros((*shape, self.context_width), jnp.float32)
            if self.context_width
            else jnp.zeros(shape, jnp.int32)
        )
        return Cond(label=label, context=context, context_mask=jnp.ones(shape, bool), concat=concat)

    def labels(self, labels: Array) -> Cond:
        """The condition for given class labels [B] int32 (sampling)."""
        return Cond(label=jnp.asarray(labels, jnp.int32)) if self.num_classes else NONE

    def from_batch(self, batch: dict, frozen: Any = None, key: Array | None = None) -> Cond:
        """The condition of a batch of examples; `frozen` holds the caption table of a text
        model (`prompts.TextSide.table`); `key` draws an inpainting model's masks (default a
        fixed one: evaluation sees the same masks every time)."""
        label = jnp.asarray(batch["label"], jnp.int32) if self.num_classes else None
        concat = self.fold(self.spatial_of(batch["image"], key)) if self.spatial else None
        if not self.text:
            return Cond(label=label, concat=concat)
        ids = batch["caption"]
        return Cond(label=label, context=frozen["context"][ids], context_mask=frozen["mask"][ids],
                    concat=concat)  # fmt: skip

    def fold(self, concat: Array) -> Array:
        """A spatial condition at the images' size → the network's input (`concat_shape`);
        "inpaint_encoded" conditions are made on the latent grid already."""
        if self.spatial == "inpaint_encoded":
            return concat
        return spatial.fold(concat, self.spatial_fold)

    def spatial_of(self, images: Array, key: Array | None = None) -> Array:
        """The spatial condition [B, H, W, C'] of training images [B, H, W, C], at their size
        (`fold` takes it to a latent model's grid)."""
        if self.spatial == "upscale":
            return spatial.upscale_condition(images, self.spatial_factor)
        if self.spatial == "inpaint_encoded":
            raise ValueError(
                "spatial.kind='inpaint_encoded' conditions need the autoencoder: an imported "
                "Stable Diffusion inpainting model samples and edits, it is not trained here yet"
            )
        key = jax.random.key(0) if key is None else key
        mask = spatial.random_masks(key, images.shape[0], images.shape[1:3])
        return spatial.inpaint_condition(images, mask)

    def _null_text(self, frozen: Any) -> Cond | None:
        if not self.text:
            return None
        if frozen is None:
            raise ValueError("a text model's null condition needs its caption table (frozen)")
        return Cond(context=frozen["null_context"][None], context_mask=frozen["null_mask"][None])

    def null(self, c: Cond, frozen: Any = None) -> Cond:
        """The unconditional side of `c` (same batch): the null class, the empty prompt."""
        return null_like(c, self.num_classes, self._null_text(frozen))

    def drop(self, c: Cond, key: Array, frozen: Any = None) -> Cond:
        """`c` with each example replaced by the null condition with probability `drop_prob`."""
        return drop(c, key, self.drop_prob, self.num_classes, self._null_text(frozen))


UNCONDITIONAL = Conditioner()  # the unconditional model's
