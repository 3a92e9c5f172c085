"""Command line: python -m diffjax.main --config configs/<name>.py --workdir <dir> [--mode=...]."""

import logging
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from diffjax import checkpoint, data, train

USER_ERRORS = (train.ConfigError, train.NonFiniteLossError, data.DatasetError,
               checkpoint.CheckpointError)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"],
                  "train: train (resuming from the workdir); eval: test-split loss of a "
                  "checkpoint; sample: a grid and .npz of samples from a checkpoint.")
flags.DEFINE_integer("step", None, "Checkpoint step for eval/sample; default the newest.")
flags.DEFINE_integer("num_samples", None, "Samples to draw in --mode=sample.")
flags.DEFINE_bool("distributed", False,
                  "Join a multi-process JAX cluster found from the environment (TPU pod slices, "
                  "SLURM, Open MPI, GKE): jax.distributed.initialize() with auto-detection.")
flags.DEFINE_string("coordinator", None,
                    "host:port of process 0, for an explicit cluster (with --num_processes and "
                    "--process_id), e.g. several GPU hosts without a cluster manager.")
flags.DEFINE_integer("num_processes", None, "Processes in the explicit cluster.")
flags.DEFINE_integer("process_id", None, "This process's index in the explicit cluster.")
flags.DEFINE_integer("heartbeat_timeout_s", 100,
                     "A process that has not heard from a peer for this long exits with an "
                     "error instead of waiting forever.")
flags.DEFINE_integer("cpu_devices", None,
                     "CPU devices in this process, the batch split over them: for testing "
                     "multi-device code, and on a few-core CPU a speed lever (2 devices sample "
                     "1.1-1.2x faster on 2 cores).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Our progress messages at INFO; the libraries' (Orbax, tfds) chatter only from WARNING up.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("diffjax").setLevel(logging.INFO)
    config = FLAGS.config
    _init_distributed()
    try:
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, FLAGS.workdir)
        elif FLAGS.mode == "eval":
            print(train.evaluate(config, FLAGS.workdir, FLAGS.step))
        else:
            print(train.sample(config, FLAGS.workdir, FLAGS.step, FLAGS.num_samples))
    except USER_ERRORS as e:  # Something the user can fix: the message, not a traceback.
        sys.exit(f"diffjax: {type(e).__name__}: {e}")


def _init_distributed() -> None:
    """Starts JAX's multi-process runtime, before anything touches a device."""
    if FLAGS.cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    explicit = (FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise app.UsageError("an explicit cluster needs all of --coordinator, "
                                 "--num_processes and --process_id")
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                                   heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_s)
    elif FLAGS.distributed:
        jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_s)
    else:
        return
    logging.getLogger("diffjax").info(
        "process %d of %d: %d local and %d global devices", jax.process_index(),
        jax.process_count(), jax.local_device_count(), jax.device_count())


if __name__ == "__main__":
    app.run(main)
