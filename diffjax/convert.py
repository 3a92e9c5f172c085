"""diffusers checkpoints ↔ diffjax workdirs, from the command line (`diffjax.pipelines`).

    python -m diffjax.convert --diffusers DIR --workdir W [--config configs/cifar10.py]
    python -m diffjax.main --config W/config.py --workdir W --mode=sample   # or eval, edit, train
    python -m diffjax.convert --to_diffusers OUT --workdir W [--step N]

DIR is a DDPM pipeline (`model_index.json`, `unet/`, `scheduler/`), a bare `UNet2DModel`
folder, or a Stable Diffusion 1.x/2.x pipeline. The import writes W/config.json (the base
config, `--config`, with its model, diffusion, sampler, text, latent and image size taken from
DIR), W/config.py that loads it, and an Orbax checkpoint at step 0 whose params and EMA are the
pretrained weights, so every mode of `diffjax.main` uses it and `--mode=train` fine-tunes it.
The export writes a checkpoint's EMA weights (`--params=ema`, or the raw `params`) back as a
diffusers directory: a `DDPMPipeline` for a pixel-space U-Net, an `AutoencoderKL` folder for an
autoencoder run.
"""

from __future__ import annotations

from absl import app, flags

from diffjax import checkpoint, cli, config_check, latent_setup, pipelines
from diffjax.models.pretrained import PretrainedError

FLAGS = flags.FLAGS
flags.DEFINE_string("diffusers", None, "A diffusers pipeline or UNet2DModel directory to import.")
flags.DEFINE_string("to_diffusers", None, "Export the workdir's checkpoint to this directory.")
flags.DEFINE_string("workdir", None, "The diffjax workdir written (import) or read (export).")
flags.DEFINE_string("config", "configs/default.py", "Import: the base config[:variant].")
flags.DEFINE_integer("step", None, "Export: the checkpoint step (default: the newest).")
flags.DEFINE_enum("params", "ema", ["ema", "params"], "Export: the EMA or the raw weights.")
flags.DEFINE_bool("overwrite", False, "Export: replace the files of an existing directory.")
flags.DEFINE_bool("verbose", False, f"Full tracebacks on errors (or {cli.VERBOSE_ENV}=1).")
flags.mark_flag_as_required("workdir")


def main(argv):
    cli.start(argv)

    def body():
        if bool(FLAGS.diffusers) == bool(FLAGS.to_diffusers):
            raise cli.BadInput(
                "give one of --diffusers DIR (import) or --to_diffusers DIR (export)"
            )
        if FLAGS.diffusers:
            cli.check_writable_dir(FLAGS.workdir, "--workdir")
            cli.add_config_root(["", f"--config={FLAGS.config}"])
            config = pipelines.import_diffusers(
                FLAGS.diffusers, FLAGS.workdir, cli.load_config_file(FLAGS.config)
            )
            print(
                f"wrote {FLAGS.workdir} ({config.model.base_channels}x"
                f"{tuple(config.model.channel_mults)} U-Net, {config.diffusion.schedule} β, "
                f"T={config.diffusion.num_steps}, target {config.diffusion.target}); sample with "
                f"python -m diffjax.main --config {FLAGS.workdir}/config.py --workdir "
                f"{FLAGS.workdir} --mode=sample"
            )
        else:
            cli.check_writable_dir(FLAGS.to_diffusers, "--to_diffusers")
            step = pipelines.export_diffusers(
                FLAGS.workdir, FLAGS.to_diffusers, FLAGS.step, FLAGS.params, FLAGS.overwrite
            )
            print(f"wrote {FLAGS.to_diffusers} from step {step} ({FLAGS.params} weights)")

    errors = (
        cli.BadInput,
        config_check.ConfigError,
        checkpoint.CheckpointError,
        PretrainedError,
        latent_setup.LatentError,
    )
    cli.run_guarded(body, errors)


if __name__ == "__main__":
    app.run(main)
