"""Prompts → conditions: the text side of a model (tokenizer, encoder) behind one interface."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)
ENCODE_CHUNK = 256  # captions encoded per call when a caption table is built


@dataclasses.dataclass(frozen=True)
class TextSide:
    """How text reaches the network.

    Attributes:
      tokenize: B strings → (tokens [B, L] int32, mask [B, L] bool), fixed L.
      encode: None for an encoder trained with the U-Net (the context is then the token ids,
        which the network encodes itself); else a frozen encoder, (tokens, mask) → context
        [B, L, D], jitted, its parameters held inside (never trained, never checkpointed).
    """

    tokenize: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]
    encode: Callable[[Any, Any], Any] | None = None

    def context(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The (context, mask) of B texts, computed once (not once per step)."""
        tokens, mask = self.tokenize(list(texts))
        if self.encode is None:
            return tokens, mask
        return np.asarray(self.encode(tokens, mask)), mask

    def table(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Every caption's context, and the empty prompt's (the null side of guidance): the
        training steps' `frozen` argument, so each distinct caption is encoded once."""
        parts = [
            self.context(texts[i : i + ENCODE_CHUNK]) for i in range(0, len(texts), ENCODE_CHUNK)
        ]
        null_context, null_mask = self.context([""])
        if self.encode is not None:
            log.info("encoded %d distinct captions once, with the frozen text encoder", len(texts))
        return {
            "context": np.concatenate([c for c, _ in parts]),
            "mask": np.concatenate([m for _, m in parts]),
            "null_context": null_context[0],
            "null_mask": null_mask[0],
        }


def frozen_encoder(encoder, params) -> Callable:
    """A jitted `(tokens, mask) -> context` of a `models.text.TextEncoder` and its params."""
    params = jax.device_put(params)
    fn = jax.jit(encoder.encode)
    return lambda tokens, mask: fn(params, jnp.asarray(tokens), jnp.asarray(mask))[0]
