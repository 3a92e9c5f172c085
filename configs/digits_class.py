"""Class-conditional DDPM on the embedded digits, with classifier-free guidance.

    python -m diffjax.main --config configs/digits_class.py --workdir runs/digits_class
    python -m diffjax.main --config configs/digits_class.py --workdir runs/digits_class \
        --mode=sample --label=7 --config.sampler.guidance_scale=3

The network and recipe of `configs/digits.py` (1000 steps, the same training time: under 10
minutes on a 2-core CPU), plus a class embedding for the 10 digits and an 11th "no label" class
that 10% of the training examples are shown (`model.cond_drop_prob`), so one network is both
the conditional and the unconditional model. Training ends with a grid whose columns are the
classes 0-9; `--mode=sample --label=K` draws only digit K, `--label=all` a row per class. The
guidance scale w is chosen at sampling time: 1 is the plain conditional model, larger w gives
cleaner, less varied digits (the README's table gives accuracy and FD against w).
Variant: `configs/digits_class.py:tiny`, seconds long, for the tests.
"""

from configs import digits


def get_config(arg: str | None = None):
    config = digits.base("tiny" if arg == "tiny" else None)
    config.diffusion.min_snr_gamma = 0.0  # as its README figures were measured
    config.model.update(num_classes=10, cond_drop_prob=0.1)
    config.sampler.update(guidance_scale=2.0)
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r} of configs/digits_class.py; use '' or 'tiny'")
    return config
