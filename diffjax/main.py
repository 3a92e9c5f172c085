"""Command line: python -m diffjax.main --config configs/<name>.py --workdir <dir> [--mode=...]."""

import logging
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from diffjax import (
    checkpoint,
    cli,
    config_check,
    data,
    edit,
    editor,
    infer,
    latent,
    latent_setup,
    pipelines,
    reconstruct,
    train,
)
from diffjax.data import tokenizer
from diffjax.models import pretrained

# Errors the user fixes (exit 2), and failures of a run that was set up right (exit 1).
BAD_INPUT_ERRORS = (
    cli.BadInput,
    config_check.ConfigError,
    data.DatasetError,
    checkpoint.CheckpointError,
    pretrained.PretrainedError,
    tokenizer.TokenizerError,
    infer.SampleError,
    latent.LatentError,
    reconstruct.ImageFileError,
    editor.EditError,
)
RUNTIME_ERRORS = (train.NonFiniteLossError,)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "sample", "reconstruct", "edit"],
    "train: train (resuming from the workdir); eval: test-split loss of a "
    "checkpoint (an autoencoder's PSNR/SSIM/KL); sample: a grid and .npz of samples from a "
    "checkpoint; reconstruct: --input image files through the config's autoencoder; edit: "
    "--input image files edited by the model (--edit).",
)
flags.DEFINE_enum("edit", None, list(edit.EDITS), "--mode=edit: what to do with --input.")
flags.DEFINE_string("mask", None, "--edit=inpaint: mask image, white = regenerate, black = keep.")
flags.DEFINE_float(
    "strength",
    None,
    "--edit=img2img (default 0.6) / transfer (default 1): how far up the chain to go.",
)
flags.DEFINE_string("extend", None, "--edit=outpaint: pixels per side, e.g. left:16,right:16.")
flags.DEFINE_enum("method", "repaint", list(edit.METHODS), "--edit=inpaint/outpaint: how.")
flags.DEFINE_integer("jump_length", 1, "RePaint: levels per jump back (with --resamplings).")
flags.DEFINE_integer("resamplings", 1, "RePaint: passes over each stretch of levels (1: none).")
flags.DEFINE_string("target_workdir", None, "--edit=transfer: the target domain's model run.")
flags.DEFINE_list(
    "input",
    None,
    "--mode=reconstruct/edit: image files (PNG/JPEG/WebP); reconstruct also takes an .npz of "
    "latents ('mean' [h, w, z]) to decode.",
)
flags.DEFINE_string(
    "output",
    None,
    "--mode=reconstruct/edit: the PNG to write (a directory for several inputs); for "
    "reconstruct, a path ending in .npz gets the posterior's mean and std instead.",
)
flags.DEFINE_bool("overwrite", False, "--mode=reconstruct/edit: replace an existing --output.")
flags.DEFINE_integer("step", None, "Checkpoint step for eval/sample; default the newest.")
flags.DEFINE_integer("num_samples", None, "Samples to draw in --mode=sample.")
flags.DEFINE_string(
    "label",
    None,
    "Class-conditional models, --mode=sample: a class index (every sample of that class) or "
    "'all' (a grid with one row per class). Default: the classes in turn. --mode=edit: a class "
    "index, or 'auto' (img2img, transfer): each input's class as the model reads it.",
)
flags.DEFINE_string(
    "prompt",
    None,
    "Text models, --mode=sample: the text to draw (every sample). Default: the training grid's "
    "prompts in turn.",
)
flags.DEFINE_string(
    "negative_prompt",
    None,
    "Text models, --mode=sample: the null side of guidance instead of the empty prompt.",
)
flags.DEFINE_bool(
    "distributed",
    False,
    "Join a multi-process JAX cluster found from the environment (TPU pod slices, "
    "SLURM, Open MPI, GKE): jax.distributed.initialize() with auto-detection.",
)
flags.DEFINE_string(
    "coordinator",
    None,
    "host:port of process 0, for an explicit cluster (with --num_processes and "
    "--process_id), e.g. several GPU hosts without a cluster manager.",
)
flags.DEFINE_integer("num_processes", None, "Processes in the explicit cluster.")
flags.DEFINE_integer("process_id", None, "This process's index in the explicit cluster.")
flags.DEFINE_integer(
    "heartbeat_timeout_s",
    100,
    "A process that has not heard from a peer for this long exits with an "
    "error instead of waiting forever.",
)
flags.DEFINE_integer(
    "cpu_devices",
    None,
    "CPU devices in this process, the batch split over them: for testing "
    "multi-device code, and on a few-core CPU a speed lever (2 devices sample "
    "1.1-1.2x faster on 2 cores). Overrides config.mesh.cpu_devices.",
)
flags.DEFINE_bool(
    "verbose", False, f"Full tracebacks on errors, for bug reports (or {cli.VERBOSE_ENV}=1)."
)
flags.DEFINE_string(
    "pretrained",
    None,
    "Instead of --config: a diffusers pipeline directory (DDPM or Stable Diffusion), imported "
    "into --workdir on first use (as `python -m diffjax.convert` does); every mode then uses it.",
)
flags.mark_flags_as_required(["workdir"])
# diffjax's own configs/ folder: the base of a --pretrained import (its data, train, optim).
DEFAULT_BASE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "default.py")


def main(argv):
    cli.start(argv)

    def body():
        config = _config()
        cli.check_flags(FLAGS, config)
        _init_distributed(FLAGS.cpu_devices or config.mesh.cpu_devices)
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, FLAGS.workdir)
        elif FLAGS.mode == "eval":
            cli.check_writable_dir(FLAGS.workdir, "--workdir")
            if config.task == "autoencoder":
                print(reconstruct.evaluate_autoencoder(config, FLAGS.workdir, FLAGS.step))
            else:
                print(infer.evaluate(config, FLAGS.workdir, FLAGS.step))
        elif FLAGS.mode == "reconstruct":
            if not FLAGS.input or not FLAGS.output:
                raise cli.BadInput("--mode=reconstruct needs --input FILE[,FILE...] and --output")
            print(
                reconstruct.reconstruct_files(
                    config, FLAGS.workdir, FLAGS.input, FLAGS.output, FLAGS.step, FLAGS.overwrite
                )
            )
        elif FLAGS.mode == "edit":
            print(_edit(config))
        else:
            if config.task == "autoencoder":
                raise cli.BadInput(
                    "an autoencoder is not sampled: use --mode=reconstruct --input ... --output "
                    "..., or --mode=eval"
                )
            cli.check_writable_dir(os.path.join(FLAGS.workdir, "samples"), "--workdir's samples/")
            label = FLAGS.label if FLAGS.label in (None, "all") else int(FLAGS.label)
            print(
                infer.sample(
                    config,
                    FLAGS.workdir,
                    FLAGS.step,
                    FLAGS.num_samples,
                    label,
                    FLAGS.prompt,
                    FLAGS.negative_prompt,
                )
            )

    cli.run_guarded(body, BAD_INPUT_ERRORS, RUNTIME_ERRORS)


def _edit(config) -> list[str]:
    if config.task == "autoencoder":
        raise cli.BadInput("--mode=edit needs a diffusion model's config and workdir")
    if not FLAGS.edit or not FLAGS.input or not FLAGS.output:
        raise cli.BadInput(
            f"--mode=edit needs --edit ({'|'.join(edit.EDITS)}), --input and --output"
        )
    if FLAGS.label == "all":
        raise cli.BadInput(
            "--label=all is for --mode=sample; an edit takes one class index or 'auto'"
        )
    label = FLAGS.label if FLAGS.label in (None, "auto") else int(FLAGS.label)
    return edit.edit_files(
        config, FLAGS.workdir, FLAGS.edit, FLAGS.input, FLAGS.output, mask=FLAGS.mask,
        strength=FLAGS.strength, extend=FLAGS.extend, method=FLAGS.method,
        jump_length=FLAGS.jump_length, resamplings=FLAGS.resamplings,
        target_workdir=FLAGS.target_workdir, label=label, prompt=FLAGS.prompt, step=FLAGS.step,
        overwrite=FLAGS.overwrite,
    )  # fmt: skip


def _config():
    """--config's config, or --pretrained's: the workdir's, importing the pipeline first."""
    if FLAGS.pretrained is None:
        if FLAGS.config is None:
            raise cli.BadInput(
                "--config is required (a config file such as configs/digits.py), or "
                "--pretrained DIR (a diffusers pipeline)"
            )
        return FLAGS.config
    if FLAGS["config"].present:
        raise cli.BadInput(
            "--pretrained and --config: give one (the config of --pretrained comes from the "
            "pipeline; import it with `python -m diffjax.convert --config ...` for another base)"
        )
    if not os.path.isfile(os.path.join(FLAGS.workdir, latent.CONFIG_FILE)):
        if not os.path.isfile(DEFAULT_BASE):
            raise cli.BadInput(f"--pretrained needs diffjax's {DEFAULT_BASE}; it is missing")
        cli.check_writable_dir(FLAGS.workdir, "--workdir")
        base = cli.load_config_file(DEFAULT_BASE)
        pipelines.import_diffusers(FLAGS.pretrained, FLAGS.workdir, base)
    return latent_setup.read_run_config(FLAGS.workdir)


def _init_distributed(cpu_devices: int) -> None:
    """Starts JAX's multi-process runtime, before anything touches a device."""
    if cpu_devices:  # only the CPU backend's device count: GPUs and TPUs are unaffected
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    explicit = (FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise cli.BadInput(
                "an explicit cluster needs all of --coordinator, --num_processes and --process_id"
            )
        jax.distributed.initialize(
            FLAGS.coordinator,
            FLAGS.num_processes,
            FLAGS.process_id,
            heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_s,
        )
    elif FLAGS.distributed:
        jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_s)
    else:
        return
    logging.getLogger("diffjax").info(
        "process %d of %d: %d local and %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def run() -> None:
    """The entry point: absl's app with diffjax's flag parsing (one-line errors, exit 2)."""
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
