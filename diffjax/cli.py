"""The command line's boundary: flags and config files checked, one-line errors, exit codes."""

from __future__ import annotations

import ctypes
import difflib
import importlib.util
import logging
import os
import platform
import sys
import tempfile
import traceback

import ml_collections

# Exit codes (the CLI convention): success, a failure while running, bad input from the user.
OK, RUNTIME_FAILURE, BAD_INPUT = 0, 1, 2
VERBOSE_ENV = "DIFFJAX_VERBOSE"  # =1: full tracebacks, for bug reports (same as --verbose)
MALLOC_ENV = "DIFFJAX_MALLOC"  # tuned (= unset) | default: glibc as it is (keep_freed_memory)
# glibc's mallopt parameters (malloc.h) and the values the entry points set: blocks up to
# 256 MiB come from the heap, and up to 1 GiB of freed heap is kept for reuse.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 256 * 2**20, 2**30


class BadInput(ValueError):
    """Something on the command line (a flag, the config file, the workdir) that the user fixes."""


def fail(message: str, code: int, exc: BaseException | None = None) -> None:
    """Prints `diffjax: <message>` (plus the traceback when verbose) and exits with `code`."""
    if exc is not None and verbose():
        traceback.print_exception(exc)
    sys.stderr.write(f"diffjax: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def start(argv: list[str]) -> None:
    """An entry point's first lines: stray arguments refused; diffjax's progress messages at
    INFO, the libraries' (Orbax, tfds) chatter only from WARNING up."""
    from absl import logging as absl_logging

    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]} (flags are --name=value)", BAD_INPUT)
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("diffjax").setLevel(logging.INFO)
    try:
        keep_freed_memory()
    except ValueError as e:
        fail(str(e), BAD_INPUT)


def keep_freed_memory() -> bool:
    """Has glibc's malloc keep freed memory for reuse rather than hand it back to the system.

    XLA:CPU allocates and frees its buffers on every step. By default glibc maps large blocks
    fresh and trims freed heap, so each step faults its pages back in: ~15,000 page faults per
    digits train step, and with these settings the step takes ~0.85x the time
    (experiments/bench/bench_unet.py --malloc). The cost: freed memory stays with the process,
    up to TRIM_THRESHOLD. Returns whether the settings were applied: not on other C libraries,
    nor with DIFFJAX_MALLOC=default.

    Raises:
      ValueError: DIFFJAX_MALLOC is neither unset, 'tuned' nor 'default'.
    """
    value = os.environ.get(MALLOC_ENV, "tuned")
    if value not in ("tuned", "default"):
        raise ValueError(f"{MALLOC_ENV}={value!r}: use 'tuned' (the same as unset) or 'default'")
    if value == "default" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) if str(e) else ""
    if isinstance(e, BadInput):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def run_guarded(body, bad_input: tuple[type, ...], runtime: tuple[type, ...] = ()):
    """Runs `body()`; the user's errors (`bad_input`) exit 2 with their message, `runtime`
    failures exit 1, and anything else (a bug) exits 1 saying how to get the traceback."""
    try:
        return body()
    except bad_input as e:  # something the user can fix: the message, not a traceback
        fail(one_line(e), BAD_INPUT, e)
    except runtime as e:
        fail(one_line(e), RUNTIME_FAILURE, e)
    except Exception as e:  # a bug or an environment failure: say how to report it
        if verbose():
            raise
        fail(
            f"{one_line(e)} (an unexpected error: rerun with --verbose or {VERBOSE_ENV}=1 for "
            "the traceback)",
            RUNTIME_FAILURE,
        )


def verbose(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    flag = any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0") or flag


# --- the config file and its overrides ----------------------------------------------------------


def _flag_values(argv: list[str], name: str) -> list[tuple[str, str | None]]:
    """(flag, value) for `--name=v`, `--name v` and `--name.field=v` style arguments."""
    out = []
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--":
            break
        if not arg.startswith(f"--{name}"):
            continue
        flag, eq, value = arg[2:].partition("=")
        if flag != name and not flag.startswith(f"{name}."):
            continue
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            value = nxt if nxt is not None and not nxt.startswith("--") else None
        out.append((flag, value))
    return out


def add_config_root(argv: list[str]) -> None:
    """Makes `from configs import default` work from any directory: a config file in a folder
    `configs/` imports its siblings as the package `configs`, so that folder's parent goes on
    sys.path (configs/ of this repository, or of a user's own project)."""
    for flag, value in _flag_values(argv, "config"):
        if flag == "config" and value:
            folder = os.path.dirname(os.path.abspath(value.partition(":")[0]))
            if os.path.basename(folder) == "configs":
                root = os.path.dirname(folder)
                if root not in sys.path:
                    sys.path.insert(0, root)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path[:variant]` the way `config_flags` does, with one clear error per failure.

    Raises:
      BadInput: missing file, a directory, a syntax error, a failing import, no `get_config`,
        or an error raised by `get_config` (an unknown variant).
    """
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise BadInput(
            f"--config: no such file {path!r} (give a config file such as "
            f"configs/digits.py, relative to {os.getcwd()} or absolute)"
        )
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".py") and f != "__init__.py")
        hint = f"; it holds {', '.join(found)}" if found else ""
        raise BadInput(f"--config: {path} is a directory, not a config file{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        compile(source, path, "exec")
    except SyntaxError as e:
        raise BadInput(f"--config: syntax error in {path}, line {e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--config: cannot read {path}: {e}") from None
    spec_ = importlib.util.spec_from_file_location("diffjax_config_check", path)
    module = importlib.util.module_from_spec(spec_)
    try:
        spec_.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the file raises is the user's to fix
        raise BadInput(f"--config: {path} failed to load: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise BadInput(f"--config: {path} has no get_config() function")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001 - e.g. the config's own "unknown variant" error
        where = f"{path}:{arg}" if arg else path
        raise BadInput(f"--config: {where}: {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise BadInput(
            f"--config: {path}: get_config() returned a {type(config).__name__}, "
            f"not an ml_collections.ConfigDict"
        )
    return config


def check_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    """Every `--config.a.b=v` must name an existing field; a misspelling gets a suggestion."""
    for flag, _ in _flag_values(argv, "config"):
        if flag == "config":
            continue
        node, walked = config, "config"
        for key in flag.split(".")[1:]:
            if not isinstance(node, ml_collections.ConfigDict):
                raise BadInput(f"--{flag}: {walked} is a value, not a section")
            if key not in node:
                close = difflib.get_close_matches(key, list(node.keys()), n=1, cutoff=0.5)
                hint = (
                    f"; did you mean {walked}.{close[0]}?"
                    if close
                    else (f"; {walked} has {', '.join(sorted(node.keys()))}")
                )
                raise BadInput(f"--{flag}: {walked} has no field {key!r}{hint}")
            node, walked = node[key], f"{walked}.{key}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every error as one line and exit code 2 (for `app.run`)."""
    from absl import flags

    add_config_root(argv)
    specs = [v for f, v in _flag_values(argv, "config") if f == "config"]
    try:
        if specs and specs[-1]:
            check_overrides(load_config_file(specs[-1]), argv)
        rest = flags.FLAGS(argv)
        if flags.FLAGS["config"].present:
            flags.FLAGS.config  # noqa: B018 - raises a deferred load error now, not mid-run
    except BadInput as e:
        fail(str(e), BAD_INPUT)
    except flags.Error as e:
        fail(f"{str(e).splitlines()[0]} (see --helpshort)", BAD_INPUT, e)
    except Exception as e:  # noqa: BLE001 - config_flags' own errors while applying overrides
        fail(
            f"bad flags: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            BAD_INPUT,
            e,
        )
    return rest


# --- the workdir and other paths ----------------------------------------------------------------


def check_writable_dir(path: str, what: str) -> None:
    """Creates `path` if needed and proves it writable with a real file (permission bits do not
    tell for root, network filesystems or read-only mounts)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise BadInput(f"{what} {path} exists and is not a directory; choose another path")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".diffjax-write-check-"):
            pass
    except OSError as e:
        raise BadInput(
            f"{what} {path} is not writable ({e.strerror or e}); fix its "
            f"permissions or choose another path"
        ) from None


def check_flags(fv, config: ml_collections.ConfigDict) -> None:
    """The flags that the config checks cannot see, refused before anything is built.

    Args:
      fv: the parsed absl flags of `diffjax.main` (`absl.flags.FLAGS`).
      config: the run's config.
    """
    if fv.step is not None and fv.step < 0:
        raise BadInput(f"--step={fv.step}: a checkpoint step is >= 0")
    if fv.num_samples is not None and fv.num_samples < 1:
        raise BadInput(f"--num_samples={fv.num_samples}: must be >= 1")
    sp, lt = config.sampler, config.latent
    guided = bool(sp.classifier_workdir or sp.classifier_config)
    _check_label(fv.label, config.model.num_classes, guided, fv.mode)
    _check_prompts(fv, config.text.encoder)
    edit_only = ("edit", "mask", "strength", "extend", "target_workdir")
    used = [f"--{n}" for n in edit_only if getattr(fv, n) is not None]
    if fv.mode != "edit" and used:
        raise BadInput(f"{', '.join(used)}: for --mode=edit only")
    if fv.cpu_devices is not None and fv.cpu_devices < 1:
        raise BadInput(f"--cpu_devices={fv.cpu_devices}: must be >= 1 (or leave it out)")
    if fv.mode == "train":
        if fv.step is not None:
            raise BadInput(
                "--step picks a checkpoint for --mode=eval/sample; training "
                "always resumes from the newest one (drop --step)"
            )
        if fv.label is not None:
            raise BadInput("--label is for --mode=sample (training sees the dataset's labels)")
        if fv.prompt is not None or fv.negative_prompt is not None:
            raise BadInput("--prompt is for --mode=sample (training sees the captions)")
        if fv.num_samples is not None:
            raise BadInput(
                "--num_samples is for --mode=sample; the training grids use "
                "--config.train.num_samples"
            )
        check_writable_dir(fv.workdir, "--workdir")
    elif fv.mode == "reconstruct" and (lt.autoencoder_workdir or lt.diffusers_vae):
        return  # the latent config's own autoencoder: no checkpoint of the workdir is read
    elif not os.path.isdir(fv.workdir):
        what = "a file, not a workdir" if os.path.exists(fv.workdir) else "not there"
        raise BadInput(
            f"--workdir {fv.workdir} is {what}: --mode={fv.mode} reads "
            f"the checkpoints a --mode=train run wrote there"
        )


def _check_label(label: str | None, num_classes: int, classifier_guided: bool, mode: str) -> None:
    if label is None or (classifier_guided and not num_classes):  # the classifier's classes
        return
    if not num_classes:
        raise BadInput(
            f"--label={label}: this model is unconditional (config.model.num_classes=0); "
            f"sample it without --label, or train a class-conditional one (configs/digits_class.py)"
        )
    if label == "auto" and mode != "edit":
        raise BadInput("--label=auto (the class read from the input) is for --mode=edit")
    if label not in ("all", "auto") and not (label.isdigit() and int(label) < num_classes):
        raise BadInput(
            f"--label={label}: a class index in [0, {num_classes - 1}], 'all' (--mode=sample) "
            f"or 'auto' (--mode=edit) (config.model.num_classes={num_classes})"
        )


def _check_prompts(fv, encoder: str) -> None:
    given = [f for f in ("prompt", "negative_prompt") if fv[f].value is not None]
    if given and not encoder:
        raise BadInput(
            f"--{given[0]}: this model has no text conditioning (config.text.encoder=''); "
            f"train a text model (configs/digits_text.py)"
        )
    if fv.prompt is not None and not fv.prompt.strip():
        raise BadInput("--prompt is empty: give the text to draw, e.g. --prompt='a handwritten 3'")
