"""Trained inpainting on the embedded photo crops (64x64 RGB): the U-Net sees the crop with a
random region blanked (boxes, border bands, brush strokes) and the mask, concatenated to x_t.

    python -m diffjax.main --config configs/photos_inpaint.py --workdir runs/photos_inpaint
    python -m diffjax.main --config configs/photos_inpaint.py --workdir runs/photos_inpaint \
        --mode=edit --edit=inpaint --method=trained --input x.png --mask m.png --output y.png

The same 3-level U-Net (64/128/128 channels) and schedule as `configs/sr_photos.py`; sized for
an accelerator (a 2-core CPU makes about one step per second).
"""

from configs import sr_photos


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"unknown variant {arg!r} of configs/photos_inpaint.py; it has none")
    config = sr_photos.get_config(None)
    config.spatial.update(kind="inpaint")
    return config
