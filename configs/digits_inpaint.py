"""Trained inpainting on the embedded digits (16x16): the U-Net sees the digit with a random
region blanked (boxes, border bands, brush strokes) and the mask, concatenated to x_t.

    python -m diffjax.main --config configs/digits_inpaint.py --workdir runs/digits_inpaint
    python -m diffjax.main --config configs/digits_inpaint.py --workdir runs/digits_inpaint \
        --mode=edit --edit=inpaint --method=trained --input x.png --mask m.png --output y.png

Variant `:tiny` (8x8, seconds long) is for the tests.
"""

from configs import digits


def get_config(arg: str | None = None):
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r} of configs/digits_inpaint.py; use '' or 'tiny'")
    config = digits.base(arg or None)
    config.spatial.kind = "inpaint"
    return config
