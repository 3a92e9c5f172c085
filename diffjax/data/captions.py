"""Captions: the digits' phrasings (train and held-out), and the caption table of a dataset.

A dataset's captions are one table of distinct texts; an example refers to its captions by index
(`Captions.choices`), and the training pipeline draws one of them per example per epoch. Text
encoders then work on the table, not on the stream: a frozen encoder encodes each distinct
caption once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# How the digits are captioned in training: a phrasing drawn per example per epoch. {n} is the
# numeral, {word} the number word, {article} "a" or "an".
TRAIN_PHRASINGS = (
    "a handwritten {word}",
    "the digit {n}",
    "{n} written by hand",
    "a handwritten digit {n}",
    "the number {word}",
    "{word}",
    "{article} {word} written by hand",
    "the handwritten number {n}",
)
# Never trained on: the generalisation test (`experiments/text_quality.py`). Some of their words
# never appear in training, so a tokenizer built from the training captions maps them to <unk>.
HELD_OUT_PHRASINGS = (
    "a picture of the numeral {n}",
    "{word}, drawn by hand",
    "an image of a handwritten {word}",
    "the figure {word} scribbled on paper",
)


def digit_caption(label: int, phrasing: str) -> str:
    word = NUMBER_WORDS[label]
    article = "an" if word[0] in "aeiou" else "a"
    return phrasing.format(n=label, word=word, article=article)


@dataclasses.dataclass(frozen=True)
class Captions:
    """The distinct caption texts of a dataset and which of them each example may take.

    Attributes:
      texts: every caption, indexed by caption id.
      choices: record -> the caption ids it may be shown with (one drawn per epoch).
      examples: a few prompts that show what the model does (the training grid's columns).
    """

    texts: tuple[str, ...]
    choices: Callable[[dict], Sequence[int]]
    examples: tuple[str, ...] = ()


def digit_captions(phrasings: Sequence[str] = TRAIN_PHRASINGS) -> Captions:
    """Captions of the digits: every phrasing of every class (id = label · P + phrasing)."""
    texts = tuple(digit_caption(c, p) for c in range(10) for p in phrasings)
    k = len(phrasings)
    choices = lambda record: range(record["label"] * k, (record["label"] + 1) * k)
    return Captions(texts, choices, examples=texts[::k])


def text_captions(texts: Sequence[str]) -> Captions:
    """Captions of a dataset whose records carry their own caption as `record["text"]`."""
    table = tuple(sorted(set(texts)))
    index = {t: i for i, t in enumerate(table)}
    return Captions(table, lambda record: (index[record["text"]],), examples=table[:8])
