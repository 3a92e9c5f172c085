"""DDPM on the embedded printed digits (Pillow's font, 8x8 like `digits`, upsampled to 16x16).

    python -m diffjax.main --config configs/printed_digits.py --workdir runs/printed_digits

The recipe of `configs/digits.py` (the same network and steps, the same training time) on
`printed_digits`: 1500 typeset digits whose images match the handwritten `digits` in
size, grey levels and framing, so the two models can be paired for handwritten -> printed
transfer. Samples go to runs/printed_digits/samples/.
Variants: `:tiny`, seconds long, for the tests; `:hybrid`, learned variances (Improved DDPM).
"""

from configs import digits


def get_config(arg: str | None = None):
    if arg not in (None, "", "tiny", "hybrid"):
        raise ValueError(
            f"unknown variant {arg!r} of configs/printed_digits.py; use '', 'tiny' or 'hybrid'"
        )
    config = digits.get_config(arg)
    config.data.name = "printed_digits"
    return config
