"""TFDS builder `printed_digits`: digits 0-9 in Pillow's bundled font, framed like `digits`."""

import functools

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont, features

from diffjax.data.digits import png_bytes, to_uint8
from diffjax.data.errors import DatasetError

# The printed counterpart of the handwritten `digits` for domain transfer: the same 8x8 frame,
# white ink on black, and the same 17 grey levels, made the way optdigits made its images
# (a larger bitmap whose 8x8 blocks are averaged), so only the style of the strokes differs.
SPLIT_SIZES = {"train": 1500, "test": 300}  # like digits' 1501 / 296; classes in turn, balanced
NUM_CLASSES = 10
SEED = 0
RENDER_SIZE = 64  # side of the rendering; each 8x8 block of it becomes one output pixel
OUTPUT_SIZE = 8
LEVELS = 16  # output pixels are the block's ink coverage rounded to 0..16, as in digits
# A digit's ink height at scale 1, in rendering pixels: 7 of the 8 rows, so with the size,
# stroke and rotation drawn below it fills most of the frame, as scikit-learn's digits do.
NOMINAL_HEIGHT = 56
MAX_SCALE_CHANGE = 0.15  # size drawn uniformly from 1 ± this
# Shift of the ink's centre, each axis, in rendering pixels: normal with OFFSET_STD, cut off at
# MAX_OFFSET (1 output pixel). Within a class, scikit-learn's digits' centres of mass vary by
# 0.23 output pixels (standard deviation, each axis); uniform shifts of ±1 pixel would vary 2.5
# times as much and blur the classes more than handwriting does.
OFFSET_STD = 2.0
MAX_OFFSET = 8
MAX_ANGLE = 10.0  # degrees of rotation, uniform in ± this
MAX_STROKE = 2  # outline width added around the glyph, an integer in 0..MAX_STROKE, uniform
_MAX_DRAWS = 4  # draws per kept image before giving up on finding unseen images


def load_font(size: float) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (Aileron Regular) at `size` pixels.

    Raises:
      DatasetError: Pillow lacks FreeType, so only its fixed-size bitmap font is available.
    """
    if not features.check("freetype2"):
        raise DatasetError(
            "printed_digits: this Pillow was built without FreeType, so "
            "PIL.ImageFont.load_default(size=...) cannot give a scalable font to render digits "
            "with. Install a Pillow wheel, which bundles FreeType "
            "(pip install --force-reinstall pillow)."
        )
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError) as error:
        raise DatasetError(
            f"printed_digits: cannot load Pillow's default font ({error})."
        ) from error


@functools.cache
def _ink_height_per_size() -> float:
    """The height of a digit's ink per pixel of font size (lining figures share one height)."""
    _, top, _, bottom = load_font(100).getbbox("0")
    return (bottom - top) / 100


def _window_start(lo: int, hi: int, shift: int) -> int:
    """Start of a RENDER_SIZE window over ink spanning [lo, hi), centred then moved by `shift`,
    but kept from cutting ink off where the ink fits; ink taller than the window is centred."""
    start = (lo + hi - RENDER_SIZE) // 2 - shift
    if hi - lo > RENDER_SIZE:
        return (lo + hi - RENDER_SIZE) // 2
    return min(max(start, hi - RENDER_SIZE), lo)


def render_digit(
    digit: int, *, scale: float, angle: float, stroke: int, offset: tuple[int, int]
) -> np.ndarray:
    """Typesets one digit and reduces it to the 8x8 grid of `digits`.

    Args:
      digit: 0..9.
      scale: ink height relative to NOMINAL_HEIGHT.
      angle: rotation in degrees, counter-clockwise.
      stroke: outline width in rendering pixels (thickens the strokes by 2 * stroke).
      offset: (down, right) shift of the ink's centre from the frame's, in rendering pixels.

    Returns:
      int64 [8, 8] in 0..16: each pixel the ink coverage of an 8x8 block, rounded to 16ths.
    """
    font = load_font(NOMINAL_HEIGHT * scale / _ink_height_per_size())
    side = RENDER_SIZE * 3 // 2  # room for the largest glyph at any angle
    canvas = Image.new("L", (side, side))
    ImageDraw.Draw(canvas).text(
        (side // 2, side // 2),
        str(digit),
        fill=255,
        font=font,
        anchor="mm",
        stroke_width=stroke,
        stroke_fill=255,
    )
    ink = np.asarray(canvas.rotate(angle, resample=Image.Resampling.BICUBIC))
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    # On a padded canvas, a window reaching past the rendering reads blank there.
    padded = np.pad(ink, RENDER_SIZE).astype(np.float64)
    top = _window_start(rows[0], rows[-1] + 1, offset[0]) + RENDER_SIZE
    left = _window_start(cols[0], cols[-1] + 1, offset[1]) + RENDER_SIZE
    window = padded[top : top + RENDER_SIZE, left : left + RENDER_SIZE]
    block = RENDER_SIZE // OUTPUT_SIZE  # a box (area) filter: the mean of each block
    coverage = window.reshape(OUTPUT_SIZE, block, OUTPUT_SIZE, block).mean(axis=(1, 3)) / 255
    return np.floor(coverage * LEVELS + 0.5).astype(np.int64)


def _draw_digit(digit: int, rng: np.random.Generator) -> np.ndarray:
    """One rendering of `digit` with size, angle, stroke and offset drawn from `rng`."""
    scale = rng.uniform(1 - MAX_SCALE_CHANGE, 1 + MAX_SCALE_CHANGE)
    angle = rng.uniform(-MAX_ANGLE, MAX_ANGLE)
    stroke = int(rng.integers(0, MAX_STROKE + 1))
    down, right = np.round(np.clip(rng.normal(0, OFFSET_STD, 2), -MAX_OFFSET, MAX_OFFSET))
    return render_digit(
        digit, scale=scale, angle=angle, stroke=stroke, offset=(int(down), int(right))
    )


def render_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Renders every split from one generator seeded with SEED, 'train' then 'test'.

    Example i of a split shows digit i % 10. An image equal to one already kept, in either
    split, is drawn again, so no image appears twice and none is shared by train and test.

    Returns:
      {split: (images [N, 8, 8] int64 in 0..16, labels [N] int64)}, N as in SPLIT_SIZES.
    """
    rng = np.random.default_rng(SEED)
    seen, splits = set(), {}
    for split, size in SPLIT_SIZES.items():
        labels = np.arange(size) % NUM_CLASSES
        images = []
        for digit in labels:
            for _ in range(_MAX_DRAWS):
                image = _draw_digit(int(digit), rng)
                if image.tobytes() not in seen:
                    break
            else:
                raise DatasetError(
                    f"printed_digits: no unseen image of {digit} in {_MAX_DRAWS} draws."
                )
            seen.add(image.tobytes())
            images.append(image)
        splits[split] = (np.stack(images), labels)
    return splits


class PrintedDigits(tfds.core.GeneratorBasedBuilder):
    """Digits 0-9 typeset in Pillow's bundled Aileron, 8x8 uint8 like `digits`, 10 classes.

    Each image varies in size (±15%), rotation (±10°), stroke weight and offset (within ±1
    pixel), and is reduced to 17 grey levels scaled to uint8 as `digits` is. Splits: 'train'
    (1500) and 'test' (300), classes in turn (example i is digit i % 10), stored in that order
    (shuffling disabled), no image repeated. Preparing is deterministic and offline.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "Printed digits rendered with Pillow's bundled font at varied size, rotation, "
                "stroke and offset, reduced to 8x8 with 17 grey levels like scikit-learn's digits."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(OUTPUT_SIZE, OUTPUT_SIZE, 1)),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://pillow.readthedocs.io/en/stable/reference/ImageFont.html",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the font ships inside Pillow
        return {
            split: self._generate_examples(to_uint8(images)[..., None], labels)
            for split, (images, labels) in render_splits().items()
        }

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": png_bytes(image), "label": int(label)}
