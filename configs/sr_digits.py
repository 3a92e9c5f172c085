"""Super-resolution (SR3) on the embedded digits: 8x8 → 32x32, the U-Net sees the bicubic
upsampling of the low-res digit concatenated to x_t.

    python -m diffjax.main --config configs/sr_digits.py --workdir runs/sr_digits
    python -m diffjax.main --config configs/sr_digits.py --workdir runs/sr_digits --mode=edit \
        --edit=upscale --input low8x8.png --output high.png

Training pairs are made on the fly from the 32x32 digits by 4x4 box averaging (`spatial.py`).
Variant `:tiny` (8x8 from 2x2, seconds long) is for the tests.
"""

from configs import digits


def get_config(arg: str | None = None):
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r} of configs/sr_digits.py; use '' or 'tiny'")
    config = digits.base(arg or None)
    config.spatial.update(kind="upscale", factor=4)
    if not arg:
        config.data.image_size = 32
    return config
