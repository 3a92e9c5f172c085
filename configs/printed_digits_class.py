"""Class-conditional DDPM on the embedded printed digits: the target of class-preserving DDIB.

    python -m diffjax.main --config configs/printed_digits_class.py \
        --workdir runs/printed_digits_class

`configs/digits_class.py` (the same network and recipe, a class embedding with a 10% null
class for guidance, the same training time: under 10 minutes on a 2-core CPU) on
`printed_digits`; samples go to runs/printed_digits_class/samples/. Paired with a
`digits_class` run it transfers handwritten digits to printed ones under the class that the
handwritten model reads in each input (`--edit=transfer --label=auto`; see the README's DDIB
section). Variant: `:tiny`, seconds long, for the tests.
"""

from configs import digits_class


def get_config(arg: str | None = None):
    if arg not in (None, "", "tiny"):
        raise ValueError(
            f"unknown variant {arg!r} of configs/printed_digits_class.py; use '' or 'tiny'"
        )
    config = digits_class.get_config(arg)
    config.data.name = "printed_digits"
    return config
