"""Orbax checkpoints of the whole train state plus the data iterator's position."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """No usable checkpoint could be restored."""


class Checkpointer:
    """Saves and restores (train state, data-iterator state) per step, keeping the last K.

    Saves are asynchronous: `save` returns once the arrays are copied off the device; call
    `wait()` (or `close()`) before reading the files.
    """

    def __init__(self, directory: str, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        # A save killed mid-write leaves `<step>.orbax-checkpoint-tmp`: never a complete
        # checkpoint, so it is removed when a manager opens the directory.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, data_state: dict | None = None) -> None:
        """Writes `state` (a pytree of arrays) and a JSON-able data-iterator state at `step`."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
        )
        self._manager.save(step, args=args, force=True)

    def restore(
        self, abstract_state: Any, step: int | None = None, *, set_aside: bool = False
    ) -> tuple[Any, dict, int]:
        """Restores into the structure, dtypes and shardings of `abstract_state`.

        Args:
          abstract_state: a pytree of `jax.ShapeDtypeStruct` with shardings (e.g. from
            `jax.eval_shape` on the state factory).
          step: a step to restore; None = the newest one that restores cleanly. A newest
            checkpoint that fails to restore (truncated, corrupt) is reported and skipped in
            favour of the one before it; it is left on disk for inspection.
          set_aside: rename the unreadable steps newer than the restored one to
            `<step>.corrupt-<time>` (kept, never deleted), so that training can write that step
            again; for training only (eval and sample leave the directory as it is).

        Returns:
          (state, data_state, step).
        """
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"no checkpoint for step {step} in {self.directory}; available steps: {steps}"
                )
            candidates = [step]
        else:
            candidates = steps[::-1]
        if not candidates:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        errors = []
        with _quiet_closed_loop_callbacks():
            return self._restore_first(abstract_state, candidates, errors, set_aside)

    def _restore_first(self, abstract_state, candidates, errors, set_aside):
        for s in candidates:
            try:
                out = self._manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
                _check_finite(out["state"], s)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable.
                errors.append(f"step {s}: {type(e).__name__}: {str(e)[:300]}")
                logging.warning(
                    "checkpoint at step %d in %s cannot be restored (%s); %s",
                    s,
                    self.directory,
                    e.__class__.__name__,
                    "trying the previous one" if s != candidates[-1] else "none left",
                )
                continue
            if set_aside and errors:
                self._set_aside(candidates[: candidates.index(s)])
            return out["state"], dict(out["data"] or {}), s
        raise CheckpointError(
            f"no checkpoint in {self.directory} could be restored:\n  "
            + "\n  ".join(errors)
            + "\nIf every step fails the same way, the config probably differs from the one "
            "that wrote them (model shape, diffusion.num_steps, learned_variance): run with "
            "that config. Otherwise move the damaged step folders away, or use a fresh "
            "--workdir."
        )

    def _set_aside(self, steps: list[int]) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if jax.process_index() == 0:
            for s in steps:
                src = os.path.join(self.directory, str(s))
                dst = f"{src}.corrupt-{stamp}"
                os.rename(src, dst)
                logging.warning(
                    "moved the unreadable checkpoint of step %d aside to %s; "
                    "training will write step %d again",
                    s,
                    dst,
                    s,
                )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("diffjax: unreadable checkpoints set aside")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


@contextlib.contextmanager
def _quiet_closed_loop_callbacks():
    """Drops the "Event loop is closed" RuntimeErrors that a failed Orbax read leaves behind.

    When a restore fails on damaged files, tensorstore finishes its outstanding reads after
    Orbax has closed the asyncio loop that awaited them; each late callback raises in a
    tensorstore thread and Python reports it as an unraisable exception (a traceback on stderr
    per array, though nothing is wrong: the restore already failed and was reported). When it
    fails on shapes instead (another network's config), the array reads it abandoned are closed
    unfinished, and each Orbax read coroutine reports its own exception the same way. Those can
    come after the restore has returned, so the filter stays for the rest of the process; every
    other unraisable exception still reaches the hook that was there before.
    """
    if not getattr(sys.unraisablehook, "_diffjax_quiet", False):
        previous = sys.unraisablehook

        def hook(unraisable):
            if not _abandoned_read(unraisable):
                previous(unraisable)

        hook._diffjax_quiet = True
        sys.unraisablehook = hook
    try:
        yield
    finally:
        import gc

        gc.collect()  # late callbacks held by cycles fire now


def _abandoned_read(unraisable) -> bool:
    value, obj = unraisable.exc_value, unraisable.object
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None)  # an abandoned coroutine of Orbax's
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _check_finite(state: Any, step: int) -> None:
    for leaf in jax.tree.leaves(state):
        if np.issubdtype(leaf.dtype, np.floating) and not bool(jax.numpy.isfinite(leaf).all()):
            raise CheckpointError(f"checkpoint at step {step} holds non-finite values")
