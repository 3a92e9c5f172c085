"""TFDS builder `digits`: scikit-learn's bundled 8x8 handwritten digits, prepared offline."""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

# Within each class, in scikit-learn's order, every TEST_EVERY-th image (positions 5, 11, 17, ...)
# goes to 'test', the rest to 'train': a stratified split that needs no random number generator.
TEST_EVERY = 6
_MAX_VALUE = 16  # load_digits pixels are integers 0..16


def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """Returns scikit-learn's digits: images [1797, 8, 8] int in 0..16, labels [1797] int."""
    from sklearn.datasets import load_digits  # slow import; only needed to prepare

    digits = load_digits()
    return digits.images.astype(np.int64), digits.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Indices into scikit-learn's ordering for each split, ascending.

    Args:
      labels: [N] int class of each image, in scikit-learn's order.

    Returns:
      {'train': [N_train] int, 'test': [N_test] int}; together they hold every index once.
    """
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        is_test[members[TEST_EVERY - 1 :: TEST_EVERY]] = True
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Scales 0..16 to 0..255 as round-half-up(v * 255 / 16); round(u * 16 / 255) inverts it."""
    return np.floor(images * (255 / _MAX_VALUE) + 0.5).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """Encodes a [H, W, 1] or [H, W, 3] uint8 array as PNG (so preparing needs no TensorFlow)."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


class Digits(tfds.core.GeneratorBasedBuilder):
    """The 1797 8x8 digits of `sklearn.datasets.load_digits`, scaled to uint8, 10 classes.

    Splits: 'train' (1501) and 'test' (296), stratified as `split_indices` describes; examples are
    stored in scikit-learn's order (shuffling disabled), so `split_indices` maps them back.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Handwritten digits bundled with scikit-learn (UCI optdigits test set).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data ships inside scikit-learn
        images, labels = load_raw()
        images = to_uint8(images)[..., None]
        return {
            split: self._generate_examples(images, labels, indices)
            for split, indices in split_indices(labels).items()
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": png_bytes(images[i]), "label": int(labels[i])}
