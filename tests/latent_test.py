"""Latent diffusion: the scale estimate, the latent cache, and the whole chain from the CLI
(autoencoder → latent model → decoded samples), with its bad inputs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cli, one_line_error, run_all
from PIL import Image

from configs import digits_latent
from diffjax import build, latent, latent_setup, spatial


def test_scale_estimate_on_data_with_a_known_std():
    z = np.random.default_rng(0).normal(0.3, 2.5, size=(4096, 4, 4, 4))
    assert latent.estimate_scale(z) == pytest.approx(1 / 2.5, rel=0.01)
    with pytest.raises(latent.LatentError):
        latent.estimate_scale(np.zeros((4, 2, 2, 1)))


def _cache(n=5, value=0.0):
    mean = np.full((n, 1, 2, 2, 4), value, np.float32)
    return mean, np.ones_like(mean), np.arange(n, dtype=np.int32)


def test_the_cache_is_used_when_valid_and_rebuilt_when_the_autoencoder_changes(tmp_path):
    path_a = latent.cache_path(str(tmp_path), "digits", "train", 32, 1, False, "a" * 64)
    latent.write_cache(path_a, "a" * 64, *_cache(value=1.0))
    got = latent.read_cache(path_a, "a" * 64, 5)
    np.testing.assert_array_equal(got["mean"], _cache(value=1.0)[0])
    assert latent.read_cache(path_a, "a" * 64, 6) is None  # the dataset changed size
    # Another autoencoder: another file; writing it removes the stale one.
    path_b = latent.cache_path(str(tmp_path), "digits", "train", 32, 1, False, "b" * 64)
    assert path_b != path_a and latent.read_cache(path_b, "b" * 64, 5) is None
    latent.write_cache(path_b, "b" * 64, *_cache(value=2.0))
    assert not os.path.exists(path_a) and latent.read_cache(path_b, "b" * 64, 5) is not None
    with open(path_b, "wb") as f:  # a damaged file is rebuilt, not trusted
        f.write(b"not an npz")
    assert latent.read_cache(path_b, "b" * 64, 5) is None


def test_cached_source_records_and_flip_views():
    mean = np.stack([np.zeros((3, 2, 2, 4)), np.ones((3, 2, 2, 4))], axis=1).astype(np.float32)
    src = latent.CachedSource(
        {"mean": mean, "std": mean + 1, "label": np.arange(3)}, ["a", "b", "c"]
    )
    from diffjax.data import make_train_iterator

    it = make_train_iterator(
        src, image_size=8, channels=1, global_batch=3, seed=0, random_flip=True
    )
    batch = next(it)
    assert set(batch) == {"latent_mean", "latent_std", "label"}
    # Each example takes the view of the image (0) or of its mirror (1), with its own std.
    means = batch["latent_mean"].reshape(3, -1)
    assert set(np.unique(means)) <= {0.0, 1.0}
    np.testing.assert_array_equal(batch["latent_std"], batch["latent_mean"] + 1)
    assert src[2]["text"] == "c" and src[2]["label"] == 2


def test_latent_spatial_conditions_fold_onto_the_grid_and_flip_with_their_latents():
    # spatial.fold against an explicit loop over the f x f blocks.
    x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
    folded = np.asarray(spatial.fold(jnp.asarray(x), 4))
    assert folded.shape == (2, 2, 3, 48)
    for i, j, di, dj in np.ndindex(2, 3, 4, 4):
        k = (di * 4 + dj) * 3
        np.testing.assert_array_equal(folded[:, i, j, k : k + 3], x[:, 4 * i + di, 4 * j + dj])
    config = digits_latent.get_config("inpaint_tiny")
    c = build.conditioner(config, (4, 4, 4))  # 16x16 digits, 4x4x4 latents: f = 4
    assert (c.spatial_fold, c.concat_shape) == (4, (4, 4, 32))
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (3, 16, 16, 1)), jnp.float32)
    concat = c.from_batch({"image": images, "label": np.zeros(3)}, None, jax.random.key(0)).concat
    assert concat.shape == (3, 4, 4, 32)  # the masked image's and the mask's 16 pixels per cell
    # A cached latent record carries its image too, flipped together with the latents' view.
    mean = np.stack([np.zeros((4, 2, 2, 4)), np.ones((4, 2, 2, 4))], axis=1).astype(np.float32)
    ramp = np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 30, (8, 1, 1))
    records = [{"image": ramp, "label": 0} for _ in range(4)]
    src = latent.CachedSource({"mean": mean, "std": mean + 1, "label": np.arange(4)}, None, records)
    from diffjax.data import make_train_iterator

    batch = next(
        make_train_iterator(src, image_size=8, channels=1, global_batch=4, seed=0, random_flip=True)
    )
    flipped = batch["latent_mean"].reshape(4, -1)[:, 0] == 1
    rising = batch["image"][:, 0, -1, 0] > batch["image"][:, 0, 0, 0]
    np.testing.assert_array_equal(rising, ~flipped)


def _ae(work, data_dir, *flags):
    return cli("vae_digits.py:tiny", work, data_dir, *flags)


def _lat(work, data_dir, ae_work, *flags, variant="tiny"):
    return cli(
        f"digits_latent.py:{variant}", work, data_dir,
        f"--config.latent.autoencoder_workdir={ae_work}", *flags,
    )  # fmt: skip


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory):
    data_dir, work = tmp_path_factory.mktemp("tfds"), tmp_path_factory.mktemp("vae")
    rc, _, err = run_all({"train": _ae(work, data_dir, "--config.train.num_steps=3")})["train"]
    assert rc == 0, err[-3000:]
    rc, _, err = run_all({"resume": _ae(work, data_dir)})["resume"]  # to the config's 6 steps
    assert rc == 0 and "resumed from step 3" in err, err[-3000:]
    assert sorted(os.listdir(work / "checkpoints")) == ["3", "6"]
    assert os.path.exists(work / "samples" / "step_0000006.png")  # reconstructions
    return data_dir, work


def test_latent_model_trains_resumes_and_samples_decoded_images(autoencoder_run, tmp_path):
    data_dir, ae_work = autoencoder_run
    work = tmp_path / "latent"
    rc, _, err = run_all({"t": _lat(work, data_dir, ae_work, "--config.train.num_steps=3")})["t"]
    assert rc == 0, err[-3000:]
    assert "latent scale 1/std" in err and "encoding the" in err
    caches = os.listdir(data_dir / "latent_cache")
    assert len(caches) == 1
    results = run_all(
        {
            "resume": _lat(work, data_dir, ae_work),  # to the config's 6 steps
            "ae_eval": _ae(ae_work, data_dir, "--mode=eval"),
        }
    )
    rc, _, err = results["resume"]
    assert rc == 0 and "resumed from step 3" in err and "training from the latent cache" in err, (
        err[-3000:]
    )
    assert results["ae_eval"][0] == 0, results["ae_eval"][2][-3000:]
    metrics = [json.loads(x) for x in open(ae_work / "metrics.jsonl")]
    evals = [m for m in metrics if "eval/psnr" in m]
    assert evals and {"eval/ssim", "eval/kl", "eval/bicubic_psnr"} <= set(evals[-1])
    rc, out, err = run_all(
        {
            "s": _lat(
                work,
                data_dir,
                ae_work,
                "--mode=sample",
                "--num_samples=4",
                "--config.sampler.name=ddim",
                "--config.sampler.steps=5",
            )
        }  # fmt: skip
    )["s"]
    assert rc == 0, err[-3000:]
    images = np.load(work / "samples" / "sample_0000006.npz")["images"]
    # Decoded pixels, not latents: 16x16x1 in [-1, 1].
    assert images.shape == (4, 16, 16, 1) and images.min() >= -1 and images.max() <= 1
    # The scale and the autoencoder's fingerprint travel in the checkpoint's metadata.
    meta = json.load(open(work / "checkpoints" / "6" / "data" / "metadata"))
    assert meta["latent"]["scale"] > 0 and len(meta["latent"]["autoencoder"]) == 64


def test_latent_bad_input_is_one_line_and_writes_nothing(autoencoder_run, tmp_path):
    data_dir, ae_work = autoencoder_run
    pixel = tmp_path / "pixel"
    pixel.mkdir()
    (pixel / "config.json").write_text(json.dumps({"task": "diffusion"}))
    work = lambda name: tmp_path / name
    results = run_all(
        {
            "missing": _lat(work("a"), data_dir, tmp_path / "nowhere"),
            "not_an_autoencoder": _lat(work("b"), data_dir, pixel),
            "channels": _lat(work("c"), data_dir, ae_work, "--config.data.channels=3"),
            "clip": _lat(work("d"), data_dir, ae_work, "--config.sampler.clip_x0=True"),
            "bad_z": _ae(work("e"), data_dir, "--config.autoencoder.latent_channels=0"),
            "lpips": _ae(work("f"), data_dir, "--config.autoencoder.perceptual_weight=1.0"),
            "diffusers_missing_tensor": _lat(
                work("g"),
                data_dir,
                "",
                "--config.data.channels=3",
                f"--config.latent.diffusers_vae={tmp_path / 'no_vae'}",
            ),  # fmt: skip
        }
    )
    one_line_error(results["missing"], "autoencoder_workdir", "not there")
    one_line_error(results["not_an_autoencoder"], "task='diffusion'", "not an autoencoder")
    one_line_error(results["channels"], "data.channels=3")
    one_line_error(results["clip"], "sampler.clip_x0")
    one_line_error(results["bad_z"], "autoencoder.latent_channels")
    one_line_error(results["lpips"], "perceptual_weight")
    one_line_error(results["diffusers_missing_tensor"], "no_vae")
    for name in "abcdefg":
        assert not (work(name) / "checkpoints").exists(), name


@pytest.mark.slow
def test_text_latent_model_samples_a_prompt_and_refuses_another_autoencoder(
    autoencoder_run, tmp_path
):
    data_dir, ae_work = autoencoder_run
    work = tmp_path / "text"
    rc, _, err = run_all({"t": _lat(work, data_dir, ae_work, variant="text_tiny")})["t"]
    assert rc == 0, err[-3000:]
    rc, _, err = run_all(
        {
            "s": _lat(
                work,
                data_dir,
                ae_work,
                "--mode=sample",
                "--num_samples=4",
                "--prompt=a handwritten 3",
                variant="text_tiny",
            )
        }  # fmt: skip
    )["s"]
    assert rc == 0, err[-3000:]
    assert np.load(work / "samples" / "sample_0000006.npz")["images"].shape == (4, 16, 16, 1)
    _every_edit_of_a_latent_model(work, data_dir, ae_work, tmp_path)
    # Another autoencoder (a second run, other weights) under the same latent workdir: refused.
    other = tmp_path / "other_vae"
    rc, _, err = run_all({"o": _ae(other, data_dir, "--config.seed=1")})["o"]
    assert rc == 0, err[-3000:]
    result = run_all(
        {"r": _lat(work, data_dir, other, "--config.train.num_steps=9", variant="text_tiny")}
    )["r"]
    one_line_error(result, "another autoencoder")
    assert sorted(os.listdir(work / "checkpoints")) == ["3", "6"]


def _every_edit_of_a_latent_model(work, data_dir, ae_work, tmp_path):
    """Each edit from the CLI on the text latent model, under a prompt: masks go to the latent
    grid, results are decoded, and the kept pixels are the input's exactly."""
    rng = np.random.default_rng(0)
    img, mask = tmp_path / "in.png", tmp_path / "mask.png"
    source = rng.integers(0, 256, (16, 16)).astype(np.uint8)
    Image.fromarray(source).save(img)
    m = np.zeros((16, 16), np.uint8)
    m[:, 5:11] = 255  # not on the f = 2 grid's cell boundaries everywhere: cells round outwards
    Image.fromarray(m).save(mask)
    out = tmp_path / "edits"
    out.mkdir()

    def edit(name, *flags):
        return _lat(work, data_dir, ae_work, "--mode=edit", f"--edit={name}", f"--input={img}",
                    f"--output={out}/{name}.png", "--prompt=a handwritten 3", *flags,
                    variant="text_tiny")  # fmt: skip

    results = run_all(
        {
            "img2img": edit("img2img", "--strength=0.6"),
            "inpaint": edit("inpaint", f"--mask={mask}", "--resamplings=2", "--jump_length=2"),
            "outpaint": edit("outpaint", "--extend=right:8"),
            "transfer": edit("transfer", f"--target_workdir={work}"),
        }
    )
    for name, (rc, _, err) in results.items():
        assert rc == 0, (name, err[-3000:])
    edited = {n: np.asarray(Image.open(out / f"{n}.png")) for n in results}
    assert edited["img2img"].shape == edited["transfer"].shape == (16, 16)
    assert np.array_equal(edited["inpaint"][m == 0], source[m == 0])
    assert not np.array_equal(edited["inpaint"][m > 0], source[m > 0])
    assert edited["outpaint"].shape == (16, 24) and np.array_equal(
        edited["outpaint"][:, :16], source
    )


@pytest.mark.slow
def test_latent_super_resolution_and_trained_inpainting_from_the_cli(autoencoder_run, tmp_path):
    data_dir, ae_work = autoencoder_run
    runs = {v: tmp_path / v for v in ("sr_tiny", "inpaint_tiny")}
    results = run_all({v: _lat(w, data_dir, ae_work, variant=v) for v, w in runs.items()})
    for name, (rc, _, err) in results.items():
        assert rc == 0, (name, err[-3000:])
    rng = np.random.default_rng(0)
    low, img, mask = tmp_path / "low.png", tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(rng.integers(0, 256, (4, 4)).astype(np.uint8)).save(low)
    source = rng.integers(0, 256, (16, 16)).astype(np.uint8)
    Image.fromarray(source).save(img)
    m = np.zeros((16, 16), np.uint8)
    m[9:] = 255
    Image.fromarray(m).save(mask)

    def edit(variant, *flags):
        return _lat(runs[variant], data_dir, ae_work, "--mode=edit", *flags, variant=variant)

    results = run_all({
        "upscale": edit("sr_tiny", "--edit=upscale", f"--input={low}",
                        f"--output={tmp_path}/up.png"),
        "inpaint": edit("inpaint_tiny", "--edit=inpaint", "--method=trained", f"--input={img}",
                        f"--mask={mask}", f"--output={tmp_path}/filled.png"),
        "outpaint": edit("inpaint_tiny", "--edit=outpaint", "--method=trained", f"--input={img}",
                         "--extend=top:8", f"--output={tmp_path}/out.png"),
    })  # fmt: skip
    for name, (rc, _, err) in results.items():
        assert rc == 0, (name, err[-3000:])
    assert np.asarray(Image.open(tmp_path / "up.png")).shape == (16, 16)
    filled = np.asarray(Image.open(tmp_path / "filled.png"))
    assert np.array_equal(filled[:9], source[:9]) and not np.array_equal(filled[9:], source[9:])
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == (24, 16) and np.array_equal(out[8:], source)


def test_a_run_config_written_before_a_section_existed_reads_with_it_off(tmp_path):
    config = digits_latent.get_config("tiny")
    latent_setup.write_run_config(config, str(tmp_path))
    stored = json.load(open(tmp_path / "config.json"))
    del stored["spatial"]  # as an older diffjax wrote it
    json.dump(stored, open(tmp_path / "config.json", "w"))
    again = latent_setup.read_run_config(str(tmp_path))
    assert again.spatial.kind == "" and again.model.base_channels == config.model.base_channels
