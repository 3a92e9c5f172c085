"""diffusers AutoencoderKL loader: parity with the reference, legacy names, loader errors."""

import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from conftest import copy_model_dir

from diffjax.models.diffusers_io import CONFIG_FILE, WEIGHTS_FILE
from diffjax.models.diffusers_vae import load_autoencoder_kl
from diffjax.models.pretrained import PretrainedError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MODEL_DIR = FIXTURES / "tiny_vae"
GOLDEN = FIXTURES / "tiny_vae_golden.npz"
ATTENTION = "decoder.mid_block.attentions.0"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def vae():
    return load_autoencoder_kl(MODEL_DIR)


@pytest.fixture(scope="module")
def tensors():
    return safetensors.numpy.load_file(MODEL_DIR / WEIGHTS_FILE)


def max_error(actual, expected) -> float:
    assert actual.shape == expected.shape
    return float(np.abs(np.asarray(actual) - expected).max())


def copy_model(tmp_path, tensors=None, **config):
    """A copy of the fixture directory, with other tensors and/or config.json fields."""
    return copy_model_dir(MODEL_DIR, tmp_path / "vae", tensors, **config)


def test_posterior_matches_reference(vae, golden):
    module, params, _ = vae
    posterior = jax.jit(lambda x: module.apply({"params": params}, x, method=module.encode))(
        golden["images"]
    )
    error = max_error(posterior.mean, golden["mean"])
    assert error < TOLERANCE, f"posterior mean: max abs difference to diffusers: {error}"
    error = max_error(posterior.logvar, golden["logvar"])
    assert error < TOLERANCE, f"posterior logvar: max abs difference to diffusers: {error}"


def test_decode_matches_reference(vae, golden):
    module, params, _ = vae
    decode = jax.jit(lambda z: module.apply({"params": params}, z, method=module.decode))
    error = max_error(decode(golden["mean"]), golden["recon"])
    assert error < TOLERANCE, f"decode of the posterior mean: max abs difference: {error}"
    error = max_error(decode(golden["latents"]), golden["decoded"])
    assert error < TOLERANCE, f"decode of random latents: max abs difference: {error}"


def test_config_and_module_fields(vae):
    module, params, config = vae
    assert config["scaling_factor"] == pytest.approx(0.18215)
    assert config["shift_factor"] is None
    assert module.block_out_channels == (8, 16, 16)
    assert (module.layers_per_block, module.latent_channels, module.num_groups) == (1, 4, 4)
    assert module.factor == 4
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))


def test_legacy_attention_names_load_the_same_params(vae, tensors, tmp_path):
    # Old diffusers: query/key/value/proj_attn, here as 1x1 conv weights [C, C, 1, 1] for the
    # weights (biases stay [C]).
    renamed = dict(tensors)
    for new, old in {
        "to_q": "query",
        "to_k": "key",
        "to_v": "value",
        "to_out.0": "proj_attn",
    }.items():
        for leaf in ("weight", "bias"):
            value = renamed.pop(f"{ATTENTION}.{new}.{leaf}")
            renamed[f"{ATTENTION}.{old}.{leaf}"] = (
                value[..., None, None] if leaf == "weight" else value
            )
    _, params, _ = load_autoencoder_kl(copy_model(tmp_path, renamed))
    jax.tree.map(np.testing.assert_array_equal, params, vae[1])


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_checkpoint_loads_as_float32(vae, tensors, tmp_path, dtype):
    halved = {name: value.astype(dtype) for name, value in tensors.items()}
    _, params, _ = load_autoencoder_kl(copy_model(tmp_path, halved))
    kernel = params["encoder"]["conv_in"]["kernel"]
    assert kernel.dtype == np.float32
    want = tensors["encoder.conv_in.weight"].astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(kernel, want.transpose(2, 3, 1, 0))


def test_missing_tensor_is_named(tensors, tmp_path):
    name = f"{ATTENTION}.to_k.weight"
    kept = {k: v for k, v in tensors.items() if k != name}
    with pytest.raises(PretrainedError, match=f"lacks tensor {name}"):
        load_autoencoder_kl(copy_model(tmp_path, kept))


def test_unexpected_tensor_is_named(tensors, tmp_path):
    extra = {**tensors, "encoder.extra_block.weight": np.zeros(3, np.float32)}
    with pytest.raises(PretrainedError, match=r"unexpected tensors encoder\.extra_block\.weight"):
        load_autoencoder_kl(copy_model(tmp_path, extra))


def test_wrong_shape_is_named_with_both_shapes(tensors, tmp_path):
    name = "decoder.up_blocks.2.resnets.0.conv_shortcut.weight"
    wrong = {**tensors, name: np.zeros((8, 16, 3, 3), np.float32)}
    with pytest.raises(PretrainedError) as err:
        load_autoencoder_kl(copy_model(tmp_path, wrong))
    assert name in str(err.value)
    assert "(8, 16, 3, 3)" in str(err.value) and "(8, 16, 1, 1)" in str(err.value)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(PretrainedError, match="does not exist"):
        load_autoencoder_kl(tmp_path / "nowhere")
    directory = copy_model(tmp_path)
    (directory / CONFIG_FILE).unlink()
    with pytest.raises(PretrainedError, match=f"{CONFIG_FILE} is missing"):
        load_autoencoder_kl(directory)


def test_missing_weights_file(tmp_path):
    directory = copy_model(tmp_path)
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(PretrainedError, match=f"{WEIGHTS_FILE} is missing"):
        load_autoencoder_kl(directory)


def test_bin_only_directory_is_refused_with_how_to_convert(tmp_path):
    directory = copy_model(tmp_path)
    (directory / WEIGHTS_FILE).rename(directory / "diffusion_pytorch_model.bin")
    with pytest.raises(PretrainedError) as err:
        load_autoencoder_kl(directory)
    assert "diffusion_pytorch_model.bin" in str(err.value)
    assert "safe_serialization=True" in str(err.value)


def test_corrupt_weights_file(tmp_path):
    directory = copy_model(tmp_path)
    data = (directory / WEIGHTS_FILE).read_bytes()
    (directory / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(PretrainedError, match="corrupt or truncated"):
        load_autoencoder_kl(directory)


def test_unknown_class_name_is_refused(tmp_path):
    directory = copy_model(tmp_path, _class_name="UNet2DConditionModel")
    with pytest.raises(PretrainedError, match="_class_name='UNet2DConditionModel'"):
        load_autoencoder_kl(directory)


@pytest.mark.parametrize(
    "option, value",
    [
        ("use_quant_conv", False),
        ("use_post_quant_conv", False),
        ("act_fn", "gelu"),
        (
            "down_block_types",
            ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"],
        ),
        ("up_block_types", ["UpDecoderBlock2D"] * 2),
    ],
)
def test_unsupported_option_is_named(tmp_path, option, value):
    with pytest.raises(PretrainedError, match=f"{option}=.* is not supported"):
        load_autoencoder_kl(copy_model(tmp_path, **{option: value}))


def test_groups_that_do_not_divide_the_channels_are_named(tmp_path):
    with pytest.raises(PretrainedError, match="num_groups"):
        load_autoencoder_kl(copy_model(tmp_path, norm_num_groups=3))


def test_middle_blocks_without_attention(tensors, tmp_path):
    kept = {k: v for k, v in tensors.items() if ".attentions." not in k}
    module, params, _ = load_autoencoder_kl(
        copy_model(tmp_path, kept, mid_block_add_attention=False)
    )
    assert not module.mid_attention
    assert "attentions_0" not in params["decoder"]["mid_block"]
