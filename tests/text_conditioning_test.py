"""Text-to-image: captions, the word tokenizer, caption folders, and both encoders end to end."""

import json
import logging

import jax
import numpy as np
import pytest
import tokenizers
from conftest import cli, one_line_error, run_all
from PIL import Image

from configs import digits_text
from diffjax import build, checkpoint, data, train
from diffjax.data import captions as captions_lib
from diffjax.data import image_folder
from diffjax.data.tokenizer import WordTokenizer

# --- captions and tokenizer ---------------------------------------------------------------------


def test_digit_captions_cover_each_class_and_hold_phrasings_out():
    table = captions_lib.digit_captions()
    assert len(table.texts) == 10 * len(captions_lib.TRAIN_PHRASINGS)
    for label in range(10):
        ids = list(table.choices({"label": label}))
        assert all(
            captions_lib.NUMBER_WORDS[label] in table.texts[i] or str(label) in table.texts[i]
            for i in ids
        )
    held = {
        captions_lib.digit_caption(c, p) for c in range(10) for p in captions_lib.HELD_OUT_PHRASINGS
    }
    assert not held & set(table.texts)
    assert table.examples[7] == "a handwritten seven" and "an eight written by hand" in table.texts


def test_training_stream_draws_a_caption_of_the_class_per_example_and_epoch(tmp_path):
    source = data.load_source("digits", "train", str(tmp_path))
    table = captions_lib.digit_captions()
    kw = dict(image_size=8, channels=1, global_batch=256, seed=0, random_flip=False)
    it = data.make_train_iterator(source, captions=table, **kw)
    seen = {}
    for _ in range(30):  # about 5 epochs of 1501 examples
        batch = next(it)
        k = len(captions_lib.TRAIN_PHRASINGS)
        assert np.all(batch["caption"] // k == batch["label"])  # always a caption of its class
        for img, cap in zip(batch["image"], batch["caption"], strict=True):
            seen.setdefault(img.tobytes(), set()).add(int(cap))
    # Each example comes ~5 times: its phrasing is drawn anew each epoch.
    assert np.mean([len(v) > 1 for v in seen.values()]) > 0.9
    state = it.get_state()
    again = data.make_train_iterator(source, captions=table, **kw)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["caption"], next(it)["caption"])
    # Examples kept in memory (`data.cache_mib`) draw the same captions, epoch after epoch.
    plain = data.make_train_iterator(source, captions=table, **kw)
    kept = data.make_train_iterator(source, captions=table, cache_mib=1, **kw)
    for _ in range(12):
        a, b = next(plain), next(kept)
        np.testing.assert_array_equal(a["caption"], b["caption"])
        np.testing.assert_array_equal(a["image"], b["image"])


ODD_TEXTS = [
    "",
    "   ",
    "A Handwritten SEVEN!!",
    "the digit 7, written by hand — beautifully",
    "ein handgeschriebenes Fünf — 七",
    " ".join(["seven"] * 40),
]


def test_word_tokenizer_matches_tokenizers_word_level_on_odd_input(caplog):
    tok = WordTokenizer.from_texts(captions_lib.digit_captions().texts, max_length=12)
    vocab = {w: i for w, i in tok.vocab.items()}
    ref = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    ref.normalizer = tokenizers.normalizers.Lowercase()
    ref.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    with caplog.at_level(logging.WARNING):
        tokens, mask = tok(ODD_TEXTS)
    assert "lost 30 token(s)" in caplog.text  # 40 words + 2 framing ids > 12
    for text, row, m in zip(ODD_TEXTS, tokens, mask, strict=True):
        ids = [tok.cls_id, *ref.encode(text).ids, tok.sep_id]
        if len(ids) > 12:
            ids = ids[:11] + ids[-1:]
        np.testing.assert_array_equal(row[m], ids)
        assert not np.any(row[~m])  # padding is [PAD] = 0
    assert (
        tok(["the figure seven scribbled"])[0][0, 2] == tok.unk_id
    )  # "figure": not a caption word
    with pytest.raises(TypeError):
        tok("a bare string")


def test_image_folder_reads_captions_from_metadata_jsonl(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    lines = [json.dumps({"file_name": f"{i}.png", "text": f"shade {i}"}) for i in range(4)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    source = data.load_source("image_folder", "train+test", str(tmp_path / "tfds"), folder=folder)
    assert source.has_text and sorted(source.texts()) == [f"shade {i}" for i in range(4)]
    table = captions_lib.text_captions(source.texts())
    it = data.make_train_iterator(
        source, image_size=8, channels=3, global_batch=4, seed=0, random_flip=False, captions=table
    )
    batch = next(it)
    for img, cap in zip(batch["image"], batch["caption"], strict=True):
        shade = round((img[0, 0, 0] + 1) * 127.5 / 40)
        assert table.texts[cap] == f"shade {shade}"
    # A caption missing, then a bad line: one clear error each.
    (folder / "metadata.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(data.DatasetError, match=r"no caption for 2 of the 4 images \(2.png, 3.png"):
        image_folder.scan(folder)
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png"}\n')
    with pytest.raises(data.DatasetError, match="line 1: not a JSON object with"):
        image_folder.scan(folder)


# --- end to end ---------------------------------------------------------------------------------


def _cli(variant, workdir, data_dir, *flags):
    return cli(f"digits_text.py:{variant}", workdir, data_dir, *flags)


def _config(variant, data_dir, **train_overrides):
    config = digits_text.get_config(variant)
    config.data.data_dir = str(data_dir)
    config.train.update(train_overrides)
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both encoders trained 4 steps (checkpoints at 2 and 4), in-process."""
    data_dir = tmp_path_factory.mktemp("tfds")
    works = {}
    for variant in ("tiny", "minilm_tiny"):
        works[variant] = tmp_path_factory.mktemp(variant)
        config = _config(variant, data_dir, num_steps=4, checkpoint_every_steps=2)
        train.train_and_evaluate(config, str(works[variant]))
    return data_dir, works


@pytest.mark.slow  # the slow tier: `pytest -m slow`, CI's second step
def test_both_encoders_train_resume_and_keep_frozen_weights_out_of_checkpoints(runs, caplog):
    data_dir, works = runs
    caplog.set_level(logging.INFO, logger="diffjax")
    for variant, work in works.items():
        caplog.clear()
        config = _config(variant, data_dir, num_steps=6, checkpoint_every_steps=2)
        train.train_and_evaluate(config, str(work))
        assert "resumed from step 4" in caplog.text
        setup = build.Setup(config)
        ckpt = checkpoint.Checkpointer(str(work / "checkpoints"))
        state, _, step = ckpt.restore(setup.abstract_state)
        ckpt.close()
        assert step == 6
        saved = json.loads((work / "text.json").read_text())
        assert saved["grid_prompts"][3] == "a handwritten three"
        final = np.load(work / "samples" / "step_0000006.npz")
        assert list(final["prompts"][:10]) == saved["grid_prompts"]
        if variant == "tiny":  # the jointly trained encoder is part of the model
            assert set(state.params) == {"unet", "encoder"} and saved["words"]
        else:  # MiniLM is encoded once per caption and never checkpointed
            assert "encoded 80 distinct captions once" in caplog.text
            n_params = sum(x.size for x in jax.tree.leaves(state.params))
            assert n_params < 2_000_000 and "encoder" not in state.params  # MiniLM has 22.7M


@pytest.mark.slow
def test_sample_by_prompt_and_bad_text_input_from_the_cli(runs, tmp_path):
    data_dir, works = runs
    joint, minilm = works["tiny"], works["minilm_tiny"]
    broken = tmp_path / "broken_minilm"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    long_prompt = " ".join(["seven"] * 30)
    results = run_all(
        {
            "joint": _cli("tiny", joint, data_dir, "--mode=sample", "--num_samples=8",
                          "--prompt=a handwritten three", "--negative_prompt=the digit 8"),
            "minilm_long": _cli("minilm_tiny", minilm, data_dir, "--mode=sample",
                                "--num_samples=8", f"--prompt={long_prompt}"),
            "empty": _cli("tiny", joint, data_dir, "--mode=sample", "--prompt= "),
            "in_train": _cli("tiny", joint, data_dir, "--prompt=a three"),
            "no_text_model": cli("digits_class.py:tiny", joint, None, "--mode=sample",
                                 "--prompt=a handwritten three"),
            "missing_weights": _cli("minilm_tiny", minilm, data_dir, "--mode=sample",
                                    f"--config.text.pretrained_dir={broken}"),
        }
    )  # fmt: skip
    for name in ("joint", "minilm_long"):
        rc, _, err = results[name]
        assert rc == 0, (name, err[-3000:])
    assert "truncated" in results["minilm_long"][2]  # 30 words + [CLS] [SEP] > 16 tokens
    z = np.load(joint / "samples" / "sample_0000006.npz")
    assert set(z["prompts"]) == {"a handwritten three"} and z["images"].shape == (8, 8, 8, 1)
    png = Image.open(joint / "samples" / "sample_0000006.png")
    assert png.text["prompt"] == "a handwritten three"
    assert png.text["negative_prompt"] == "the digit 8"
    expected = {
        "empty": ["--prompt is empty"],
        "in_train": ["--prompt is for --mode=sample"],
        "no_text_model": ["--prompt", "no text conditioning"],
        "missing_weights": ["model.safetensors is missing"],
    }
    for name, words in expected.items():
        one_line_error(results[name], *words)
    ckpt = checkpoint.Checkpointer(str(joint / "checkpoints"))
    assert ckpt.all_steps() == [2, 4, 6]  # nothing was overwritten
    ckpt.close()
