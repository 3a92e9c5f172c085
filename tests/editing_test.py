"""Edits: RePaint's walk and its conditional on a Gaussian toy, SDEdit's ends, exact known
regions, outpainting windows, DDIB's round trip, no recompiles, and the CLI with bad input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cli, one_line_error, run_all
from PIL import Image

from configs import digits, digits_class
from diffjax import build, editing, image_io, latent_setup, samplers, schedules, spatial
from diffjax import edit as edit_lib
from diffjax.cond import NONE
from diffjax.editor import EditError, Editor
from diffjax.image_io import ImageFileError

RNG = np.random.default_rng(0)


def test_repaint_walk_goes_down_jumps_back_and_counts_its_network_calls():
    table = samplers.timestep_table(1000, 20)
    walk, n = editing.repaint_table(table, 20, jump_length=5, resamplings=3)
    assert walk[0] == table[0] and walk[n] == -1 and len(walk) == n + 1
    moves = np.diff(walk)
    ups = np.flatnonzero(moves > 0)
    # Jump points at levels 5, 10, 15 (the clean end excluded), 2 jumps each, 5 levels up.
    assert len(ups) == 6
    assert all(walk[i + 1] == table[list(table).index(walk[i]) - 5] for i in ups)
    assert editing.network_calls(walk, n) == 20 + 2 * 5 * 3
    plain, m = editing.repaint_table(table, 20, 5, 1)
    assert m == 20 and np.array_equal(plain, table[:21])
    with pytest.raises(ValueError, match="jump_length"):
        editing.repaint_table(table, 20, 0, 2)


# A correlated Gaussian over 4 coordinates, with its exact denoiser E[x_0 | x_t].
_MU = np.array([0.3, -0.2, 0.1, 0.4])
_COV = 0.25 * np.array(
    [[1, 0.9, 0.8, 0.7], [0.9, 1, 0.9, 0.8], [0.8, 0.9, 1, 0.9], [0.7, 0.8, 0.9, 1]]
)


def _gaussian_denoiser(s):
    def denoise(x_t, t, cond=None):
        ab = s.alpha_bar[t[0]]  # one level per call
        a = jnp.sqrt(ab)
        gain = a * _COV @ jnp.linalg.inv(ab * _COV + (1 - ab) * jnp.eye(4))
        x = x_t.reshape(-1, 4)
        x0 = _MU + (x - a * _MU) @ gain.T
        return ((x - a * x0) / jnp.sqrt(1 - ab)).reshape(x_t.shape).astype(x_t.dtype)

    return denoise


def test_repaint_with_resampling_draws_the_exact_gaussian_conditional():
    s = schedules.make_schedule("linear", 1000)
    keep_idx, free = [0, 3], [1, 2]
    known_v = np.array([0.8, 0.0, 0.0, -0.3], np.float32)
    b = 2000
    args = {
        "known": jnp.broadcast_to(known_v.reshape(1, 1, 4, 1), (b, 1, 4, 1)),
        "keep": jnp.broadcast_to(jnp.array([1.0, 0, 0, 1]).reshape(1, 1, 4, 1), (b, 1, 4, 1)),
    }
    k, u = np.ix_(keep_idx, keep_idx), np.ix_(free, keep_idx)
    mean = _MU[free] + _COV[u] @ np.linalg.solve(_COV[k], known_v[keep_idx] - _MU[keep_idx])
    cov = _COV[np.ix_(free, free)] - _COV[u] @ np.linalg.solve(_COV[k], _COV[u].T)
    table = samplers.timestep_table(1000, 200)
    errors = {}
    for r in (1, 8):
        walk, n = editing.repaint_table(table, 200, jump_length=1, resamplings=r)
        run = jax.jit(
            lambda walk, n: samplers.ddpm_sample(
                _gaussian_denoiser(s), s, jax.random.normal(jax.random.key(0), (b, 1, 4, 1)),
                NONE, jax.random.key(1), walk, n, pred=samplers.EPS_UNCLIPPED,
                hook=editing.replace_known(s, args), jumps=True,
            )
        )  # fmt: skip
        out = np.asarray(run(walk, n)).reshape(b, 4)
        assert np.array_equal(out[:, keep_idx], np.broadcast_to(known_v[keep_idx], (b, 2)))
        errors[r] = (
            np.abs(out[:, free].mean(0) - mean).max(),
            np.abs(np.cov(out[:, free].T) - cov).max(),
        )
    # Plain replacement (r = 1) is biased (RePaint §4.2: the regions do not harmonise; 0.086
    # here); 8 resamplings per level reach the conditional within Monte Carlo error (the
    # mean's standard error is 0.004 at this N).
    assert errors[1][0] > 0.05, errors
    assert errors[8][0] < 0.025 and errors[8][1] < 0.008, errors


@pytest.fixture(scope="module")
def tiny_editor(tmp_path_factory):
    """digits.py:tiny at its initialisation (speed and exactness do not depend on training)."""
    config = digits.get_config("tiny")
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    setup = build.Setup(config)
    return Editor(setup, setup.create_state().ema_params)


def test_img2img_strength_0_is_the_input_and_1_is_plain_sampling(tiny_editor):
    ed = tiny_editor
    x = RNG.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
    key = jax.random.key(4)
    assert np.array_equal(ed.img2img(x, 0.0, key), x)
    plain = ed.setup.sample_fn(8)(ed.params, key, ed.setup.labels_cond(np.zeros(8)))
    np.testing.assert_allclose(ed.img2img(x, 1.0, key), np.asarray(plain), atol=1e-6)
    half = ed.img2img(x, 0.5, key)
    assert not np.allclose(half, x) and not np.allclose(half, np.asarray(plain))
    with pytest.raises(ValueError, match="strength"):
        ed.img2img(x, 1.5, key)


def test_an_editor_follows_the_config_sampler_changed_between_calls(tiny_editor):
    ed, s = tiny_editor, tiny_editor.setup.config.sampler
    x = RNG.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
    key = jax.random.key(5)
    name = s.name
    first = ed.img2img(x, 0.6, key)
    try:
        s.name = "ddim" if name != "ddim" else "ddpm"
        other = ed.img2img(x, 0.6, key)
    finally:
        s.name = name
    assert not np.allclose(first, other)  # a study's new sampler, not the first one's program
    np.testing.assert_array_equal(ed.img2img(x, 0.6, key), first)


def test_inpaint_keeps_the_known_region_exactly_and_new_masks_compile_nothing(
    tiny_editor, compiles
):
    ed = tiny_editor
    x = RNG.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)  # 3: padded to the 8 devices
    masks = np.zeros((3, 8, 8, 1), np.float32)
    masks[0, 4:], masks[1, :, :3], masks[2, 2:6, 2:6] = 1, 1, 1
    out = ed.inpaint(x, masks, jax.random.key(0))
    assert out.shape == x.shape
    assert np.array_equal(out[masks == 0], x[masks == 0])
    assert not np.allclose(out[masks == 1], x[masks == 1])
    ed.img2img(x, 0.3, jax.random.key(0))
    with compiles.none_expected("other images, masks, keys and strengths"):
        other = ed.inpaint(-x, masks[::-1], jax.random.key(1))
        ed.img2img(-x, 0.7, jax.random.key(1))
    assert np.array_equal(other[masks[::-1] == 0], -x[masks[::-1] == 0])
    with pytest.raises(ValueError, match="empty"):
        ed.inpaint(x, np.zeros_like(masks), jax.random.key(0))


def test_outpaint_fills_a_canvas_wider_than_the_model_window_by_window(tiny_editor):
    ed = tiny_editor
    x = RNG.uniform(-1, 1, (8, 8, 1)).astype(np.float32)
    out = ed.outpaint(x, {"left": 6, "right": 7, "top": 0, "bottom": 2}, jax.random.key(0))
    assert out.shape == (10, 21, 1) and np.isfinite(out).all()
    assert np.array_equal(out[0:8, 6:14], x)
    assert np.abs(out).max() <= 1.0
    starts = editing.window_starts(21, 8)
    assert starts == [0, 4, 8, 12, 13]
    keep = np.zeros((10, 21, 1))
    keep[:8, 6:14] = 1
    assert editing.next_window(keep, (8, 8)) in [(0, 4), (0, 8), (2, 4), (2, 8)]


def test_transfer_to_the_same_model_is_the_ddim_round_trip(tmp_path, compiles):
    x = np.clip(RNG.normal(0, 0.5, (8, 8, 8, 1)), -1, 1).astype(np.float32)
    config = digits.get_config("tiny")
    config.data.data_dir = str(tmp_path)
    config.diffusion.num_steps = 1000
    config.sampler.update(steps=50, max_steps=200)
    setup = build.Setup(config)
    ed = Editor(setup, setup.create_state().ema_params)
    errors = [float(np.sqrt(np.mean((ed.transfer(x, ed) - x) ** 2)))]
    with compiles.none_expected("another step count"):
        config.sampler.steps = 200
        errors.append(float(np.sqrt(np.mean((ed.transfer(x, ed) - x) ** 2))))
    # First order in the step, as the inversion itself (tests/samplers_test.py).
    assert errors[1] < 0.4 * errors[0] and errors[1] < 1e-4, errors
    assert np.array_equal(ed.transfer(x, ed, strength=0.0), x)
    half = ed.transfer(x, ed, strength=0.5)  # inverted half way up, sampled back from there
    assert float(np.sqrt(np.mean((half - x) ** 2))) < 1e-4
    with pytest.raises(EditError, match="num_classes=0"):
        ed.transfer(x, ed, label="auto")


@pytest.mark.slow  # ~30 s of compiling; the CLI's --label=auto runs in conditional_test
def test_auto_labels_are_the_classes_the_model_reads_and_transfer_under_them(tmp_path):
    x = np.clip(RNG.normal(0, 0.5, (6, 8, 8, 1)), -1, 1).astype(np.float32)
    config = digits_class.get_config("tiny")
    config.data.data_dir = str(tmp_path)
    config.diffusion.num_steps = 1000
    config.sampler.update(steps=100, max_steps=100, guidance_scale=1.0)
    setup = build.Setup(config)
    ed = Editor(setup, setup.create_state().ema_params)
    labels, errors = ed.classify(x, trials=8)
    assert errors.shape == (6, 10) and np.array_equal(labels, errors.argmin(1))
    assert np.array_equal(ed.classify(x, trials=8)[1], errors)  # the same draws
    auto = ed.transfer(x, ed, label="auto", strength=0.5)
    np.testing.assert_array_equal(auto, ed.transfer(x, ed, label=ed.classify(x)[0], strength=0.5))
    assert float(np.sqrt(np.mean((auto - x) ** 2))) < 1e-3  # the round trip under those classes
    with pytest.raises(EditError, match=r"labels must be in \[0, 9\]"):
        ed.img2img(x, 0.5, jax.random.key(0), label=10)


# Two classes of data, x_0 | k ~ N(μ_k, σ²) per pixel, with the exact class-conditional ε.
_MUS, _SIG = np.array([-0.5, 0.4]), 0.2


def _class_denoiser(s):
    def denoise(x_t, t, c):
        ab = s.alpha_bar[t].reshape(-1, 1, 1, 1)
        mu = jnp.asarray(_MUS, x_t.dtype)[c.label].reshape(-1, 1, 1, 1)
        # E[x_0 | x_t, k] is linear in x_t; its ε is √(1-ᾱ) (x_t - √ᾱ μ_k) / (ᾱσ² + 1 - ᾱ).
        return jnp.sqrt(1 - ab) * (x_t - jnp.sqrt(ab) * mu) / (ab * _SIG**2 + 1 - ab)

    return denoise


def test_diffusion_classifier_errors_are_the_closed_form_and_pick_the_class():
    s = schedules.make_schedule("linear", 1000)
    ts = editing.classifier_timesteps(1000, 2000)  # every t twice
    assert ts[0] == 0 and ts[-1] == 999 and np.all(np.bincount(ts) == 2)
    # Images whose pixels all equal x_0, at and between the class means.
    values = np.array([-0.5, 0.4, -0.2, 0.0, 0.3], np.float32)
    x0 = np.broadcast_to(values[:, None, None, None], (5, 16, 16, 1))
    cond = NONE.replace(label=jnp.zeros(5, jnp.int32))
    run = jax.jit(
        lambda x, key: editing.class_errors(
            _class_denoiser(s), s, x, cond, 2, jnp.asarray(ts), key, samplers.EPS_UNCLIPPED
        )
    )
    errors = np.asarray(run(jnp.asarray(x0), jax.random.key(7)))
    # E‖ε - ε̂_k‖² = (ᾱ²σ⁴ + ᾱ(1-ᾱ)(x_0 - μ_k)²) / (ᾱσ² + 1 - ᾱ)², averaged over the trials' t.
    ab = np.asarray(s.alpha_bar, np.float64)[ts][:, None, None]
    dev = values[None, :, None] - _MUS[None, None, :]
    exact = np.mean((ab**2 * _SIG**4 + ab * (1 - ab) * dev**2) / (ab * _SIG**2 + 1 - ab) ** 2, 0)
    np.testing.assert_allclose(errors, exact, rtol=0.02)
    # Data drawn from each class: the least error is the class it came from.
    labels = np.arange(20) % 2
    draws = _MUS[labels][:, None, None, None] + _SIG * RNG.normal(size=(20, 8, 8, 1))
    cond = NONE.replace(label=jnp.zeros(20, jnp.int32))
    found = jax.jit(
        lambda x: editing.class_errors(
            _class_denoiser(s), s, x, cond, 2, jnp.asarray(ts[::100]), jax.random.key(1),
            samplers.EPS_UNCLIPPED,
        )
    )(jnp.asarray(draws, jnp.float32))  # fmt: skip
    np.testing.assert_array_equal(np.argmin(found, 1), labels)
    with pytest.raises(ValueError, match="trials"):
        editing.classifier_timesteps(1000, 0)


def test_inputs_of_another_size_are_resized_with_the_models_filter():
    im = RNG.uniform(-1, 1, (4, 4, 1)).astype(np.float32)
    blocks = image_io.fit(im, (8, 8), "--input a.png", "nearest")
    np.testing.assert_array_equal(blocks, im.repeat(2, 0).repeat(2, 1))
    np.testing.assert_allclose(image_io.fit(blocks, (4, 4), "x", "box"), im, atol=1e-6)
    assert not np.allclose(image_io.fit(im, (8, 8), "x"), blocks)  # bicubic, the default
    with pytest.raises(ImageFileError, match="aspect ratio"):
        image_io.fit(im, (8, 4), "x")


def _png(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    data_dir, work = tmp_path_factory.mktemp("tfds"), tmp_path_factory.mktemp("px")
    cmd = cli("digits.py:tiny", work, data_dir, "--config.train.num_steps=3")
    rc, _, err = run_all({"train": cmd})["train"]
    assert rc == 0, err[-3000:]
    return data_dir, work


@pytest.mark.slow
def test_every_edit_from_the_cli_and_bad_input_is_one_line(pixel_run, tmp_path):
    data_dir, work = pixel_run
    img = _png(tmp_path / "in.png", RNG.integers(0, 256, (8, 8)))
    big = _png(tmp_path / "big.png", RNG.integers(0, 256, (16, 16, 3)))
    wide = _png(tmp_path / "wide.png", RNG.integers(0, 256, (8, 12)))
    half = np.zeros((8, 8), np.uint8)
    half[4:] = 255
    mask = _png(tmp_path / "mask.png", half)
    grey = _png(tmp_path / "grey.png", np.full((8, 8), 128))
    empty = _png(tmp_path / "empty.png", np.zeros((8, 8)))
    mask16 = _png(tmp_path / "mask16.png", np.zeros((16, 16)))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    exists = tmp_path / "exists.png"
    exists.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()

    def edit(*flags):
        return cli("digits.py:tiny", work, data_dir, "--mode=edit", *flags)

    cases = {
        "img2img": edit("--edit=img2img", "--strength=0.5", f"--input={img},{big}",
                        f"--output={out}"),
        "inpaint": edit("--edit=inpaint", f"--input={img}", f"--mask={mask}",
                        f"--output={out}/inpaint.png", "--jump_length=2", "--resamplings=2"),
        "outpaint": edit("--edit=outpaint", f"--input={img}", "--extend=left:4,bottom:3",
                         f"--output={out}/outpaint.png", "--cpu_devices=1"),
        "transfer": edit("--edit=transfer", f"--input={img}", f"--target_workdir={work}",
                         f"--output={out}/transfer.png"),
        "strength": edit("--edit=img2img", "--strength=1.5", f"--input={img}",
                         f"--output={tmp_path}/x.png"),
        "wrong mode": cli("digits.py:tiny", work, data_dir, "--mode=sample", f"--mask={mask}"),
        "grey mask": edit("--edit=inpaint", f"--input={img}", f"--mask={grey}",
                          f"--output={tmp_path}/g.png"),
    }  # fmt: skip
    results = run_all(cases)
    for name in ("img2img", "inpaint", "outpaint", "transfer"):
        assert results[name][0] == 0, (name, results[name][2][-3000:])
    edited = {p: np.asarray(Image.open(out / p)) for p in os.listdir(out)}
    assert set(edited) == {"in_img2img.png", "big_img2img.png", "inpaint.png", "outpaint.png",
                           "transfer.png"}  # fmt: skip
    source = np.asarray(Image.open(img))
    assert edited["in_img2img.png"].shape == (8, 8)
    assert "resizing 16x16" in results["img2img"][2]  # the RGB 16x16 input, resized and grey
    assert np.array_equal(edited["inpaint.png"][:4], source[:4])
    assert edited["outpaint.png"].shape == (11, 12)
    assert np.array_equal(edited["outpaint.png"][:8, 4:], source)
    one_line_error(results["strength"], "strength must be in [0, 1]")
    one_line_error(results["wrong mode"], "--mask", "--mode=edit only")
    config = latent_setup.read_run_config(str(work))
    bad = {  # the same checks in-process (the CLI prints each as one line, exit 2)
        "needs --mask": dict(edit="inpaint", inputs=[img]),
        "mask is empty": dict(edit="inpaint", inputs=[img], mask=empty),
        "must match": dict(edit="inpaint", inputs=[img], mask=mask16),
        "not a readable image": dict(edit="img2img", inputs=[f"{tmp_path}/broken.png"]),
        "no such file": dict(edit="img2img", inputs=[f"{tmp_path}/none.png"]),
        "--overwrite": dict(edit="img2img", inputs=[img], output=str(exists)),
        "aspect ratio": dict(edit="img2img", inputs=[wide]),
        "is not used by": dict(edit="img2img", inputs=[img], mask=mask),
    }
    for words, kw in bad.items():
        kw.setdefault("output", f"{tmp_path}/x.png")
        with pytest.raises((EditError, ImageFileError), match=words):
            edit_lib.edit_files(config, str(work), **kw)
    assert exists.read_bytes() == b"keep me" and not (tmp_path / "x.png").exists()
    rc, _, err = results["grey mask"]
    assert rc == 0 and "mask is all white" in err and "not black and white" in err, err[-2000:]


def test_spatial_conditions_low_res_upsampling_and_masks():
    x = RNG.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    low = np.asarray(spatial.low_res(jnp.asarray(x), 4))
    box = [
        np.stack([np.asarray(Image.fromarray(im[..., k]).resize((2, 2), Image.Resampling.BOX))
                  for k in range(3)], -1)
        for im in x
    ]  # fmt: skip
    np.testing.assert_allclose(low, np.stack(box), atol=1e-6)
    # Bicubic interpolation reproduces a linear ramp away from the borders.
    ramp = np.tile(np.linspace(-0.5, 0.5, 8, dtype=np.float32)[None, :, None], (8, 1, 1))[None]
    up = np.asarray(spatial.upsample(jnp.asarray(ramp), (32, 32)))
    np.testing.assert_allclose(np.diff(up[0, 8, 6:26, 0]), (1 / 7) / 4, atol=1e-5)
    masks = np.asarray(spatial.random_masks(jax.random.key(0), 300, (16, 16)))
    assert masks.shape == (300, 16, 16, 1) and set(np.unique(masks)) == {0.0, 1.0}
    cover = masks.mean(axis=(1, 2, 3))
    assert 0.05 < cover.min() and cover.max() < 0.9 and 0.2 < cover.mean() < 0.6, cover
    edges = [masks[:, 0], masks[:, -1], masks[:, :, 0], masks[:, :, -1]]
    whole_edge = np.any([e.all(axis=(1, 2)) for e in edges], axis=0)
    assert 0.2 < whole_edge.mean() < 0.6, (
        whole_edge.mean()
    )  # border bands (and big boxes) take whole edges
    again = np.asarray(spatial.random_masks(jax.random.key(0), 300, (16, 16)))
    assert np.array_equal(masks, again)
    cond = np.asarray(spatial.inpaint_condition(jnp.asarray(x[:, :, :, :1]), masks[:2, :8, :8]))
    assert cond.shape == (2, 8, 8, 2) and np.all(cond[..., 0][masks[:2, :8, :8, 0] == 1] == 0)


@pytest.mark.parametrize("kind", ["upscale", "inpaint"])
def test_trained_edits_condition_on_the_image(kind, tmp_path):
    config = digits.get_config("tiny")
    config.data.data_dir = str(tmp_path)
    config.spatial.update(kind=kind, factor=2)
    setup = build.Setup(config)
    ed = Editor(setup, setup.create_state().ema_params)
    x = RNG.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    if kind == "upscale":
        assert ed.low_res_size == (4, 4)
        out = ed.upscale(x[:, ::2, ::2], jax.random.key(0))
        assert out.shape == (3, 8, 8, 1) and np.isfinite(out).all()
        with pytest.raises(EditError, match="upscales"):
            ed.upscale(x, jax.random.key(0))
    else:
        mask = np.zeros((3, 8, 8, 1), np.float32)
        mask[:, 2:6] = 1
        out = ed.inpaint(x, mask, jax.random.key(0), method="trained")
        assert np.array_equal(out[mask == 0], x[mask == 0])
        with pytest.raises(EditError, match="spatial.kind='inpaint'"):
            ed.inpaint(x, mask, jax.random.key(0))  # RePaint on it would drop its condition
    with pytest.raises(EditError, match="without a spatial condition"):
        ed.img2img(x, 0.5, jax.random.key(0))


@pytest.mark.slow
def test_trained_super_resolution_and_inpainting_from_the_cli(tmp_path):
    runs = {n: tmp_path / n for n in ("sr", "in")}
    data = {n: tmp_path / f"tfds_{n}" for n in runs}  # two processes must not prepare one dir
    results = run_all({
        "sr": cli("sr_digits.py:tiny", runs["sr"], data["sr"], "--config.train.num_steps=3"),
        "in": cli("digits_inpaint.py:tiny", runs["in"], data["in"], "--config.train.num_steps=3"),
    })  # fmt: skip
    for name, (rc, _, err) in results.items():
        assert rc == 0, (name, err[-3000:])
    conds = np.load(runs["sr"] / "samples" / "step_0000003.npz")["conditions"]
    assert conds.shape[1:] == (8, 8, 1)  # the preview's conditions: the eval split's digits
    low = _png(tmp_path / "low.png", RNG.integers(0, 256, (2, 2)))
    img = _png(tmp_path / "in.png", RNG.integers(0, 256, (8, 8)))
    half = np.zeros((8, 8), np.uint8)
    half[:, 4:] = 255
    mask = _png(tmp_path / "mask.png", half)

    def edit(config, run, *flags):
        return cli(config, run, data[run.name], "--mode=edit", *flags)

    results = run_all({
        "upscale": edit("sr_digits.py:tiny", runs["sr"], "--edit=upscale", f"--input={low}",
                        f"--output={tmp_path}/up.png"),
        "inpaint": edit("digits_inpaint.py:tiny", runs["in"], "--edit=inpaint", f"--input={img}",
                        f"--mask={mask}", "--method=trained", f"--output={tmp_path}/in_out.png"),
        "outpaint": edit("digits_inpaint.py:tiny", runs["in"], "--edit=outpaint",
                         f"--input={img}", "--extend=right:4", "--method=trained",
                         f"--output={tmp_path}/out.png"),
        "wrong": edit("digits_inpaint.py:tiny", runs["in"], "--edit=upscale", f"--input={low}",
                      f"--output={tmp_path}/w.png"),
    })  # fmt: skip
    for name in ("upscale", "inpaint", "outpaint"):
        assert results[name][0] == 0, (name, results[name][2][-3000:])
    assert np.asarray(Image.open(tmp_path / "up.png")).shape == (8, 8)
    source = np.asarray(Image.open(img))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "in_out.png"))[:, :4], source[:, :4])
    assert np.asarray(Image.open(tmp_path / "out.png")).shape == (8, 12)
    one_line_error(results["wrong"], "spatial.kind='upscale'")
