"""diffusers UNet2DModel / DDPM pipelines: parity with the reference, import, export, errors."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from conftest import ROOT, cli, copy_model_dir, one_line_error, run_all

from configs import default
from diffjax import build, checkpoint, infer, pipelines, samplers, sharding
from diffjax.cond import Cond
from diffjax.models import diffusers_unet
from diffjax.models.diffusers_io import CONFIG_FILE, WEIGHTS_FILE
from diffjax.models.pretrained import PretrainedError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CASES = ("a", "b")


def pipeline(case: str) -> pathlib.Path:
    return FIXTURES / f"tiny_ddpm_{case}"


def golden(case: str) -> dict:
    with np.load(FIXTURES / f"tiny_ddpm_{case}_golden.npz") as f:
        return {k: f[k] for k in f.files}


def base_config():
    config = default.get_config()
    config.mesh.data = 2  # the golden batch of 2, split over two devices
    return config


@pytest.fixture(scope="module", params=CASES)
def imported(request, tmp_path_factory):
    """(case, workdir, config) of each fixture pipeline imported with `convert`."""
    workdir = tmp_path_factory.mktemp(f"imported_{request.param}")
    config = pipelines.import_diffusers(pipeline(request.param), str(workdir), base_config())
    return request.param, workdir, config


@pytest.mark.parametrize("case", CASES)
def test_unet_matches_reference(case):
    module, params, _ = diffusers_unet.load(pipeline(case) / "unet")
    g = golden(case)
    out = jax.jit(module.apply)({"params": params}, g["x"], jnp.asarray(g["t"], jnp.int32))
    assert out.shape == g["out"].shape
    np.testing.assert_allclose(np.asarray(out), g["out"], atol=1e-4, rtol=0)


def test_imported_config_follows_the_pipeline(imported):
    case, workdir, config = imported
    m, df, s = config.model, config.diffusion, config.sampler
    if case == "a":  # UNet2DModel's defaults; a linear-β ε DDPMScheduler, fixed_small
        assert (m.time_freq_shift, m.time_flip_sin_to_cos, m.downsample_padding) == (0, True, 1)
        assert (m.head_dim, m.norm_eps, tuple(m.attention_resolutions)) == (8, 1e-5, (8,))
        assert (df.schedule, df.target, s.variance, s.name, s.steps) == (
            "linear",
            "eps",
            "posterior",
            "ddpm",
            1000,
        )
    else:  # the DDPM-paper layout; cosine β, v-prediction, fixed_large
        assert (m.time_freq_shift, m.time_flip_sin_to_cos, m.downsample_padding) == (1, False, 0)
        assert (m.head_dim, tuple(m.channel_mults), m.num_res_blocks) == (None, (1, 2), 2)
        assert (df.schedule, df.target, s.variance) == ("cosine", "v", "beta")
    assert (workdir / "config.py").is_file()
    assert checkpoint.Checkpointer(str(workdir / "checkpoints")).all_steps() == [0]


def test_imported_workdir_samples_ddim_like_diffusers(imported):
    """DDIM 20 (leading, η = 0, unclipped) from the reference's noise, through the sampler that
    `--mode=sample` uses, reproduces diffusers' DDIMScheduler loop."""
    case, workdir, config = imported
    g = golden(case)
    config = ml_collections.ConfigDict(config.to_dict())
    config.sampler.update(name="ddim", steps=20, spacing="leading", clip_x0=False)
    setup, ema, step = infer.load_ema(config, str(workdir))
    assert step == 0
    table = samplers.timestep_table(config.diffusion.num_steps, 20, "leading", 1000)
    np.testing.assert_array_equal(table[:20], g["ddim_timesteps"])
    x_T = sharding.from_global(g["noise"], sharding.batch_sharded(setup.mesh))
    cond = sharding.from_global(Cond(), sharding.batch_sharded(setup.mesh))
    fn = setup.sample_program()
    out = fn(ema, x_T, cond, jax.random.key(0), table, 20, 0.0, 1.0, **setup.guidance_args())
    np.testing.assert_allclose(np.asarray(out), g["ddim_sample"], atol=1e-3, rtol=0)


def test_export_round_trips_bit_for_bit(imported, tmp_path):
    """diffusers → diffjax → diffusers gives back every tensor exactly, and the scheduler and
    U-Net configs say the same; importing the export gives the same params."""
    case, workdir, config = imported
    out = tmp_path / "exported"
    assert pipelines.export_diffusers(str(workdir), str(out)) == 0
    original = safetensors.numpy.load_file(pipeline(case) / "unet" / WEIGHTS_FILE)
    written = safetensors.numpy.load_file(out / "unet" / WEIGHTS_FILE)
    assert sorted(written) == sorted(original)
    for name, value in original.items():
        assert written[name].dtype == value.dtype and np.array_equal(written[name], value), name
    for part, file in (("unet", CONFIG_FILE), ("scheduler", "scheduler_config.json")):
        before = json.loads((pipeline(case) / part / file).read_text())
        after = json.loads((out / part / file).read_text())
        differing = {k for k in after if k in before and after[k] != before[k]}
        assert not differing - {"_diffusers_version"}, differing
    assert json.loads((out / "model_index.json").read_text())["unet"][1] == "UNet2DModel"
    again = pipelines.import_diffusers(out, str(tmp_path / "again"), base_config())
    assert again.to_dict() == config.to_dict()
    _, params_a, _ = diffusers_unet.load(pipeline(case) / "unet")
    _, params_b, _ = diffusers_unet.load(out / "unet")
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_load_places_each_param_on_its_sharding(imported):
    """Under FSDP each tensor goes straight to its shard as it is read."""
    case, _, config = imported
    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh.update(data=4, fsdp=2)
    setup = build.Setup(config)
    _, params, _ = diffusers_unet.load(pipeline(case) / "unet", shardings=setup.params_sharding)
    _, plain, _ = diffusers_unet.load(pipeline(case) / "unet")
    leaves = jax.tree.leaves
    split = 0
    for p, q, s in zip(leaves(params), leaves(plain), leaves(setup.params_sharding), strict=True):
        assert p.sharding.is_equivalent_to(s, p.ndim)
        assert np.array_equal(np.asarray(p), np.asarray(q))
        split += not p.sharding.is_fully_replicated
    assert split > 0


@pytest.mark.parametrize(
    ("schedule", "steps", "start", "end"),
    [
        ("linear", 1000, 1e-4, 0.02),
        ("linear", 500, 2e-4, 0.03),
        ("scaled_linear", 1000, 1e-3, 0.02),
    ],
)
def test_scheduler_betas_match_diffusers_formulas(schedule, steps, start, end):
    """diffusers: linear = linspace(start, end, T) (no 1000/T rescaling), scaled_linear =
    linspace(√start, √end, T)²."""
    scheduler = dict(
        _class_name="DDPMScheduler",
        num_train_timesteps=steps,
        beta_schedule=schedule,
        beta_start=start,
        beta_end=end,
    )
    diffusion, _, _ = pipelines.from_scheduler(scheduler, pathlib.Path("s.json"))
    config = default.get_config()
    config.diffusion.update(diffusion)
    betas = np.asarray(build.schedule(config).betas, np.float64)
    want = np.linspace(start, end, steps)
    want = want if schedule == "linear" else np.linspace(start**0.5, end**0.5, steps) ** 2
    np.testing.assert_allclose(betas, want, rtol=1e-6)


def test_scheduler_notes_and_refusals():
    path = pathlib.Path("scheduler_config.json")
    _, sampler, notes = pipelines.from_scheduler(
        dict(_class_name="PNDMScheduler", steps_offset=1, set_alpha_to_one=False), path
    )
    assert sampler["name"] == "ddim" and len(notes) == 1
    assert (sampler["steps_offset"], sampler["set_alpha_to_one"]) == (1, False)
    for bad, word in (
        (dict(beta_schedule="sigmoid"), "beta_schedule"),
        (dict(trained_betas=[0.1, 0.2]), "trained_betas"),
        (dict(variance_type="learned"), "variance_type"),
    ):
        with pytest.raises(PretrainedError, match=word):
            pipelines.from_scheduler(bad, path)


def copy_unet(tmp_path, tensors=None, **config) -> pathlib.Path:
    return copy_model_dir(pipeline("a") / "unet", tmp_path / "unet", tensors, **config)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift='scale_shift'"),
        (dict(class_embed_type="timestep"), "class_embed_type"),
        (dict(act_fn="gelu"), "act_fn='gelu'"),
        (dict(block_out_channels=[8, 12, 16]), "multiple of the first"),
        (dict(up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]), "do not mirror"),
        (dict(down_block_types=["CrossAttnDownBlock2D"] * 3), "down_block_types"),
        (dict(_class_name="UNet3DConditionModel"), "_class_name='UNet3DConditionModel'"),
        (dict(sample_size=None), "sample_size"),
    ],
)
def test_unsupported_settings_are_refused_by_name(tmp_path, change, words):
    with pytest.raises(PretrainedError, match=words.replace("[", r"\[")):
        diffusers_unet.load(copy_unet(tmp_path, **change))


def test_bad_tensors_are_named(tmp_path):
    tensors = safetensors.numpy.load_file(pipeline("a") / "unet" / WEIGHTS_FILE)
    wrong = dict(tensors)
    wrong["mid_block.attentions.0.to_k.weight"] = np.zeros((16, 8), np.float32)
    with pytest.raises(PretrainedError, match=r"to_k.weight has shape \(16, 8\), expected"):
        diffusers_unet.load(copy_unet(tmp_path / "shape", wrong))
    missing = {k: v for k, v in tensors.items() if k != "conv_in.bias"}
    with pytest.raises(PretrainedError, match="lacks tensor conv_in.bias"):
        diffusers_unet.load(copy_unet(tmp_path / "missing", missing))
    extra = {**tensors, "class_embedding.weight": np.zeros((10, 32), np.float32)}
    with pytest.raises(PretrainedError, match="unexpected tensors class_embedding.weight"):
        diffusers_unet.load(copy_unet(tmp_path / "extra", extra))


def test_pickled_weights_are_refused_with_the_conversion(tmp_path):
    directory = copy_unet(tmp_path)
    (directory / WEIGHTS_FILE).rename(directory / "diffusion_pytorch_model.bin")
    with pytest.raises(PretrainedError, match=r"pickled PyTorch.*UNet2DModel.from_pretrained"):
        diffusers_unet.load(directory)


def test_bad_pipelines_are_refused(tmp_path):
    broken = tmp_path / "no_unet"
    shutil.copytree(pipeline("a"), broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(PretrainedError, match="unet/ folder is missing"):
        pipelines.import_diffusers(broken, str(tmp_path / "w1"), base_config())
    no_scheduler = tmp_path / "no_scheduler"
    shutil.copytree(pipeline("a"), no_scheduler)
    (no_scheduler / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(PretrainedError, match="scheduler_config.json is missing"):
        pipelines.import_diffusers(no_scheduler, str(tmp_path / "w2"), base_config())
    sd = tmp_path / "sd"
    shutil.copytree(pipeline("a"), sd)
    index = json.loads((sd / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (sd / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PretrainedError, match="text_encoder/ folder is missing"):
        pipelines.import_diffusers(sd, str(tmp_path / "w3"), base_config())
    index["unet"] = ["diffusers", "UNet3DConditionModel"]
    (sd / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PretrainedError, match="unet is a UNet3DConditionModel"):
        pipelines.import_diffusers(sd, str(tmp_path / "w3"), base_config())
    with pytest.raises(PretrainedError, match="neither model_index.json"):
        pipelines.import_diffusers(tmp_path, str(tmp_path / "w4"), base_config())


def test_import_refuses_a_workdir_with_checkpoints(imported, tmp_path):
    _, workdir, _ = imported
    with pytest.raises(ValueError, match="already holds checkpoints"):
        pipelines.import_diffusers(pipeline("a"), str(workdir), base_config())


def convert_cli(*flags) -> list[str]:
    return [sys.executable, "-m", "diffjax.convert", *flags]


def test_convert_cli_bad_input_is_one_line(tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(pipeline("a"), pickled)
    (pickled / "unet" / WEIGHTS_FILE).rename(pickled / "unet" / "diffusion_pytorch_model.bin")
    full = tmp_path / "full"
    (full / "x").mkdir(parents=True)
    results = run_all(
        {
            "missing": convert_cli("--diffusers=/no/such/dir", f"--workdir={tmp_path / 'w1'}"),
            "both": convert_cli(
                f"--diffusers={pipeline('a')}", f"--to_diffusers={full}", "--workdir=w"
            ),
            "pickled": convert_cli(f"--diffusers={pickled}", f"--workdir={tmp_path / 'w2'}"),
            "no_run": convert_cli(f"--to_diffusers={tmp_path / 'o'}", f"--workdir={tmp_path}"),
        }
    )
    one_line_error(results["missing"], "/no/such/dir is not a directory")
    one_line_error(results["both"], "give one of --diffusers")
    one_line_error(results["pickled"], "pickled PyTorch", "safe_serialization=True")
    one_line_error(results["no_run"], "has no config.json")
    assert not (tmp_path / "w2" / "checkpoints").exists()


@pytest.mark.slow
def test_convert_then_sample_fine_tune_and_export_from_the_cli(tmp_path):
    """The documented chain: import a pipeline onto the digits config, sample it, fine-tune it
    for 3 steps on digits, sample again, export it and import the export."""
    work, data_dir = tmp_path / "w", tmp_path / "tfds"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def run(cmd):
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    base = f"--config={ROOT}/configs/digits.py:tiny"
    run(convert_cli(f"--diffusers={pipeline('b')}", f"--workdir={work}", base))
    config_py = str(work / "config.py")
    fast = ["--config.sampler.name=ddim", "--config.sampler.steps=5", "--num_samples=4"]
    run(cli(config_py, work, data_dir, "--mode=sample", *fast))
    assert (work / "samples" / "sample_0000000.png").is_file()
    done = run(cli(config_py, work, data_dir, "--mode=train", "--config.train.num_steps=3"))
    assert "no data position (an imported model): fine-tuning" in done.stderr
    run(cli(config_py, work, data_dir, "--mode=sample", *fast))
    assert (work / "samples" / "sample_0000003.png").is_file()
    out = tmp_path / "exported"
    done = run(convert_cli(f"--to_diffusers={out}", f"--workdir={work}"))
    assert "from step 3" in done.stdout
    tuned = safetensors.numpy.load_file(out / "unet" / WEIGHTS_FILE)
    original = safetensors.numpy.load_file(pipeline("b") / "unet" / WEIGHTS_FILE)
    assert sorted(tuned) == sorted(original)
    assert any(not np.array_equal(tuned[k], original[k]) for k in original)  # it trained
    run(convert_cli(f"--diffusers={out}", f"--workdir={tmp_path / 'again'}", base))


def test_bfloat16_and_float16_checkpoints_load_upcast(tmp_path):
    """Half-precision checkpoints load into float32 params holding exactly their values."""
    tensors = safetensors.numpy.load_file(pipeline("a") / "unet" / WEIGHTS_FILE)
    _, want, _ = diffusers_unet.load(pipeline("a") / "unet")
    for dtype in (ml_dtypes.bfloat16, np.float16):
        half = {k: v.astype(dtype) for k, v in tensors.items()}
        _, params, _ = diffusers_unet.load(copy_unet(tmp_path / np.dtype(dtype).name, half))
        for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
            assert p.dtype == jnp.float32
            np.testing.assert_array_equal(
                np.asarray(p), np.asarray(q).astype(dtype).astype(np.float32)
            )


def test_scheduler_export_refuses_what_diffusers_cannot_say():
    """A schedule diffusers has no name or setting for is refused by the field, not written as
    a scheduler that would sample another process."""
    config = default.get_config()
    config.diffusion.schedule = "cosine"
    assert pipelines.to_scheduler(config)["beta_schedule"] == "squaredcos_cap_v2"
    config.diffusion.snr_scale = 0.25
    with pytest.raises(pipelines.cli.BadInput, match="diffusion.snr_scale=0.25 has no diffusers"):
        pipelines.to_scheduler(config)
    config.diffusion.update(schedule="sigmoid", snr_scale=1.0)
    with pytest.raises(pipelines.cli.BadInput, match="schedule=.sigmoid' has no diffusers name"):
        pipelines.to_scheduler(config)
