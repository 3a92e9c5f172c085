"""Text → fixed-length token ids: a pretrained BERT-style tokenizer.json, or a word-level
vocabulary built from the training captions (for a jointly trained text encoder)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tokenizers

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """A tokenizer.json cannot be read or does not frame text as [CLS] ... [SEP]."""


class PretrainedTokenizer:
    """Wraps a Hugging Face tokenizer.json: B strings → (tokens [B, L] int32, mask [B, L] bool).

    Every text becomes [CLS] ids... [SEP], right-padded with [PAD] to exactly `max_length` (one
    shape, so compiled programs never retrace). The file's own truncation and padding settings
    (all-MiniLM-L6-v2's pad everything to 128) are switched off and these rules apply instead:
    - a text longer than max_length - 2 word pieces keeps its first max_length - 2 and the
      closing [SEP]; a warning says how many tokens each such text lost;
    - an empty (or all-whitespace) string is allowed and gives [CLS] [SEP]; refusing empty
      prompts is the caller's choice;
    - characters outside the vocabulary become [UNK] (the tokenizer's own normalisation, e.g.
      lowercasing and accent stripping, applies first).
    """

    def __init__(self, path: str | Path, max_length: int = 32):
        """Reads a tokenizer.

        Args:
          path: a tokenizer.json file.
          max_length: L, tokens per text including [CLS] and [SEP]; at least 2.
        """
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for [CLS] and [SEP]")
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} does not exist")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust library raises plain Exception for any bad file
            raise TokenizerError(f"{path} is not a readable tokenizer.json: {err}") from err
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.path = path
        self.max_length = max_length
        self.pad_id = self._special_id(tokenizer, "[PAD]")
        framed = tokenizer.encode("").ids
        want = [self._special_id(tokenizer, "[CLS]"), self._special_id(tokenizer, "[SEP]")]
        if framed != want:
            raise TokenizerError(f"{path} does not frame text as [CLS] ... [SEP] (got {framed})")
        self._tokenizer = tokenizer

    def _special_id(self, tokenizer: tokenizers.Tokenizer, token: str) -> int:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.path} has no {token} token")
        return token_id

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes B strings.

        Args:
          texts: a list of B strings (a bare str is refused, not split into characters).

        Returns:
          tokens [B, max_length] int32 and mask [B, max_length] bool, True at real tokens.
        """
        _check_texts(texts)
        encodings = self._tokenizer.encode_batch(list(texts))
        return frame([e.ids for e in encodings], texts, self.max_length, self.pad_id)


def _check_texts(texts) -> None:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("a tokenizer expects a list of strings")


def frame(
    id_lists: Sequence[Sequence[int]], texts: Sequence[str], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Framed id lists ([CLS] ... [SEP]) → (tokens [B, length] int32, mask [B, length] bool),
    right-padded; a longer list keeps its first length - 1 ids and its closing id, with a
    warning naming each truncated text."""
    tokens = np.full((len(id_lists), length), pad_id, np.int32)
    mask = np.zeros((len(id_lists), length), bool)
    dropped = []
    for i, ids in enumerate(id_lists):
        ids = list(ids)
        if len(ids) > length:
            dropped.append(f"text {i} ({texts[i][:30]!r}...) lost {len(ids) - length} token(s)")
            ids = ids[: length - 1] + ids[-1:]  # keep the closing [SEP]
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = True
    if dropped:
        log.warning(
            "%d text(s) longer than max_length=%d tokens were truncated: %s",
            len(dropped),
            length,
            "; ".join(dropped),
        )
    return tokens, mask


WORD = re.compile(r"\w+|[^\w\s]+")  # words, and runs of punctuation (like tokenizers' Whitespace)
SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")


class WordTokenizer:
    """A word-level vocabulary of the training captions, for a jointly trained text encoder.

    Text is lowercased and split into words and punctuation runs; a word that never occurs in
    the training captions becomes [UNK] (so a prompt in other words than the captions' loses
    them). Framing, padding and truncation as `PretrainedTokenizer`: [CLS] words [SEP].
    """

    def __init__(self, words: Sequence[str], max_length: int = 16):
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for [CLS] and [SEP]")
        self.words = tuple(words)
        self.max_length = max_length
        self.vocab = {w: i for i, w in enumerate(SPECIALS + self.words)}
        self.pad_id, self.cls_id, self.sep_id, self.unk_id = range(4)

    @classmethod
    def from_texts(cls, texts: Sequence[str], max_length: int = 16) -> WordTokenizer:
        """The vocabulary of `texts`, sorted (the same texts always give the same ids)."""
        return cls(sorted({w for t in texts for w in WORD.findall(t.lower())}), max_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def ids(self, text: str) -> list[int]:
        words = WORD.findall(text.lower())
        return [self.cls_id, *(self.vocab.get(w, self.unk_id) for w in words), self.sep_id]

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """B strings → (tokens [B, max_length] int32, mask [B, max_length] bool)."""
        _check_texts(texts)
        return frame([self.ids(t) for t in texts], texts, self.max_length, self.pad_id)

    def save(self, path: str | Path) -> None:
        with open(path, "w") as f:
            json.dump({"words": list(self.words), "max_length": self.max_length}, f)

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        try:
            with open(path) as f:
                spec = json.load(f)
            return cls(spec["words"], spec["max_length"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise TokenizerError(f"cannot read the word vocabulary {path}: {err}") from err
