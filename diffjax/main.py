"""Command line: python -m diffjax.main --config configs/<name>.py --workdir <dir> [--mode=...]."""

import logging
import sys

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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Our progress messages at INFO; the libraries' (Orbax, tfds) chatter only from WARNING up.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("diffjax").setLevel(logging.INFO)
    config = FLAGS.config
    try:
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, FLAGS.workdir)
        elif FLAGS.mode == "eval":
            print(train.evaluate(config, FLAGS.workdir, FLAGS.step))
        else:
            print(train.sample(config, FLAGS.workdir, FLAGS.step, FLAGS.num_samples))
    except USER_ERRORS as e:  # Something the user can fix: the message, not a traceback.
        sys.exit(f"diffjax: {type(e).__name__}: {e}")


if __name__ == "__main__":
    app.run(main)
