"""Tests for the `photos` builder: offline, deterministic random crops, whole photos held out."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import record_digests

from diffjax import data
from diffjax.data import photos as photos_lib


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory):
    """A data_dir with `photos` (64x64) prepared once for the whole session."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.get_builder("photos", data_dir).download_and_prepare(file_format="array_record")
    return data_dir


def _sources(data_dir, split):
    """The `source` of every example of `split`, read straight from the prepared files."""
    raw = data.get_builder("photos", data_dir).as_data_source(split)
    return [r["source"].decode() for r in raw.__getitems__(range(len(raw)))]


def _digests(data_dir):
    """sha256 of each array_record file of the prepared 64x64 data."""
    return record_digests(data.get_builder("photos", data_dir))


def test_prepares_array_record_offline_with_the_planned_counts(photos_dir):
    assert "tensorflow" not in sys.modules
    builder = data.get_builder("photos", photos_dir)
    assert builder.is_prepared()
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    planned = builder.info.metadata["photos"]
    for split in ("train", "test"):
        assert sorted(planned[split]) == sorted(photos_lib.PHOTOS[split])  # all bundled here
        expected = photos_lib.CROPS_PER_PHOTO[split] * len(planned[split])
        assert builder.info.splits[split].num_examples == expected
    assert 2000 <= builder.info.splits["train"].num_examples <= 5000
    assert 200 <= builder.info.splits["test"].num_examples <= 1000


def test_train_and_test_come_from_disjoint_photos(photos_dir):
    train, test = _sources(photos_dir, "train"), _sources(photos_dir, "test")
    assert set(train) == set(photos_lib.PHOTOS["train"])
    assert set(test) == set(photos_lib.PHOTOS["test"])
    assert not set(train) & set(test)
    # Nor are the files shared under another name (motorcycle_right, say, would be a near copy).
    files = {s: set(photos_lib.PHOTOS[s].values()) for s in ("train", "test")}
    assert not files["train"] & files["test"]
    # Equal crops per photo: no photo dominates its split.
    _, counts = np.unique(train, return_counts=True)
    assert set(counts) == {photos_lib.CROPS_PER_PHOTO["train"]}


def test_crops_through_load_source(photos_dir):
    source = data.load_source("photos", "test", photos_dir, download=False)
    assert len(source) == photos_lib.CROPS_PER_PHOTO["test"] * len(photos_lib.PHOTOS["test"])
    assert not source.has_labels and not source.has_text and source.num_classes == 1
    records = source.__getitems__(range(0, len(source), 37))
    images = np.stack([r["image"] for r in records])
    assert images.shape[1:] == (64, 64, 3) and images.dtype == np.uint8
    assert {r["label"] for r in records} == {0}
    # Real photo content, not blank background: each crop varies in some channel.
    assert images.reshape(len(images), -1, 3).std(axis=1).max(axis=1).min() >= photos_lib.MIN_STD
    # And different crops differ.
    assert len({image.tobytes() for image in images}) == len(images)


def test_crops_at_native_scale_are_exact_windows_and_blank_photos_fail():
    """With min(H, W) = 2 * size the only side is `size`: each crop is a window, unresampled."""
    rows, cols = np.meshgrid(np.arange(128), np.arange(128), indexing="ij")
    noise = np.random.default_rng(0).integers(0, 256, (128, 128))
    photo = np.stack([rows, cols, noise], axis=-1).astype(np.uint8)  # pixels name their place
    crops = photos_lib.random_crops(photo, 20, 64, np.random.default_rng(1))
    assert crops.shape == (20, 64, 64, 3) and crops.dtype == np.uint8
    for crop in crops:
        top, left = int(crop[0, 0, 0]), int(crop[0, 0, 1])
        np.testing.assert_array_equal(crop, photo[top : top + 64, left : left + 64])
    assert len({(int(c[0, 0, 0]), int(c[0, 0, 1])) for c in crops}) > 10
    with pytest.raises(data.DatasetError, match="non-blank"):
        photos_lib.random_crops(np.zeros((128, 128, 3), np.uint8), 4, 64, np.random.default_rng(0))


def test_two_preparations_are_identical(photos_dir, tmp_path):
    again = str(tmp_path / "again")
    data.get_builder("photos", again).download_and_prepare(file_format="array_record")
    assert _digests(again) == _digests(photos_dir)
    assert len(_digests(again)) == 2


def test_load_source_prepares_when_missing(tmp_path):
    source = data.load_source("photos/32", "train", str(tmp_path))
    assert len(source) == photos_lib.CROPS_PER_PHOTO["train"] * len(photos_lib.PHOTOS["train"])
    assert source[0]["image"].shape == (32, 32, 3)


def test_missing_photos_are_skipped_and_an_empty_split_is_an_error(monkeypatch, tmp_path):
    """Only files already on disk are read: a photo absent from scikit-image is skipped."""
    present = tmp_path / "skimage_data"
    present.mkdir()
    (present / "chelsea.png").write_bytes(b"")  # an existing file is all find_photos checks
    monkeypatch.setattr(photos_lib, "photo_dirs", lambda: [str(present)])
    assert photos_lib.find_photos("test") == {"chelsea": str(present / "chelsea.png")}
    with pytest.raises(data.DatasetError, match="reinstall scikit-image"):
        photos_lib.find_photos("train")
