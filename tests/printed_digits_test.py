"""Tests for the `printed_digits` builder: offline, deterministic, shaped like `digits`, and a
different style of the same ten classes."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import record_digests

from diffjax import data
from diffjax.data import digits as digits_lib
from diffjax.data import printed_digits as printed_lib
from diffjax.data.printed_digits import PrintedDigits

_SPLITS = ("train", "test")


@pytest.fixture(scope="module")
def printed_dir(tmp_path_factory):
    """A data_dir with `printed_digits` prepared once for this module."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.get_builder("printed_digits", data_dir).download_and_prepare(file_format="array_record")
    return data_dir


@pytest.fixture(scope="module")
def printed(printed_dir):
    """{split: (images uint8 [N, 8, 8, 1], labels int [N])} read back from the prepared files."""
    builder = data.get_builder("printed_digits", printed_dir)
    out = {}
    for split in _SPLITS:
        raw = builder.as_data_source(split)
        records = raw.__getitems__(range(len(raw)))
        out[split] = (
            np.stack([r["image"] for r in records]),
            np.array([int(r["label"]) for r in records]),
        )
    return out


def _levels(images: np.ndarray) -> np.ndarray:
    """uint8 images back to digits' 0..16 grid (exact for values on it, see digits.to_uint8)."""
    return np.round(images.astype(np.float64) * 16 / 255).astype(np.int64)


def _digests(data_dir):
    """sha256 of each array_record file of the prepared data."""
    return record_digests(data.get_builder("printed_digits", data_dir))


def test_prepares_balanced_splits_without_tensorflow(printed_dir, printed):
    assert "tensorflow" not in sys.modules
    builder = data.get_builder("printed_digits", printed_dir)
    assert isinstance(builder, PrintedDigits) and builder.name == "printed_digits"
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert builder.info.features["label"].num_classes == 10
    for split in _SPLITS:
        _, labels = printed[split]
        assert builder.info.splits[split].num_examples == printed_lib.SPLIT_SIZES[split]
        counts = np.bincount(labels, minlength=10)
        assert counts.min() == counts.max() == printed_lib.SPLIT_SIZES[split] // 10
    # Sized like digits (1501 / 296).
    assert 1450 <= len(printed["train"][1]) <= 1550 and 250 <= len(printed["test"][1]) <= 350


def test_images_are_8x8_uint8_on_the_17_levels_of_digits(printed):
    for split in _SPLITS:
        images, _ = printed[split]
        assert images.shape[1:] == (8, 8, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(digits_lib.to_uint8(_levels(images)), images)
        # White ink on black, reaching full white, with a blank border like sklearn's digits.
        assert images.max() == 255 and np.median(images) == 0
        assert (images[:, :, 0].mean() < 10) and (images[:, :, -1].mean() < 10)


def test_two_preparations_are_identical(printed_dir, tmp_path):
    again = str(tmp_path / "again")
    data.load_source("printed_digits", "train", again)  # prepares locally, as digits does
    assert _digests(again) == _digests(printed_dir)
    assert len(_digests(again)) == 2


def test_no_image_repeats_within_or_across_splits(printed):
    train = {image.tobytes() for image in printed["train"][0]}
    test = {image.tobytes() for image in printed["test"][0]}
    assert len(train) == len(printed["train"][0]) and len(test) == len(printed["test"][0])
    assert not train & test


def test_each_printed_class_is_recognisable(printed):
    """A nearest-class-mean classifier fitted on printed train labels printed test correctly."""
    (train, train_labels), (test, test_labels) = printed["train"], printed["test"]
    train = _levels(train).reshape(len(train), -1).astype(np.float64)
    test = _levels(test).reshape(len(test), -1).astype(np.float64)
    means = np.stack([train[train_labels == c].mean(axis=0) for c in range(10)])
    predicted = ((test[:, None, :] - means[None]) ** 2).sum(axis=-1).argmin(axis=1)
    accuracy = (predicted == test_labels).mean()
    assert accuracy >= 0.9, accuracy  # 0.937 when written; the same classifier on digits: 0.909
    per_class = [(predicted[test_labels == c] == c).mean() for c in range(10)]
    assert min(per_class) >= 0.6, per_class


def test_strokes_differ_from_handwritten_digits(printed):
    """The domains differ in style: handwritten strokes fill whole 8x8 cells (value 16) about
    three times as often as the thinner, anti-aliased printed strokes do."""
    handwritten, _ = digits_lib.load_raw()
    printed_levels = _levels(printed["train"][0])[..., 0]
    saturated = {"printed": (printed_levels == 16).mean(), "hand": (handwritten == 16).mean()}
    assert saturated["printed"] < 0.5 * saturated["hand"], saturated
    # Per image: most handwritten digits have a full cell, about half of printed ones have none.
    no_full_cell = {
        "printed": ((printed_levels == 16).sum(axis=(1, 2)) == 0).mean(),
        "hand": ((handwritten == 16).sum(axis=(1, 2)) == 0).mean(),
    }
    assert no_full_cell["printed"] > 0.3 and no_full_cell["hand"] < 0.1, no_full_cell
    # ... yet framed alike: both fill most of the frame's height, inked about as much.
    height = {
        "printed": (printed_levels > 2).any(axis=2).sum(axis=1).mean(),
        "hand": (handwritten > 2).any(axis=2).sum(axis=1).mean(),
    }
    assert height["printed"] >= 7 and height["hand"] >= 7, height
    assert 0.6 < printed_levels.mean() / handwritten.mean() < 1.2


def test_render_digit_follows_its_arguments():
    plain = printed_lib.render_digit(1, scale=1.0, angle=0.0, stroke=0, offset=(0, 0))
    assert (
        plain.shape == (8, 8) and plain.dtype == np.int64 and 0 <= plain.min() <= plain.max() <= 16
    )
    bold = printed_lib.render_digit(1, scale=1.0, angle=0.0, stroke=2, offset=(0, 0))
    assert bold.sum() > plain.sum() * 1.2  # a stroke thickens the glyph
    right = printed_lib.render_digit(1, scale=1.0, angle=0.0, stroke=0, offset=(0, 8))
    np.testing.assert_array_equal(right[:, 1:], plain[:, :-1])  # 8 render pixels: one column


def test_without_freetype_preparing_fails_clearly(monkeypatch):
    monkeypatch.setattr(printed_lib.features, "check", lambda feature: False)
    with pytest.raises(data.DatasetError, match="without FreeType"):
        printed_lib.render_digit(3, scale=1.0, angle=0.0, stroke=0, offset=(0, 0))


def test_load_source_reads_it(printed_dir, printed):
    source = data.load_source("printed_digits", "test", printed_dir, download=False)
    assert len(source) == printed_lib.SPLIT_SIZES["test"]
    assert source.has_labels and source.num_classes == 10 and not source.has_text
    record = source[7]
    assert record["label"] == 7 and record["image"].shape == (8, 8, 1)
    np.testing.assert_array_equal(record["image"], printed["test"][0][7])
    assert data.num_classes("printed_digits", printed_dir) == 10
