"""Tests for diffjax.data: the builders, the catalog loader, the grain pipeline."""

import collections
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from diffjax import data
from diffjax.data import digits as digits_lib
from diffjax.data import image_folder as image_folder_lib


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """A data_dir with `digits` prepared once for the whole session."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.load_source("digits", "train", data_dir)
    return data_dir


@pytest.fixture(scope="session")
def sklearn_digits():
    return digits_lib.load_raw()


class ListSource:
    """A tiny in-memory source: example i has label i and every pixel equal to i."""

    def __init__(self, n, shape=(4, 4, 1)):
        self.n, self.shape = n, shape

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full(self.shape, i, np.uint8), "label": i}


def _write_images(folder, count, rng, modes=("RGB", "L", "RGBA", "P")):
    """Writes `count` random images of varied sizes and modes; returns their RGB arrays by name."""
    os.makedirs(folder, exist_ok=True)
    written = {}
    for i in range(count):
        height, width = rng.integers(6, 30, size=2)
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mode = modes[i % len(modes)]
        image = Image.fromarray(rgb).convert(mode)
        if mode == "RGBA":  # opaque, so flattening onto white leaves the colors alone
            image.putalpha(255)
        name = f"img{i}.png" if mode != "L" else f"img{i}.bmp"
        image.save(os.path.join(folder, name))
        written[name] = np.asarray(image.convert("RGB"))
    return written


# --- digits builder ----------------------------------------------------------------------------


def test_digits_prepares_array_record_without_tensorflow(digits_dir, sklearn_digits):
    assert "tensorflow" not in sys.modules
    builder = data.get_builder("digits", digits_dir)
    assert builder.is_prepared()
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    files = os.listdir(builder.data_dir)
    assert any(".array_record" in f for f in files)
    splits = digits_lib.split_indices(sklearn_digits[1])
    assert builder.info.splits["train"].num_examples == len(splits["train"])
    assert builder.info.splits["test"].num_examples == len(splits["test"])
    assert len(splits["train"]) + len(splits["test"]) == 1797
    assert 1450 <= len(splits["train"]) <= 1550
    # Stratified: every class is in the test split in about the same share.
    test_counts = np.bincount(sklearn_digits[1][splits["test"]], minlength=10)
    assert test_counts.min() >= 25


def test_digits_values_and_labels_match_sklearn(digits_dir, sklearn_digits):
    images, labels = sklearn_digits
    for split, indices in digits_lib.split_indices(labels).items():
        source = data.load_source("digits", split, digits_dir)
        assert len(source) == len(indices)
        assert source.num_classes == 10
        decoded = np.stack([source[i]["image"] for i in range(len(source))])
        assert decoded.shape == (len(indices), 8, 8, 1) and decoded.dtype == np.uint8
        back = np.round(decoded[..., 0].astype(np.float64) * 16 / 255)
        np.testing.assert_array_equal(back, images[indices])
        got_labels = [source[i]["label"] for i in range(len(source))]
        np.testing.assert_array_equal(got_labels, labels[indices])


# --- image_folder builder ----------------------------------------------------------------------


def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    cats = _write_images(tmp_path / "pets" / "cat", 9, rng)
    dogs = _write_images(tmp_path / "pets" / "dog", 12, rng)
    data_dir = str(tmp_path / "tfds")
    folder = str(tmp_path / "pets")
    train = data.load_source("image_folder", "train", data_dir, folder=folder)
    test = data.load_source("image_folder", "test", data_dir, folder=folder)
    assert len(train) + len(test) == 21 and len(test) >= 1
    assert train.num_classes == 2 == data.num_classes("image_folder", data_dir, folder=folder)
    expected = {arr.tobytes(): 0 for arr in cats.values()}
    expected.update({arr.tobytes(): 1 for arr in dogs.values()})
    seen = {}
    for source in (train, test):
        for i in range(len(source)):
            record = source[i]
            assert record["image"].dtype == np.uint8 and record["image"].shape[-1] == 3
            seen[record["image"].tobytes()] = record["label"]
    assert seen == expected  # every image once, losslessly, with its class
    assert train.directory.startswith(os.path.join(data_dir, "image_folder", "pets_"))


def test_image_folder_flat_is_one_class_and_split_is_stable(tmp_path):
    rng = np.random.default_rng(1)
    _write_images(tmp_path / "flat", 40, rng)
    data_dir = str(tmp_path / "tfds")
    folder = str(tmp_path / "flat")
    both = data.load_source("image_folder", "train+test", data_dir, folder=folder)
    assert len(both) == 40 and both.num_classes == 1
    assert {both[i]["label"] for i in range(40)} == {0}
    # The split hangs on each file's relative path alone: adding files moves no old file.
    files = image_folder_lib.scan(folder).files
    more = tuple(sorted(files + tuple(f"new{i}.png" for i in range(20))))
    test = {files[i] for i in image_folder_lib.split_indices(files)["test"]}
    test_after = {more[i] for i in image_folder_lib.split_indices(more)["test"]}
    assert test and test == test_after & set(files)


def test_image_folders_with_same_name_do_not_collide(tmp_path):
    rng = np.random.default_rng(2)
    _write_images(tmp_path / "a" / "imgs", 3, rng)
    _write_images(tmp_path / "b" / "imgs", 5, rng)
    data_dir = str(tmp_path / "tfds")
    first = data.load_source("image_folder", "train+test", data_dir, folder=tmp_path / "a" / "imgs")
    second = data.load_source(
        "image_folder", "train+test", data_dir, folder=tmp_path / "b" / "imgs"
    )
    assert (len(first), len(second)) == (3, 5)
    assert first.directory != second.directory


def test_image_folder_prepares_again_when_files_change(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "grow"
    _write_images(folder, 4, rng)
    data_dir = str(tmp_path / "tfds")
    assert len(data.load_source("image_folder", "train+test", data_dir, folder=folder)) == 4
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(folder / "extra.png")
    assert len(data.load_source("image_folder", "train+test", data_dir, folder=folder)) == 5
    with pytest.raises(data.DatasetError, match="out of date"):
        (folder / "extra.png").unlink()
        data.load_source("image_folder", "train", data_dir, folder=folder, download=False)


def test_corrupt_image_names_the_file(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "bad"
    _write_images(folder, 3, rng)
    good = (folder / "img0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.jpg").write_text("not an image")
    with pytest.raises(data.DatasetError) as error:
        data.load_source("image_folder", "train", str(tmp_path / "tfds"), folder=folder)
    message = str(error.value)
    assert "truncated.png" in message and "notes.jpg" in message and "Remove" in message


def test_missing_or_empty_folder_errors(tmp_path):
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.load_source("image_folder", "train", str(tmp_path), folder=tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(data.DatasetError, match="holds no images"):
        data.load_source("image_folder", "train", str(tmp_path), folder=tmp_path / "empty")
    with pytest.raises(data.DatasetError, match="folder="):
        data.load_source("image_folder", "train", str(tmp_path))


# --- catalog datasets and errors ---------------------------------------------------------------


def test_unknown_dataset_error(tmp_path):
    with pytest.raises(data.DatasetError) as error:
        data.load_source("no_such_dataset", "train", str(tmp_path))
    message = str(error.value)
    assert "'digits'" in message and "'image_folder'" in message and "tfds catalog" in message


def test_catalog_branch_reads_a_prepared_dataset(digits_dir, monkeypatch):
    calls = []
    real_builder = tfds.builder
    monkeypatch.setattr(
        tfds, "builder", lambda name, **kw: calls.append(name) or real_builder(name, **kw)
    )
    source = data.load_source("digits:1.0.0", "test", digits_dir, download=False)
    assert calls == ["digits:1.0.0"]
    reference = data.load_source("digits", "test", digits_dir)
    assert len(source) == len(reference) and source.num_classes == 10
    for i in (0, len(source) - 1):
        np.testing.assert_array_equal(source[i]["image"], reference[i]["image"])
        assert source[i]["label"] == reference[i]["label"]


def test_catalog_dataset_not_prepared_fails_fast_with_instructions(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("with TensorFlow installed, preparing would try to download")
    start = time.monotonic()
    for download in (True, False):
        with pytest.raises(data.DatasetError) as error:
            data.load_source("cifar10", "train", str(tmp_path), download=download)
        message = str(error.value)
        assert "pip install 'diffjax[prepare]'" in message
        assert "download_and_prepare(file_format='array_record')" in message
        assert str(tmp_path) in message
    assert time.monotonic() - start < 10


def test_catalog_dataset_prepared_as_tfrecord_error(digits_dir, tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(digits_dir, data_dir)
    version_dir = data_dir / "digits" / "1.0.0"
    info_path = version_dir / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    for path in version_dir.iterdir():
        path.rename(version_dir / path.name.replace("array_record", "tfrecord"))
    with pytest.raises(data.DatasetError, match="prepared as tfrecord.*file_format='array_record'"):
        data.load_source("digits:1.0.0", "train", str(data_dir))


def test_corrupt_prepared_dataset_names_the_file(digits_dir, tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(digits_dir, data_dir)
    (train_file,) = (data_dir / "digits" / "1.0.0").glob("digits-train.array_record*")
    with open(train_file, "r+b") as f:
        f.truncate(train_file.stat().st_size // 2)
    with pytest.raises(data.DatasetError) as error:
        data.load_source("digits", "train", str(data_dir))
    assert str(train_file) in str(error.value) and "delete" in str(error.value)


def test_unknown_split_error(digits_dir):
    with pytest.raises(data.DatasetError, match="no split 'validation'"):
        data.load_source("digits", "validation", digits_dir)


# --- pipeline ----------------------------------------------------------------------------------


def test_preprocess_image_scaling_crop_and_channels():
    image = np.zeros((6, 10, 3), np.uint8)
    image[:, 2:8] = 255  # the central 6x6 square is white, the side bands black
    out = data.preprocess_image(image, image_size=6, channels=3)
    assert out.dtype == np.float32 and out.shape == (6, 6, 3)
    np.testing.assert_array_equal(out, np.ones((6, 6, 3)))  # center crop, no resize
    gray = data.preprocess_image(np.full((4, 4, 1), 0, np.uint8), image_size=8, channels=3)
    np.testing.assert_array_equal(gray, -np.ones((8, 8, 3)))
    digit = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 4
    out = data.preprocess_image(digit, image_size=8, channels=1)
    np.testing.assert_allclose(out, digit / 127.5 - 1, atol=1e-6)


def test_preprocess_image_resize_filters():
    digit = (np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 4)[..., :1]
    blocks = data.preprocess_image(digit, image_size=16, channels=1, resize="nearest")
    expected = np.repeat(np.repeat(digit / 127.5 - 1, 2, 0), 2, 1)  # exact 2x2 blocks
    np.testing.assert_allclose(blocks, expected, atol=1e-6)
    smooth = data.preprocess_image(digit, image_size=16, channels=1)  # bicubic: not blocks
    assert np.abs(smooth - expected).max() > 0.01
    # box shrinks by averaging: each output pixel is the mean of a 2x2 block (to 8-bit rounding).
    box = data.preprocess_image(digit, image_size=4, channels=1, resize="box")
    means = digit.reshape(4, 2, 4, 2).mean(axis=(1, 3))[..., None]
    np.testing.assert_allclose(box, np.round(means) / 127.5 - 1, atol=1e-6)


def test_train_batches_shapes_dtype_range(digits_dir):
    source = data.load_source("digits", "train", digits_dir)
    for channels in (1, 3):
        iterator = data.make_train_iterator(
            source, image_size=16, channels=channels, global_batch=32, seed=0, random_flip=True
        )
        batch = next(iterator)
        assert batch["image"].shape == (32, 16, 16, channels)
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        assert batch["label"].shape == (32,)
        assert -1 <= batch["image"].min() and batch["image"].max() <= 1
        assert batch["image"].min() < -0.99 and batch["image"].max() > 0.5


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_each_epoch_is_a_new_permutation():
    source = ListSource(12)
    iterator = data.make_train_iterator(
        source, image_size=4, channels=1, global_batch=4, seed=7, random_flip=False
    )
    labels = np.concatenate([b["label"] for b in _take(iterator, 6)])
    first, second = labels[:12], labels[12:]
    assert sorted(first) == sorted(second) == list(range(12))
    assert not np.array_equal(first, second)


def test_random_flip_is_seeded_and_only_mirrors():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 4, 4, 1), dtype=np.uint8)
    source = [{"image": images[i], "label": i} for i in range(20)]
    kwargs = dict(image_size=4, channels=1, global_batch=10, seed=3)
    flipped = _take(data.make_train_iterator(source, random_flip=True, **kwargs), 4)
    again = _take(data.make_train_iterator(source, random_flip=True, **kwargs), 4)
    plain = _take(data.make_train_iterator(source, random_flip=False, **kwargs), 4)
    num_flipped = 0
    for a, b, p in zip(flipped, again, plain, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], p["label"])  # flips never change the order
        for x, y in zip(a["image"], p["image"], strict=True):
            mirrored = np.array_equal(x, y[:, ::-1])
            assert mirrored or np.array_equal(x, y)
            num_flipped += mirrored and not np.array_equal(x, y)
    assert 5 <= num_flipped <= 35


def test_processes_get_disjoint_shards_that_cover_the_data():
    source = ListSource(20)
    per_process = []
    for index in range(2):
        iterator = data.make_train_iterator(
            source,
            image_size=4,
            channels=1,
            global_batch=4,
            seed=0,
            random_flip=False,
            process_index=index,
            process_count=2,
        )
        batches = _take(iterator, 5)  # one epoch of a 10-example shard, 2 per batch
        assert all(b["image"].shape == (2, 4, 4, 1) for b in batches)
        per_process.append(set(np.concatenate([b["label"] for b in batches]).tolist()))
    assert not per_process[0] & per_process[1]
    assert per_process[0] | per_process[1] == set(range(20))
    with pytest.raises(ValueError, match="multiple of the process count"):
        data.make_train_iterator(
            source, image_size=4, channels=1, global_batch=5, seed=0, random_flip=False,
            process_index=0, process_count=2,
        )  # fmt: skip


def test_resume_from_state_continues_bit_exactly(digits_dir):
    source = data.load_source("digits", "train", digits_dir)
    kwargs = dict(image_size=16, channels=3, global_batch=64, seed=5, random_flip=True)
    iterator = data.make_train_iterator(source, **kwargs)
    _take(iterator, 30)  # past the first epoch (1501 / 64 < 24 batches)
    state = json.loads(json.dumps(iterator.get_state()))
    assert state["next_batch"] == 30
    expected = _take(iterator, 4)
    resumed = data.make_train_iterator(source, **kwargs)
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 4), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other_seed = data.make_train_iterator(source, **{**kwargs, "seed": 6})
    with pytest.raises(ValueError, match="seed"):
        other_seed.set_state(state)


def test_resume_under_another_batch_size_continues_at_the_same_example(digits_dir):
    """Batch 64 for 30 batches, then batch 48: the stream of examples goes on unbroken, the same
    as one uninterrupted read (and a version-1 state, batch positions only, reads the same)."""
    source = data.load_source("digits", "train", digits_dir)
    kwargs = dict(image_size=8, channels=1, seed=5, random_flip=True)
    reference = data.make_train_iterator(source, global_batch=16, **kwargs)
    stream = np.concatenate([b["image"] for b in _take(reference, 132)])  # 2112 examples
    iterator = data.make_train_iterator(source, global_batch=64, **kwargs)
    _take(iterator, 30)
    state = json.loads(json.dumps(iterator.get_state()))
    assert state["next_example"] == 30 * 64
    old_state = {k: v for k, v in state.items() if k != "next_example"} | {"version": 1}
    for saved in (state, old_state):
        resumed = data.make_train_iterator(source, global_batch=48, **kwargs)
        resumed.set_state(saved)
        images = np.concatenate([b["image"] for b in _take(resumed, 4)])
        np.testing.assert_array_equal(images, stream[30 * 64 : 30 * 64 + 4 * 48])
        assert resumed.get_state()["next_example"] == 30 * 64 + 4 * 48
    with pytest.raises(ValueError, match="version"):
        resumed.set_state({**state, "version": 9})


class CountingSource:
    """Counts the reads of each record of `source`."""

    def __init__(self, source):
        self.source, self.reads = source, collections.Counter()

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        self.reads[i] += 1
        return self.source[i]


def test_kept_examples_give_the_same_stream_and_read_each_record_once(digits_dir):
    """With `cache_mib` large enough every record is read once, over three epochs and a resume
    under another batch size, and the batches (flips included) are bit-identical to reading
    every time; below the size, nothing is kept."""
    source = data.load_source("digits", "train", digits_dir)
    kwargs = dict(image_size=16, channels=1, seed=5, random_flip=True, resize="nearest")
    reference = _take(data.make_train_iterator(source, global_batch=64, **kwargs), 75)
    counted = CountingSource(source)
    size = data.kept_bytes(source, 16, 1)
    assert size == len(source) * 16 * 16  # uint8 images
    kept = data.make_train_iterator(counted, global_batch=64, cache_mib=size / 2**20, **kwargs)
    batches = _take(kept, 50)  # 3200 examples: over two epochs of 1501
    assert set(counted.reads) == set(range(len(source)))
    # Once each; reader threads may both decode a record asked for twice at once (an epoch's
    # end beside the next one's start), hence the slack.
    assert sum(counted.reads.values()) <= len(source) + 8
    resumed = data.make_train_iterator(counted, global_batch=32, cache_mib=1, **kwargs)
    resumed.set_state(kept.get_state())
    batches += _take(resumed, 50)
    for a, b in zip(reference[:50], batches[:50], strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    tail = np.concatenate([b["image"] for b in batches[50:]])
    np.testing.assert_array_equal(tail, np.concatenate([b["image"] for b in reference[50:]]))
    assert sum(counted.reads.values()) <= 2 * len(source) + 16  # the resumed one keeps its own
    over = CountingSource(source)
    limit = size / 2**20 * 0.99
    _take(data.make_train_iterator(over, global_batch=64, cache_mib=limit, **kwargs), 50)
    assert sum(over.reads.values()) >= 50 * 64  # not kept: every example read


def test_eval_iterator_covers_the_test_split_once(digits_dir):
    source = data.load_source("digits", "test", digits_dir)
    batches = list(data.make_eval_iterator(source, image_size=8, channels=1, batch_size=64))
    assert len(batches) == -(-len(source) // 64)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == len(source) and mask[: len(source)].all()
    labels = np.concatenate([b["label"] for b in batches])[: len(source)]
    np.testing.assert_array_equal(labels, [source[i]["label"] for i in range(len(source))])
    images = np.concatenate([b["image"] for b in batches])[: len(source)]
    expected = np.stack([source[i]["image"] / 127.5 - 1 for i in range(len(source))])
    np.testing.assert_allclose(images, expected, atol=1e-6)


def test_eval_iterator_shards_with_equal_batch_counts():
    source = ListSource(9)
    seen, counts = [], []
    for index in range(2):
        batches = list(
            data.make_eval_iterator(
                source,
                image_size=4,
                channels=1,
                batch_size=8,
                process_index=index,
                process_count=2,
            )  # fmt: skip
        )
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape == (4, 4, 4, 1)
            seen += b["label"][b["mask"]].tolist()
    assert counts == [2, 2]
    assert sorted(seen) == list(range(9))


@pytest.mark.slow
def test_worker_processes_give_the_same_stream(digits_dir):
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    source = data.load_source("digits", "train", digits_dir)
    kwargs = dict(image_size=16, channels=3, global_batch=64, seed=0, random_flip=True)
    threads = _take(data.make_train_iterator(source, **kwargs), 6)
    workers = data.make_train_iterator(source, worker_count=2, **kwargs)
    _take(workers, 2)
    resumed = data.make_train_iterator(source, worker_count=2, **kwargs)
    resumed.set_state(workers.get_state())
    for a, b in zip(threads[2:], _take(resumed, 4), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_upsampling_more_than_twofold_is_warned():
    assert data.upsampling_warning(ListSource(10, (8, 8, 1)), 16) is None  # 2x: fine
    message = data.upsampling_warning(ListSource(10, (2, 3, 1)), 16)
    assert "only 2 px" in message and "8.0x" in message and "data.image_size (<= 4)" in message


def test_processes_preparing_one_dataset_at_once_prepare_it_once(tmp_path):
    # Four processes open the unprepared digits in one data_dir at the same moment: without the
    # preparation lock the later ones die on tfds' "already exists"; with it they wait and read.
    code = (
        "import sys, time; from diffjax.data import load_source\n"
        "while time.time() < float(sys.argv[2]): time.sleep(0.001)\n"
        "print(len(load_source('digits', 'train', sys.argv[1])))\n"
    )
    start = str(time.time() + 8)
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path), start],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.split()[-1] == "1501"
    assert len(os.listdir(tmp_path / "digits")) == 1  # one prepared version, no leftovers
