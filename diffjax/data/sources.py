"""From a dataset name to a random-access source of {'image', 'label'} records, prepared if needed.

Every dataset is read the same way: a tfds builder prepared as array_record in `data_dir`, opened
with `builder.as_data_source(split)` (random access, decoded with PIL, no TensorFlow). `digits`,
`printed_digits`, `photos` and `image_folder` prepare themselves locally; tfds catalog datasets
(cifar10, celeb_a, mnist, ...) are downloaded and prepared by tfds, which needs TensorFlow
(`pip install 'diffjax[prepare]'`), or copied into `data_dir` already prepared as array_record.

In a multi-process run, prepare once (e.g. on process 0, or beforehand) before every process reads.
"""

import fcntl
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

from diffjax.data.digits import Digits
from diffjax.data.errors import DatasetError
from diffjax.data.image_folder import ImageFolder
from diffjax.data.photos import Photos
from diffjax.data.printed_digits import PrintedDigits

_ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD
_KNOWN = (
    "'digits', 'printed_digits', 'photos', 'image_folder' (with folder=PATH), or any tfds "
    "catalog name (e.g. 'cifar10')"
)


def get_builder(name: str, data_dir: str | os.PathLike, *, folder: str | os.PathLike | None = None):
    """The tfds builder of `name` rooted at `data_dir` (nothing is prepared or read yet).

    Args:
      name: 'digits', 'printed_digits', 'photos' (or 'photos/32'), 'image_folder', or a tfds
        catalog name, optionally with config and version ('celeb_a', 'cifar10:3.0.2').
      data_dir: root directory of prepared datasets.
      folder: the directory of images, for 'image_folder' only.

    Raises:
      DatasetError: unknown name, or `folder` missing/given where it does not belong.
    """
    data_dir = os.path.expanduser(data_dir)
    if name == "image_folder":
        if folder is None:
            raise DatasetError("dataset 'image_folder' needs folder=PATH, the directory of images.")
        return ImageFolder(folder=folder, data_dir=data_dir)
    if folder is not None:
        raise DatasetError(f"folder= is only for the 'image_folder' dataset, not {name!r}.")
    if name == "digits":
        return Digits(data_dir=data_dir)
    if name == "printed_digits":
        return PrintedDigits(data_dir=data_dir)
    if name == "photos":
        return Photos(data_dir=data_dir)
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise DatasetError(f"unknown dataset {name!r}: use {_KNOWN}.") from error
    except ValueError as error:  # e.g. an unknown config or version of a catalog dataset
        raise DatasetError(f"cannot make tfds builder {name!r}: {error}") from error


def _label_key(info) -> str | None:
    """The top-level ClassLabel feature: supervised_keys' label if it is one, else 'label'."""
    features = info.features
    keys = info.supervised_keys
    candidates = ([keys[1]] if isinstance(keys, tuple) and isinstance(keys[1], str) else []) + [
        "label"
    ]
    for key in candidates:
        if key in features and isinstance(features[key], tfds.features.ClassLabel):
            return key
    return None


def _text_key(info) -> str | None:
    """The caption feature: a top-level Text feature named text, caption or captions."""
    for key in ("text", "caption", "captions"):
        if key in info.features and isinstance(info.features[key], tfds.features.Text):
            return key
    return None


def _image_key(info, name: str) -> str:
    """'image' if present, else the only top-level Image feature."""
    images = [k for k, f in info.features.items() if isinstance(f, tfds.features.Image)]
    if "image" in images:
        return "image"
    if len(images) == 1:
        return images[0]
    raise DatasetError(f"dataset {name!r} has no single top-level image feature: {info.features}")


def num_classes(
    name: str, data_dir: str | os.PathLike, *, folder: str | os.PathLike | None = None
) -> int:
    """Number of label classes of a dataset; 1 for datasets without labels (label 0 throughout)."""
    info = get_builder(name, data_dir, folder=folder).info
    key = _label_key(info)
    return info.features[key].num_classes if key else 1


def _prepare_command(name: str, data_dir: str, regenerate: bool = False) -> str:
    mode = "tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS"
    config = (
        f", download_config=tfds.download.DownloadConfig(download_mode={mode})"
        if regenerate
        else ""
    )
    return (
        'python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{name}', data_dir='{data_dir}')"
        f".download_and_prepare(file_format='array_record'{config})\""
    )


def _not_prepared_help(name: str, data_dir: str, builder) -> str:
    return (
        f"To prepare it (this downloads it, and tfds needs TensorFlow to encode its images):\n"
        "  pip install 'diffjax[prepare]'   # adds tensorflow-cpu\n"
        f"  {_prepare_command(name, data_dir)}\n"
        f"or copy in a dataset prepared as array_record elsewhere, to {builder.data_dir}."
    )


def _prepare(builder, name: str, data_dir: str, download: bool):
    """Makes sure `builder` has array_record data on disk, preparing it if allowed.

    Returns:
      The builder to read from (a fresh one where an image folder was prepared again).
    """
    local = isinstance(builder, Digits | ImageFolder | Photos | PrintedDigits)
    stale = isinstance(builder, ImageFolder) and builder.is_stale()
    if builder.is_prepared() and not stale:
        if _ARRAY_RECORD not in builder.info.available_file_formats():
            raise DatasetError(
                f"dataset {name!r} in {builder.data_dir} was prepared as "
                f"{builder.info.file_format.value}, but diffjax reads array_record (random access, "
                "no TensorFlow). Re-prepare it with file_format='array_record' (needs "
                "`pip install 'diffjax[prepare]'`):\n"
                f"  {_prepare_command(name, data_dir, regenerate=True)}\n"
                "or point data_dir at a copy prepared as array_record."
            )
        return builder
    if not download:
        how = (
            "Call again with download=True."
            if local
            else _not_prepared_help(name, data_dir, builder)
        )
        state = "is out of date with its folder" if stale else "is not prepared"
        raise DatasetError(f"dataset {name!r} {state} in {builder.data_dir}. {how}")
    if stale:  # our own copy of a changed folder: delete it, then prepare anew
        builder.data_path.rmtree()
        builder = ImageFolder(config=builder.builder_config, data_dir=data_dir)
    if local:  # no network and no TensorFlow involved
        builder.download_and_prepare(file_format="array_record")
        return builder
    if importlib.util.find_spec("tensorflow") is None:
        raise DatasetError(
            f"dataset {name!r} is not prepared in {builder.data_dir}, and preparing tfds catalog "
            "datasets needs TensorFlow, which is not installed.\n"
            + _not_prepared_help(name, data_dir, builder)
        )
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as error:  # network, manual downloads, disk: all need the user's action
        raise DatasetError(
            f"preparing dataset {name!r} in {builder.data_dir} failed "
            f"({type(error).__name__}: {error}).\n" + _not_prepared_help(name, data_dir, builder)
        ) from error
    return builder


def _prepare_once(name: str, data_dir: str, folder, download: bool):
    """`_prepare` under an exclusive file lock in data_dir when something is to be prepared, so
    processes that start on the same unprepared dataset at once (runs side by side, a cluster's
    hosts on a shared disk) prepare it once: the others wait, then read what the first wrote."""
    builder = get_builder(name, data_dir, folder=folder)
    ready = builder.is_prepared() and not (isinstance(builder, ImageFolder) and builder.is_stale())
    if ready or not download:
        return _prepare(builder, name, data_dir, download)
    try:
        os.makedirs(data_dir, exist_ok=True)
        lock = open(os.path.join(data_dir, f".prepare-{name.replace('/', '_')}.lock"), "w")
    except OSError:  # an unwritable data_dir: preparing says what is wrong
        return _prepare(builder, name, data_dir, download)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        builder = get_builder(name, data_dir, folder=folder)  # what a waited-for process left
        return _prepare(builder, name, data_dir, download)


class RecordSource:
    """Random access to one split as records {'image': uint8 [H, W, C], 'label': int}.

    Attributes:
      name: the dataset name given to `load_source`.
      split: the split read.
      num_classes: number of label classes (1 when the dataset has no labels; label is then 0).
      has_labels: whether the dataset has a ClassLabel feature.
      has_text: whether records carry a caption (`record["text"]`, from a Text feature).
      directory: where the prepared files live.
    """

    def __init__(self, data_source, info, *, name: str, split: str, image_key: str, label_key):
        self._source = data_source
        self._image_key = image_key
        self._label_key = label_key
        self.name, self.split = name, split
        self.num_classes = info.features[label_key].num_classes if label_key else 1
        self.has_labels = label_key is not None
        self._text_key = _text_key(info)
        self.has_text = self._text_key is not None
        instructions = info.splits[split].file_instructions  # one per file, in index order
        self._files = [inst.filename for inst in instructions]
        self._ends = np.cumsum([inst.take for inst in instructions])
        self.directory = os.path.dirname(self._files[0]) if self._files else ""

    def __len__(self) -> int:
        return len(self._source)

    def _record(self, raw) -> dict:
        label = raw[self._label_key] if self._label_key else 0
        record = {"image": raw[self._image_key], "label": int(label)}
        if self._text_key:
            text = raw[self._text_key]
            record["text"] = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        return record

    def texts(self) -> list[str]:
        """Every record's caption, in index order (reads the whole split once)."""
        if not self.has_text:
            raise DatasetError(f"dataset {self.name!r} has no text feature")
        batch = 256
        return [
            r["text"]
            for i in range(0, len(self), batch)
            for r in self.__getitems__(range(i, min(i + batch, len(self))))
        ]

    def _read_error(self, index: int, error: Exception) -> DatasetError:
        shard = int(np.searchsorted(self._ends, index, side="right"))
        path = self._files[min(shard, len(self._files) - 1)]
        return DatasetError(
            f"cannot read example {index} of dataset {self.name!r} split {self.split!r} from "
            f"{path} ({type(error).__name__}: {error}). The prepared files are corrupt or "
            f"incomplete: delete {self.directory} and run again to prepare it afresh, or copy an "
            "intact prepared copy there."
        )

    def __getitem__(self, index: int) -> dict:
        try:
            raw = self._source[index]
        except Exception as error:  # array_record and PIL raise assorted types
            raise self._read_error(index, error) from error
        return self._record(raw)

    def __getitems__(self, indices) -> list[dict]:
        try:
            raws = self._source.__getitems__(list(indices))
        except Exception:  # noqa: BLE001 - find and name the bad example
            return [self[i] for i in indices]
        return [self._record(raw) for raw in raws]

    def check(self) -> None:
        """Reads the first and last example of every file, so damage shows up now, not mid-run."""
        starts = np.concatenate([[0], self._ends[:-1]])
        for start, end in zip(starts, self._ends, strict=True):
            if end > start:
                self[int(start)]
                self[int(end) - 1]

    def __repr__(self) -> str:
        return f"RecordSource({self.name!r}, split={self.split!r}, len={len(self)})"


def load_source(
    name: str,
    split: str,
    data_dir: str | os.PathLike,
    *,
    folder: str | os.PathLike | None = None,
    download: bool = True,
) -> RecordSource:
    """Opens one split of a dataset for random access, preparing it first when needed.

    Args:
      name: 'digits', 'printed_digits', 'photos', 'image_folder', or any tfds catalog name
        ('cifar10', 'celeb_a', 'mnist', optionally 'name/config:version').
      split: a tfds split: 'train', 'test', slices and sums like 'train[:90%]' or 'train+test'.
      data_dir: root of prepared datasets; data goes to <data_dir>/<name>/<config>/<version>/.
      folder: the directory of images, for 'image_folder' only.
      download: prepare the dataset if it is missing (local for the embedded datasets and
        image_folder; a download that needs TensorFlow for catalog datasets). If False, a
        missing dataset is an error.

    Returns:
      A RecordSource; its first and last records per file were read as a check.

    Raises:
      DatasetError: unknown name or split, missing or unpreparable data, corrupt files.
    """
    builder = _prepare_once(name, os.path.expanduser(data_dir), folder, download)
    info = builder.info
    try:
        data_source = builder.as_data_source(split, file_format=_ARRAY_RECORD)
    except (KeyError, ValueError) as error:
        raise DatasetError(
            f"dataset {name!r} has no split {split!r}; it has {list(info.splits)} ({error})."
        ) from error
    source = RecordSource(
        data_source,
        info,
        name=name,
        split=split,
        image_key=_image_key(info, name),
        label_key=_label_key(info),
    )
    source.check()
    return source
