"""Class-conditional digits end to end: train, resume, sample by label from the CLI, bad labels."""

import json
import logging
import os

import numpy as np
import pytest
from conftest import ROOT, cli, one_line_error, run_all
from PIL import Image

from configs import digits_class
from diffjax import build, checkpoint, config_check, train


def _config(data_dir, **train_overrides):
    config = digits_class.get_config("tiny")
    config.data.data_dir = str(data_dir)
    config.train.update(train_overrides)
    return config


def _cli(workdir, data_dir, *flags):
    return cli("digits_class.py:tiny", workdir, data_dir, *flags)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny class-conditional run: 4 steps, then resumed to 6 in the same workdir (both here,
    so each test of the module also runs alone); returns data_dir, workdir and the resume's log."""
    data_dir, work = tmp_path_factory.mktemp("tfds"), tmp_path_factory.mktemp("run")
    train.train_and_evaluate(_config(data_dir, num_steps=4, checkpoint_every_steps=2), str(work))
    logger, records = logging.getLogger("diffjax"), _Records()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(records)
    try:
        train.train_and_evaluate(
            _config(data_dir, num_steps=6, checkpoint_every_steps=2), str(work)
        )
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    return data_dir, work, "\n".join(records.lines)


def test_train_resume_and_the_final_grid_cover_every_class(trained):
    data_dir, work, resume_log = trained
    assert "resumed from step 4" in resume_log
    ckpt = checkpoint.Checkpointer(str(work / "checkpoints"))
    assert ckpt.all_steps()[-1] == 6
    ckpt.close()
    final = np.load(work / "samples" / "step_0000006.npz")
    # Without --label the classes come in turn: 16 samples, a grid column per class.
    np.testing.assert_array_equal(final["labels"], np.arange(16) % 10)
    settings = json.loads(str(final["settings"]))
    assert settings["guidance_scale"] == "2.0" and settings["sampler"] == "ddpm"


def test_sample_by_label_from_the_cli(trained):
    data_dir, work, _ = trained
    results = run_all(
        {
            "three": _cli(work, data_dir, "--mode=sample", "--label=3", "--num_samples=8"),
            "all": _cli(
                work,
                data_dir,
                "--mode=sample",
                "--label=all",
                "--num_samples=20",
                "--config.sampler.guidance_scale=4",
                "--step=2",
            ),
        }
    )
    for name, (rc, _, err) in results.items():
        assert rc == 0, (name, err[-3000:])
    three = np.load(work / "samples" / "sample_0000006.npz")
    assert three["images"].shape == (8, 8, 8, 1) and set(three["labels"]) == {3}
    grid = np.load(work / "samples" / "sample_0000002.npz")
    np.testing.assert_array_equal(grid["labels"], np.repeat(np.arange(10), 2))
    png = Image.open(work / "samples" / "sample_0000002.png")
    assert png.text["label"] == "all" and png.text["guidance_scale"] == "4.0"
    assert png.text["checkpoint_step"] == "2"
    # A row per class: 2 columns of upscaled 8x8 cells (6x -> 48 px, 3 px padding).
    assert png.size[0] < png.size[1]


def test_bad_labels_are_one_line_errors_and_auto_reads_the_class_for_edits(trained, tmp_path):
    data_dir, work, _ = trained
    before = sorted(os.listdir(work / "samples"))
    unconditional = cli("digits.py:tiny", work, None, "--mode=sample", "--label=3")
    digit = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), np.uint8)).save(digit)
    edit = ("--mode=edit", f"--input={digit}", "--label=auto")
    results = run_all(
        {
            "transfer_auto": _cli(
                work,
                data_dir,
                *edit,
                "--edit=transfer",
                f"--target_workdir={work}",
                f"--output={tmp_path / 'out.png'}",
            ),  # fmt: skip
            "auto_in_sample": _cli(work, data_dir, "--mode=sample", "--label=auto"),
            "auto_inpaint": _cli(
                work,
                data_dir,
                *edit,
                "--edit=inpaint",
                f"--mask={digit}",
                f"--output={tmp_path / 'never.png'}",
            ),  # fmt: skip
            "out_of_range": _cli(work, data_dir, "--mode=sample", "--label=10"),
            "not_a_class": _cli(work, data_dir, "--mode=sample", "--label=seven"),
            "in_train": _cli(work, data_dir, "--label=3"),
            "unconditional": unconditional,
            "guidance_without_dropout": _cli(
                work, data_dir, "--mode=sample", "--config.model.cond_drop_prob=0"
            ),
        }
    )
    rc, out, err = results.pop("transfer_auto")
    assert rc == 0, err[-3000:]
    assert "classes read from the inputs:" in err and (tmp_path / "out.png").exists()
    expected = {
        "auto_in_sample": ["--label=auto", "--mode=edit"],
        "auto_inpaint": ["--label=auto", "--edit=img2img/transfer"],
        "out_of_range": ["--label=10", "[0, 9]"],
        "not_a_class": ["--label=seven", "'all'"],
        "in_train": ["--label is for --mode=sample"],
        "unconditional": ["unconditional", "num_classes=0"],
        "guidance_without_dropout": ["sampler.guidance_scale", "cond_drop_prob"],
    }
    for name, result in results.items():
        one_line_error(result, *expected[name])
    assert sorted(os.listdir(work / "samples")) == before
    assert not (tmp_path / "never.png").exists()


def test_num_classes_is_checked_against_the_dataset_before_compiling(tmp_path, compiles):
    config = _config(tmp_path / "tfds")
    config.model.num_classes = 7
    source = build.open_split(config, "train")
    with compiles.none_expected("the label check"):
        with pytest.raises(config_check.ConfigError, match="has 10 classes; set model.num_cl"):
            build.check_dataset_labels(config, source)


@pytest.mark.slow  # the slow tier: `pytest -m slow`, CI's second step
def test_classifier_trains_in_the_loop_and_guides_an_unconditional_model(tmp_path):
    from configs import digits, digits_classifier

    data_dir = tmp_path / "tfds"
    cls_config = digits_classifier.get_config("tiny")
    cls_config.data.data_dir = str(data_dir)
    train.train_and_evaluate(cls_config, str(tmp_path / "cls"))
    lines = [json.loads(x) for x in (tmp_path / "cls" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= x["train/accuracy"] <= 1 for x in lines if "train/loss" in x)
    assert not (tmp_path / "cls" / "samples").exists()  # a classifier has no grid
    model_config = digits.get_config("tiny")
    model_config.data.data_dir = str(data_dir)
    model_config.train.num_steps = 2
    train.train_and_evaluate(model_config, str(tmp_path / "model"))
    guide = [
        f"--config.sampler.classifier_config={ROOT}/configs/digits_classifier.py:tiny",
        f"--config.sampler.classifier_workdir={tmp_path / 'cls'}",
        "--config.sampler.classifier_scale=3",
    ]
    cmd = lambda *flags: cli(
        "digits.py:tiny", tmp_path / "model", data_dir, "--mode=sample", *flags
    )
    results = run_all(
        {
            "guided": cmd("--label=3", "--num_samples=8", *guide),
            "no_workdir": cmd("--label=3", guide[0]),
            "not_a_classifier": cmd(
                "--label=3",
                f"--config.sampler.classifier_config={ROOT}/configs/digits.py:tiny",
                guide[1],
            ),
            "label_out_of_range": cmd("--label=12", *guide),
        }
    )
    rc, _, err = results["guided"]
    assert rc == 0, err[-3000:]
    z = np.load(tmp_path / "model" / "samples" / "sample_0000002.npz")
    assert set(z["labels"]) == {3} and np.isfinite(z["images"]).all()
    expected = {
        "no_workdir": "needs both sampler.classifier_config and sampler.classifier_workdir",
        "not_a_classifier": "is not a classifier's config",
        "label_out_of_range": "label=12",
    }
    for name, words in expected.items():
        one_line_error(results[name], words)
