"""Stable Diffusion 1.x pipelines: CLIP tokenizer and text encoder, UNet2DConditionModel, and the
whole guided DDIM sample against diffusers; import, export and refusals."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import pytest
import safetensors.numpy

from configs import default
from diffjax import build, editor, infer, latent, pipelines, sharding, spatial, train
from diffjax.cond import Cond
from diffjax.data.tokenizer import ClipTokenizer, TokenizerError
from diffjax.models import clip, diffusers_unet, diffusers_vae
from diffjax.models.diffusers_io import CONFIG_FILE, WEIGHTS_FILE
from diffjax.models.pretrained import PretrainedError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
PIPELINE = FIXTURES / "tiny_sd"


@pytest.fixture(scope="module")
def golden():
    with np.load(FIXTURES / "tiny_sd_golden.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sd")
    base = default.get_config()
    base.mesh.data = 2  # the golden batch of 2 over two devices
    return workdir, pipelines.import_diffusers(PIPELINE, str(workdir), base)


@pytest.mark.parametrize("form", ["vocab.json + merges.txt", "tokenizer.json"])
def test_clip_tokenizer_ids_match_transformers(golden, tmp_path, form, caplog):
    directory = tmp_path / "tokenizer"
    shutil.copytree(PIPELINE / "tokenizer", directory)
    if form == "tokenizer.json":
        (directory / "vocab.json").unlink()
    else:
        (directory / "tokenizer.json").unlink()
    tokenizer = ClipTokenizer(directory)
    with caplog.at_level(logging.WARNING):
        ids, mask = tokenizer([str(p) for p in golden["prompts"]])
    np.testing.assert_array_equal(ids, golden["ids"])
    assert ids.shape == (len(golden["prompts"]), 77) and mask.all()  # SD attends to all 77
    assert "text 5" in caplog.text and "truncated" in caplog.text


def test_clip_text_encoder_matches_transformers(golden):
    module, params, _ = clip.load(PIPELINE / "text_encoder")
    hidden = jax.jit(module.apply)({"params": params}, jnp.asarray(golden["ids"], jnp.int32))
    np.testing.assert_allclose(np.asarray(hidden), golden["hidden"], atol=1e-4, rtol=0)


def test_conditioned_unet_matches_diffusers(golden):
    module, params, fields = diffusers_unet.load(PIPELINE / "unet")
    assert (module.num_heads, module.context_dim, module.head_dim) == (4, 32, None)
    context = jnp.asarray(golden["hidden"][:2])
    cond = Cond(context=context, context_mask=jnp.ones(context.shape[:2], bool))
    t = jnp.asarray(golden["t"], jnp.int32)
    out = jax.jit(module.apply)({"params": params}, golden["x"], t, cond)
    np.testing.assert_allclose(np.asarray(out), golden["unet_out"], atol=1e-4, rtol=0)


def test_imported_pipeline_config(imported):
    workdir, config = imported
    assert config.text.encoder == "clip" and config.text.max_length == 77
    assert pathlib.Path(config.text.pretrained_dir) == (PIPELINE / "text_encoder").resolve()
    assert pathlib.Path(config.latent.diffusers_vae) == (PIPELINE / "vae").resolve()
    assert config.latent.scale == 0.18215 and config.data.image_size == 16
    s = config.sampler
    assert (s.name, s.spacing, s.steps_offset, s.guidance_scale) == ("ddim", "leading", 1, 7.5)
    assert (config.diffusion.schedule, config.model.context_dim) == ("scaled_linear", 0)


@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_guided_ddim_sample_matches_the_diffusers_pipeline(imported, golden, alpha_to_one):
    """20 DDIM steps (leading, offset 1) with guidance 7.5 on two prompts against the empty
    prompt, from the pipeline's latents, then the VAE decode: StableDiffusionPipeline's output."""
    workdir, config = imported
    config = ml_collections.ConfigDict(config.to_dict())
    config.sampler.update(steps=20, set_alpha_to_one=alpha_to_one)
    setup, ema, _ = infer.load_ema(config, str(workdir))
    setup.load_text(str(workdir))
    cond = setup.prompt_cond(setup.text_side, [str(p) for p in golden["prompts"][:2]])
    null = infer.null_cond(setup, 2, None)
    table = build.timestep_table(config, config.diffusion.num_steps)
    np.testing.assert_array_equal(table[:21], [*range(951, 0, -50), 0 if not alpha_to_one else -1])
    x_T = sharding.from_global(golden["latents"], sharding.batch_sharded(setup.mesh))
    fn = setup.sample_program()
    out = fn(ema, x_T, cond, jax.random.key(0), table, 20, 0.0, 7.5, null_cond=null,
             **setup.guidance_args())  # fmt: skip
    want = golden["final_latents" if alpha_to_one else "final_latents_alpha0"]
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-3, rtol=0)
    if alpha_to_one:
        images = np.clip((np.asarray(setup.decode(out)) + 1.0) / 2.0, 0.0, 1.0)
        np.testing.assert_allclose(images, golden["images"], atol=1e-3, rtol=0)


def test_conditioned_unet_export_round_trips_bit_for_bit(tmp_path):
    """diffjax → diffusers → diffjax gives the same params; the export writes SD 1's 1x1-conv
    projections as linear ones (use_linear_projection), the same map."""
    module, params, fields = diffusers_unet.load(PIPELINE / "unet")
    diffusers_unet.save(tmp_path / "unet", module, params, fields["image_size"])
    config = json.loads((tmp_path / "unet" / CONFIG_FILE).read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and config["use_linear_projection"]
    again, params_again, _ = diffusers_unet.load(tmp_path / "unet")
    assert again == module
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_again), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    original = safetensors.numpy.load_file(PIPELINE / "unet" / WEIGHTS_FILE)
    written = safetensors.numpy.load_file(tmp_path / "unet" / WEIGHTS_FILE)
    assert sorted(original) == sorted(written)
    for name, value in original.items():
        assert np.array_equal(written[name].reshape(value.shape), value), name


def copy_pipeline(tmp_path) -> pathlib.Path:
    directory = tmp_path / "sd"
    shutil.copytree(PIPELINE, directory)
    return directory


def edit_json(path: pathlib.Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_bad_pipelines_are_refused(tmp_path):
    base = default.get_config()
    missing = copy_pipeline(tmp_path / "1")
    shutil.rmtree(missing / "text_encoder")
    with pytest.raises(PretrainedError, match="text_encoder/ folder is missing"):
        pipelines.import_diffusers(missing, str(tmp_path / "w1"), base)
    wide = copy_pipeline(tmp_path / "2")
    edit_json(wide / "text_encoder" / CONFIG_FILE, hidden_size=48)
    with pytest.raises(PretrainedError, match="cross_attention_dim=32 but the text encoder"):
        pipelines.import_diffusers(wide, str(tmp_path / "w2"), base)
    inpaint = copy_pipeline(tmp_path / "3")
    edit_json(inpaint / "unet" / CONFIG_FILE, in_channels=6)
    with pytest.raises(PretrainedError, match="in_channels=6 is not supported"):
        pipelines.import_diffusers(inpaint, str(tmp_path / "w3"), base)
    for change, words in (
        (dict(model_type="bert"), "model_type='bert' is not a CLIP text model"),
        (dict(hidden_act="relu"), "hidden_act='relu' is not supported"),
    ):
        broken = copy_pipeline(tmp_path / words[:8])
        edit_json(broken / "text_encoder" / CONFIG_FILE, **change)
        with pytest.raises(PretrainedError, match=words):
            clip.load(broken / "text_encoder")
    for change, words in (
        (dict(addition_embed_type="text_time"), "addition_embed_type='text_time'"),
        (dict(attention_head_dim=[1, 4]), "attention_head_dim"),
        (dict(cross_attention_dim=[32, 32]), "cross_attention_dim"),
    ):
        broken = copy_pipeline(tmp_path / words[:8])
        edit_json(broken / "unet" / CONFIG_FILE, **change)
        with pytest.raises(PretrainedError, match=words):
            diffusers_unet.load(broken / "unet")


def test_bad_tokenizer_folders_are_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="neither vocab.json"):
        ClipTokenizer(empty)
    odd = tmp_path / "odd"
    shutil.copytree(PIPELINE / "tokenizer", odd)
    edit_json(odd / "tokenizer_config.json", pad_token="<|notthere|>")
    with pytest.raises(TokenizerError, match="lacks pad_token '<|notthere|>'"):
        ClipTokenizer(odd)


@pytest.mark.slow
def test_pretrained_pipeline_samples_and_edits_from_the_cli(tmp_path):
    """`--pretrained DIR` imports on first use and samples by prompt; the workdir's config.py
    then drives an img2img edit under a prompt, with overrides."""
    work = tmp_path / "w"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def run(*flags):
        cmd = [sys.executable, "-m", "diffjax.main", f"--workdir={work}", *flags]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run(f"--pretrained={PIPELINE}", "--mode=sample", "--prompt=a photo of a cat", "--num_samples=2")
    with np.load(work / "samples" / "sample_0000000.npz") as f:
        assert (
            f["images"].shape == (2, 16, 16, 3) and list(f["prompts"]) == ["a photo of a cat"] * 2
        )
    image = tmp_path / "in.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)).save(
        image
    )
    out = tmp_path / "out.png"
    run(
        f"--config={work / 'config.py'}",
        "--config.sampler.steps=10",
        "--mode=edit",
        "--edit=img2img",
        "--strength=0.5",
        "--prompt=a dog",
        f"--input={image}",
        f"--output={out}",
    )
    assert PIL.Image.open(out).size == (16, 16)


def test_stable_diffusion_workdir_exports_as_a_pipeline(imported, tmp_path):
    """An imported (or fine-tuned) SD workdir goes back as a StableDiffusionPipeline: the U-Net
    written, the text encoder, tokenizer and VAE copied, the DDIM scheduler's settings kept;
    importing it again gives the same config and params."""
    workdir, config = imported
    out = tmp_path / "exported"
    assert pipelines.export_diffusers(str(workdir), str(out)) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"][1] == "UNet2DConditionModel" and index["scheduler"][1] == "DDIMScheduler"
    for part in ("text_encoder", "tokenizer", "vae"):
        for file in (PIPELINE / part).iterdir():
            assert (out / part / file.name).read_bytes() == file.read_bytes()
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["steps_offset"], scheduler["beta_schedule"]) == (1, "scaled_linear")
    base = default.get_config()
    base.mesh.data = 2
    again = pipelines.import_diffusers(out, str(tmp_path / "again"), base)
    for section in ("model", "diffusion", "sampler", "data"):
        assert again[section].to_dict() == config[section].to_dict(), section
    _, a, _ = diffusers_unet.load(PIPELINE / "unet")
    _, b, _ = diffusers_unet.load(out / "unet")
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    assert all(np.array_equal(x, y) for x, y in pairs)


def test_autoencoder_export_round_trips_bit_for_bit(tmp_path):
    """diffusers → diffjax → diffusers gives back the VAE's every tensor exactly."""
    module, params, _ = diffusers_vae.load_autoencoder_kl(PIPELINE / "vae")
    diffusers_vae.save(tmp_path / "vae", module, params)
    original = safetensors.numpy.load_file(PIPELINE / "vae" / WEIGHTS_FILE)
    written = safetensors.numpy.load_file(tmp_path / "vae" / WEIGHTS_FILE)
    assert sorted(original) == sorted(written)
    assert all(np.array_equal(written[k], v) for k, v in original.items())
    again, params_again, _ = diffusers_vae.load_autoencoder_kl(tmp_path / "vae")
    assert again == module


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    """tiny_sd_inpaint/ completed with tiny_sd/'s text encoder, tokenizer and VAE, imported."""
    root = tmp_path_factory.mktemp("sd_inpaint")
    directory = root / "pipeline"
    shutil.copytree(FIXTURES / "tiny_sd_inpaint", directory)
    for part in ("text_encoder", "tokenizer", "vae"):
        shutil.copytree(PIPELINE / part, directory / part)
    base = default.get_config()
    base.mesh.data = 2
    workdir = root / "workdir"
    return workdir, pipelines.import_diffusers(directory, str(workdir), base)


def test_inpainting_pipeline_matches_diffusers(inpainting, golden):
    """A 9-input-channel SD inpainting U-Net: the masked image's latents (the VAE's mean ×
    scale) and the guided DDIM-20 inpainting from the pipeline's latents match
    StableDiffusionInpaintPipeline; the Editor's trained inpainting keeps the known pixels."""
    workdir, config = inpainting
    assert config.spatial.kind == "inpaint_encoded" and config.data.channels == 3
    config = ml_collections.ConfigDict(config.to_dict())
    config.sampler.steps = 20
    setup, ema, _ = infer.load_ema(config, str(workdir))
    setup.load_text(str(workdir))
    images, mask = golden["inpaint_image"], golden["inpaint_mask"]
    put = lambda a: sharding.from_global(np.asarray(a), sharding.batch_sharded(setup.mesh))
    encode = latent.make_encode_fn(setup.codec.module, setup.mesh)
    mean, _ = encode(setup.codec.params, put(images * (1.0 - mask)))
    masked = np.asarray(mean) * config.latent.scale
    np.testing.assert_allclose(masked, golden["inpaint_masked_latents"], atol=1e-4, rtol=0)
    concat = put(spatial.encoded_inpaint_condition(mask, masked, 2))
    cond = setup.prompt_cond(setup.text_side, [str(p) for p in golden["prompts"][:2]])
    null = infer.null_cond(setup, 2, None).replace(concat=concat)
    table = build.timestep_table(config, config.diffusion.num_steps)
    out = setup.sample_program()(
        ema, put(golden["inpaint_latents"]), cond.replace(concat=concat), jax.random.key(0), table,
        20, 0.0, 7.5, null_cond=null, **setup.guidance_args(),
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(out), golden["inpaint_final_latents"], atol=1e-3, rtol=0)
    edited = editor.Editor(setup, ema).inpaint(
        images, mask, jax.random.key(1), method="trained", prompt="a photo of a cat"
    )
    assert edited.shape == images.shape and np.isfinite(edited).all()
    np.testing.assert_array_equal(np.where(mask > 0.5, 0.0, edited - images), 0.0)


def test_inpainting_model_refuses_training(inpainting):
    workdir, config = inpainting
    with pytest.raises(ValueError, match="fine-tuning it is not supported yet"):
        train.train_and_evaluate(config, str(workdir))


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddpm", "dpm_solver_pp", "heun"])
def test_every_sampler_runs_on_stable_diffusion(imported, sampler):
    workdir, config = imported
    config = ml_collections.ConfigDict(config.to_dict())
    config.sampler.update(name=sampler, steps=4, steps_offset=0, spacing="uniform")
    setup, ema, _ = infer.load_ema(config, str(workdir))
    setup.load_text(str(workdir))
    cond = setup.prompt_cond(setup.text_side, ["a photo of a cat"] * 2)
    x = setup.sample_fn(2)(ema, jax.random.key(0), cond, infer.null_cond(setup, 2, None))
    images = np.asarray(setup.decode(x))
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
