"""Scalars of a run to TensorBoard and to `metrics.jsonl` in the workdir."""

from __future__ import annotations

import json
import os

import jax


class MetricWriter:
    """Scalars to TensorBoard event files and to `metrics.jsonl` in the workdir (process 0)."""

    def __init__(self, workdir: str, resumed_step: int | None = None):
        """`resumed_step`: training restarts after this step, so the train lines of later steps
        (from a run that crashed before its next checkpoint) are dropped, and a line cut short
        by a crash too: the file then reads as if the run had never been interrupted."""
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter

            path = os.path.join(workdir, "metrics.jsonl")
            _trim_metrics(path, resumed_step)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._file = open(path, "a")

    def write(self, step: int, scalars: dict) -> None:
        if not self.active:
            return
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._file.write(json.dumps({"step": step, **scalars}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self.active:
            self._tb.close()
            self._file.close()


def _trim_metrics(path: str, resumed_step: int | None) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()

    def keep(line):
        try:
            record = json.loads(line)
        except ValueError:
            return False  # cut short by a crash mid-write
        trained = any(k.startswith("train/") for k in record)
        return not (trained and resumed_step is not None and record["step"] > resumed_step)

    kept = [line for line in lines if line.endswith("\n") and keep(line)]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
