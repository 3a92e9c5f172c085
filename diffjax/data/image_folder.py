"""TFDS builder `image_folder`: a user's directory of images, optionally one subfolder per class."""

import dataclasses
import hashlib
import io
import json
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from diffjax.data.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Share of the images held out as 'test', picked by a hash of each file's path relative to the
# folder: the split survives moving the folder and adding files (old files keep their split).
TEST_FRACTION = 0.05
# Captions, as Hugging Face image folders keep them: one JSON object per line with the image's
# path relative to the folder ("file_name") and its caption ("text").
METADATA_FILE = "metadata.jsonl"


@dataclasses.dataclass(frozen=True)
class Listing:
    """The images found under a folder.

    Attributes:
      root: absolute path of the folder.
      files: image paths relative to `root`, sorted.
      labels: class index of each file (0 for every file when the images sit directly in `root`).
      class_names: sorted subfolder names, or the folder's own name when there are no subfolders.
      texts: each file's caption from metadata.jsonl, or None when the folder has none.
    """

    root: str
    files: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    texts: tuple[str, ...] | None = None

    def fingerprint(self) -> str:
        """A hash of every file's relative path, size and modification time (and the captions')."""
        digest = hashlib.sha256()
        extra = (METADATA_FILE,) if self.texts is not None else ()
        for rel in self.files + extra:
            stat = os.stat(os.path.join(self.root, rel))
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(root: str, subdir: str) -> list[str]:
    """Image paths under root/subdir (recursive, hidden entries skipped), relative to root."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, subdir)):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        found += [os.path.normpath(os.path.join(rel_dir, f)) for f in filenames if _is_image(f)]
    return sorted(found)


def scan(folder: str | os.PathLike) -> Listing:
    """Lists the images of `folder`: one class per subfolder, or a single class if flat.

    Raises:
      DatasetError: the folder is missing, holds no images, or mixes top-level images with
        class subfolders.
    """
    root = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(root):
        raise DatasetError(f"image folder {root!r} does not exist or is not a directory.")
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    top_files = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(root, e))]
    classes = {}
    for entry in entries:
        if os.path.isdir(os.path.join(root, entry)) and (files := _images_under(root, entry)):
            classes[entry] = files
    if top_files and classes:
        raise DatasetError(
            f"image folder {root!r} has images at its top level and class subfolders "
            f"({', '.join(classes)}): move the top-level images into a subfolder of their class, "
            "or put all images directly in the folder for a single class."
        )
    if not top_files and not classes:
        raise DatasetError(
            f"image folder {root!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}, "
            "directly inside it or in one subfolder per class)."
        )
    if top_files:
        files, labels, names = top_files, [0] * len(top_files), (os.path.basename(root),)
    else:
        files, labels = [], []
        for label, name in enumerate(classes):
            files += classes[name]
            labels += [label] * len(classes[name])
        names = tuple(classes)
    texts = read_captions(root, files)
    return Listing(root, tuple(files), tuple(labels), names, texts)


def read_captions(root: str, files: list[str]) -> tuple[str, ...] | None:
    """Each file's caption from `<root>/metadata.jsonl`, or None when there is no such file.

    Raises:
      DatasetError: a line is not a JSON object with string "file_name" and "text", or some
        images have no caption (listed, so they can be added), or a caption names no image.
    """
    path = os.path.join(root, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    captions = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name, text = entry["file_name"], entry["text"]
                if not isinstance(name, str) or not isinstance(text, str):
                    raise TypeError("file_name and text must be strings")
            except (ValueError, KeyError, TypeError) as err:
                raise DatasetError(
                    f'{path}, line {number}: not a JSON object with "file_name" and "text" '
                    f"({type(err).__name__}: {err})"
                ) from None
            captions[os.path.normpath(name)] = text
    missing = [f for f in files if f not in captions]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise DatasetError(
            f"{path} has no caption for {len(missing)} of the {len(files)} images ({shown}): "
            f'add a line {{"file_name": ..., "text": ...}} for each, or remove the file'
        )
    unknown = sorted(set(captions) - set(files))
    if unknown:
        raise DatasetError(
            f"{path} captions {len(unknown)} file(s) that are not images of the folder "
            f"({', '.join(unknown[:5])}); fix their file_name"
        )
    return tuple(captions[f] for f in files)


def _hash_unit(text: str) -> float:
    """A deterministic number in [0, 1) from a string (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def split_indices(files: tuple[str, ...]) -> dict[str, list[int]]:
    """Indices of `files` in each split, ascending.

    'test' holds the files whose path hash falls below TEST_FRACTION, at least one when there are
    two or more files, never all of them; 'train' holds the rest. One file: no 'test' split.
    """
    by_hash = sorted(range(len(files)), key=lambda i: _hash_unit(files[i]))
    num_test = sum(_hash_unit(f) < TEST_FRACTION for f in files)
    num_test = min(max(num_test, 1), len(files) - 1)
    test = sorted(by_hash[:num_test])
    train = sorted(set(range(len(files))) - set(test))
    return {"train": train, "test": test} if test else {"train": train}


def load_png(path: str) -> bytes:
    """Reads any PIL-readable image file as RGB and re-encodes it as PNG bytes.

    Raises:
      DatasetError: the file cannot be decoded; the message names it and says how to fix it.
    """
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I;16") or image.mode == "I":
                image = Image.fromarray((np.asarray(image, np.uint32) >> 8).astype(np.uint8))
            if "A" in image.getbands() or "transparency" in image.info:
                rgba = image.convert("RGBA")  # flatten transparency onto white
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            image = image.convert("RGB")
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
    except Exception as error:  # PIL raises many types for corrupt or truncated files
        raise DatasetError(
            f"cannot read image {path!r} ({type(error).__name__}: {error}). Remove or replace "
            "this file (e.g. move it out of the image folder), then run again."
        ) from error
    return buffer.getvalue()


def config_name(root: str) -> str:
    """A short, readable, collision-resistant name for a folder: `<basename>_<hash of path>`."""
    base = re.sub(r"[^a-z0-9]+", "_", os.path.basename(root).lower()).strip("_")[:40]
    return f"{base or 'root'}_{hashlib.sha256(root.encode()).hexdigest()[:12]}"


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
    """One folder's config; `name` is `config_name(folder)`, so each folder prepares apart."""

    folder: str = ""


class ImageFolder(tfds.core.GeneratorBasedBuilder):
    """Images of one folder as RGB PNG, labels from class subfolders.

    Prepared under `<data_dir>/image_folder/<basename>_<hash of absolute path>/1.0.0`. Splits:
    'train' and a held-out 'test' (see `split_indices`); 'train+test' reads every image.
    `info.metadata['fingerprint']` records the listing the data was prepared from.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(
        self, *, folder: str | os.PathLike | None = None, config=None, data_dir=None, version=None
    ):
        if config is None:
            if folder is None:
                raise DatasetError("image_folder needs the folder of images (folder=...).")
            root = os.path.abspath(os.path.expanduser(folder))
            config = ImageFolderConfig(
                name=config_name(root), folder=root, description=f"Images under {root}"
            )
        self.listing = scan(config.folder)
        super().__init__(config=config, data_dir=data_dir, version=version)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f"Images under {self.listing.root}",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=self.listing.class_names),
                    **({"text": tfds.features.Text()} if self.listing.texts is not None else {}),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def is_stale(self) -> bool:
        """Whether a prepared copy exists but the folder's files have changed since."""
        return self.is_prepared() and (
            self.info.metadata.get("fingerprint") != self.listing.fingerprint()
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the images are local
        self.info.metadata["fingerprint"] = self.listing.fingerprint()
        self.info.metadata["folder"] = self.listing.root
        return {
            split: self._generate_examples(indices)
            for split, indices in split_indices(self.listing.files).items()
        }

    def _generate_examples(self, indices):
        unreadable = []  # report every bad file of the split at once, not one per attempt
        for i in indices:
            rel = self.listing.files[i]
            try:
                image = load_png(os.path.join(self.listing.root, rel))
            except DatasetError as error:
                unreadable.append(str(error))
                continue
            example = {"image": image, "label": self.listing.labels[i]}
            if self.listing.texts is not None:
                example["text"] = self.listing.texts[i]
            yield rel, example
        if unreadable:
            shown = "\n  ".join(unreadable[:20])
            more = f"\n  ... and {len(unreadable) - 20} more" if len(unreadable) > 20 else ""
            raise DatasetError(
                f"{len(unreadable)} image(s) under {self.listing.root!r} cannot be read:\n  "
                f"{shown}{more}"
            )
