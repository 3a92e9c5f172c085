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


# CLIP's pre-tokenization (Radford et al. 2021): the two specials, English contractions, runs of
# letters, single digits, runs of other non-space characters; whitespace is dropped.
CLIP_SPLIT = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
CLIP_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
CLIP_SPECIALS["pad_token"] = "<|endoftext|>"


class ClipTokenizer:
    """CLIP's byte-level BPE, as Stable Diffusion's `tokenizer/` folder holds it: B strings →
    (tokens [B, L] int32, mask [B, L] bool), L = `max_length` (the folder's model_max_length,
    77 for SD).

    Read from vocab.json + merges.txt (SD's own folders), else from tokenizer.json. Each text is
    NFC-normalised, whitespace runs collapsed, lowercased, split as CLIP splits it, byte-mapped
    and BPE-merged with the end-of-word mark "</w>"; then framed as <|startoftext|> ...
    <|endoftext|>, cut to L (keeping the closing token, with a warning) and right-padded with the
    folder's pad token. Stable Diffusion's U-Net attends to every one of the L positions, padding
    included, so the mask is all True.
    """

    def __init__(self, directory: str | Path, max_length: int | None = None):
        directory = Path(directory)
        if not directory.is_dir():
            raise TokenizerError(f"CLIP tokenizer directory {directory} does not exist")
        settings = {**CLIP_SPECIALS, "model_max_length": 77}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            settings.update(_special_tokens(directory / name))
        vocab, merges = directory / "vocab.json", directory / "merges.txt"
        if vocab.is_file() and merges.is_file():
            tokenizer = _clip_bpe(vocab, merges)
        elif (directory / "tokenizer.json").is_file():
            try:
                tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as err:  # the Rust library raises plain Exception for any bad file
                raise TokenizerError(f"{directory}/tokenizer.json is not readable: {err}") from err
            tokenizer.post_processor = None  # framed below, the same way for both forms
        else:
            raise TokenizerError(
                f"{directory} has neither vocab.json + merges.txt nor tokenizer.json"
            )
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.path = directory
        self.max_length = int(max_length or settings["model_max_length"])
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} leaves no room for the two specials")
        ids = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            ids[key] = tokenizer.token_to_id(settings[key])
            if ids[key] is None:
                raise TokenizerError(f"{directory}: its vocabulary lacks {key} {settings[key]!r}")
        self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]
        self.vocab_size = tokenizer.get_vocab_size()

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        _check_texts(texts)
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        framed = [[self.bos_id, *e.ids, self.eos_id] for e in encodings]
        tokens, mask = frame(framed, texts, self.max_length, self.pad_id)
        return tokens, np.ones_like(mask)


def _special_tokens(path: Path) -> dict:
    """The special tokens and model_max_length a tokenizer folder's JSON file sets (if any)."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{path} is not readable JSON: {err}") from err
    out = {}
    for key in (*CLIP_SPECIALS, "model_max_length"):
        value = content.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value is not None and (key != "model_max_length" or value < 10**6):
            out[key] = value
    return out


def _clip_bpe(vocab_file: Path, merges_file: Path) -> tokenizers.Tokenizer:
    from tokenizers import Regex, models, normalizers, pre_tokenizers

    try:
        vocab = json.loads(vocab_file.read_text())
        lines = merges_file.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as err:
        raise TokenizerError(
            f"{vocab_file.parent}: vocab.json or merges.txt unreadable: {err}"
        ) from err
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    if any(len(m) != 2 for m in merges):
        raise TokenizerError(f"{merges_file}: every line must be one pair of symbols")
    try:
        model = models.BPE(
            vocab,
            merges,
            unk_token=CLIP_SPECIALS["eos_token"],
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
        )
    except Exception as err:  # e.g. a merge whose symbols are not in the vocabulary
        raise TokenizerError(f"{vocab_file.parent}: not a BPE vocabulary: {err}") from err
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tokenizer
