"""TFDS builder `photos`: random square crops of the colour photos bundled with scikit-image."""

import dataclasses
import logging
import os
import zlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from diffjax.data.digits import png_bytes
from diffjax.data.errors import DatasetError

# Photo name -> file inside scikit-image's package data folder. Only colour photographs that ship
# in the scikit-image wheel: the grey ones (camera, coins, moon, ...) are left out, so every crop
# carries real colour statistics for an RGB autoencoder rather than R = G = B. The split holds out
# whole photographs, so 'test' measures how a model does on pictures it has never seen a crop of.
# motorcycle_right.png is left out: it is the stereo twin of motorcycle_left.png.
PHOTOS = {
    "train": {
        "astronaut": "astronaut.png",
        "rocket": "rocket.jpg",
        "motorcycle": "motorcycle_left.png",
        "immunohistochemistry": "ihc.png",
        "retina": "retina.jpg",
        "hubble_deep_field": "hubble_deep_field.jpg",
    },
    "test": {"chelsea": "chelsea.png", "coffee": "coffee.png"},
}
# The same number of crops from each photo, so large photos (retina, 1411x1411) do not dominate.
CROPS_PER_PHOTO = {"train": 512, "test": 256}
# A crop's side is drawn log-uniformly from [size, min(MAX_ZOOM * size, min(H, W) // 2)], then
# resized to size x size: the same photo shows up at native resolution and up to MAX_ZOOM times
# reduced, and no crop covers more than a quarter of its photo.
MAX_ZOOM = 4
# Crops whose every channel has a standard deviation below this (on 0..255) are drawn again: they
# are blank background (the black corners of retina), which teaches a model nothing.
MIN_STD = 2.0
_MAX_DRAWS = 10  # draws per kept crop before a photo is declared too blank to crop
SEED = 0


def photo_dirs() -> list[str]:
    """Where scikit-image keeps its photos: the wheel's own data folder, then its download cache.

    Only these folders are read; scikit-image's fetchers (which may try the network through
    pooch) are never called, so preparing never waits on a download.
    """
    import skimage.data  # lazy: only needed to prepare

    dirs = [os.path.dirname(skimage.data.__file__), skimage.data.data_dir]
    return list(dict.fromkeys(os.path.abspath(d) for d in dirs))


def find_photos(split: str) -> dict[str, str]:
    """The photos of `split` present on this machine, as {name: path}; missing ones are logged.

    Raises:
      DatasetError: none of the split's photos is present.
    """
    dirs = photo_dirs()
    found, missing = {}, []
    for name, filename in PHOTOS[split].items():
        paths = [
            os.path.join(d, filename) for d in dirs if os.path.isfile(os.path.join(d, filename))
        ]
        if paths:
            found[name] = paths[0]
        else:
            missing.append(filename)
    if missing:
        logging.warning("photos: %s not in %s; preparing without them.", ", ".join(missing), dirs)
    if not found:
        raise DatasetError(
            f"photos: none of the {split!r} photos ({', '.join(missing)}) is in {dirs}; "
            "reinstall scikit-image (pip install --force-reinstall scikit-image)."
        )
    return found


def load_photo(path: str) -> np.ndarray:
    """Reads a photo as uint8 [H, W, 3] (an alpha channel, if any, is dropped)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as error:
        raise DatasetError(f"photos: cannot read {path} ({error}).") from error


def random_crops(photo: np.ndarray, count: int, size: int, rng: np.random.Generator):
    """Draws `count` random square crops, each resized to [size, size, 3] uint8.

    Args:
      photo: uint8 [H, W, 3], with min(H, W) >= 2 * size.
      count: how many crops to keep.
      size: side of the output crops.
      rng: the source of randomness (a fixed seed makes the crops reproducible).

    Returns:
      uint8 [count, size, size, 3].
    """
    height, width, _ = photo.shape
    max_side = min(MAX_ZOOM * size, min(height, width) // 2)
    if max_side < size:
        raise DatasetError(f"photos: a {height}x{width} photo is too small for {size}px crops.")
    crops = []
    for _ in range(_MAX_DRAWS * count):
        # floor(exp(U[log a, log(b + 1)))) is an integer in [a, b], log-uniform up to rounding.
        side = int(np.exp(rng.uniform(np.log(size), np.log(max_side + 1))))
        side = min(side, max_side)
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = photo[top : top + side, left : left + side]
        if side != size:  # Lanczos on a reduction widens its kernel: antialiased
            crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS))
        if crop.reshape(-1, 3).std(axis=0).max() >= MIN_STD:
            crops.append(crop)
            if len(crops) == count:
                return np.stack(crops)
    raise DatasetError(f"photos: fewer than {count} non-blank crops in {_MAX_DRAWS * count} draws.")


def photo_rng(name: str) -> np.random.Generator:
    """A generator seeded by SEED and the photo's name: a photo's crops do not depend on which
    other photos are present."""
    return np.random.default_rng([SEED, zlib.crc32(name.encode())])


@dataclasses.dataclass(eq=False)
class PhotosConfig(tfds.core.BuilderConfig):
    """Crop side `size` in pixels; the config's name is the size ('64', '32')."""

    size: int = 64


class Photos(tfds.core.GeneratorBasedBuilder):
    """Random crops (RGB uint8, PNG) of scikit-image's colour photographs, whole photos held out.

    Splits: 'train' (512 crops from each of six photos) and 'test' (256 crops from each of two
    other photos), as `PHOTOS` and `CROPS_PER_PHOTO` say; examples are stored photo by photo
    (shuffling disabled). `source` names the photo a crop came from: provenance, not a class to
    condition on. `info.metadata['photos']` lists the photos each split was prepared from.
    Configs: '64' (default) and '32', the crop side. Preparing is deterministic and offline.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        PhotosConfig(name="64", size=64, description="64x64 crops."),
        PhotosConfig(name="32", size=32, description="32x32 crops."),
    ]
    DEFAULT_CONFIG_NAME = "64"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.size
        return self.dataset_info_from_configs(
            description=(
                "Random square crops of the colour photographs bundled with scikit-image, resized "
                "with Lanczos filtering; the test split is made of photos unseen in train."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "source": tfds.features.Text(),
                }
            ),
            homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the photos ship inside scikit-image
        found = {split: find_photos(split) for split in PHOTOS}
        self.info.metadata["photos"] = {split: sorted(paths) for split, paths in found.items()}
        return {split: self._generate_examples(split, paths) for split, paths in found.items()}

    def _generate_examples(self, split, paths):
        size = self.builder_config.size
        for name, path in paths.items():
            crops = random_crops(load_photo(path), CROPS_PER_PHOTO[split], size, photo_rng(name))
            for i, crop in enumerate(crops):
                yield f"{name}/{i:04d}", {"image": png_bytes(crop), "source": name}
