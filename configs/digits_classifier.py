"""A noise-conditional classifier of the digits, p(y | x_t, t), for classifier guidance.

    python -m diffjax.main --config configs/digits_classifier.py --workdir runs/digits_classifier
    python -m diffjax.main --config configs/digits.py --workdir runs/digits --mode=sample \
        --label=7 --config.sampler.classifier_config=configs/digits_classifier.py \
        --config.sampler.classifier_workdir=runs/digits_classifier \
        --config.sampler.classifier_scale=4

The encoder half and middle block of the digits U-Net (time-conditioned like it) with a pooled
linear head over the 10 classes (Dhariwal & Nichol 2021, §4), trained by the same loop on
x_t ~ q(x_t | x_0) at uniform t with cross-entropy; `train/accuracy` is logged. Sampling any
digits model (unconditional or class-conditional) with `sampler.classifier_*` set adds
s·∇ log p(y | x_t) to the prediction (their Algorithm 2 form) for every sampler.
Variant: `:tiny`, seconds long, for the tests (pairs with `configs/digits.py:tiny`).
"""

from configs import digits


def get_config(arg: str | None = None):
    if arg not in (None, "", "tiny"):
        raise ValueError(
            f"unknown variant {arg!r} of configs/digits_classifier.py; use '' or 'tiny'"
        )
    config = digits.base("tiny" if arg == "tiny" else None)
    config.task = "classifier"
    config.model.update(classifier_classes=10, dropout=0.1)
    if arg != "tiny":
        config.train.update(num_steps=600, log_every_steps=50)
    return config
