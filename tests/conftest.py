"""Test set-up: the JAX CPU backend with 8 simulated devices, set before JAX is imported."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
# LLVM optimisation level 0: the tiny test programs compile ~40% faster and run slower, which
# the suite, dominated by compilation, gains from. CLI subprocesses inherit it (TEST_XLA_FLAGS).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8"
).strip()
# One persistent compilation cache per test run, shared with the CLI subprocesses the tests
# start: the tiny models' programs compile once per run, not once per test and process (most
# of the suite's time on 2 cores is XLA compiling). Fresh each run, so no stale entry is read.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_CACHE = tempfile.mkdtemp(prefix="diffjax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import contextlib  # noqa: E402 - after the environment above, like every import of JAX
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(config: str, workdir, data_dir=None, *flags) -> list[str]:
    """The command line of the real CLI for `configs/<config>` (e.g. "digits.py:tiny")."""
    data = [f"--config.data.data_dir={data_dir}"] if data_dir is not None else []
    config = config if os.path.isabs(config) else f"{ROOT}/configs/{config}"
    return [sys.executable, "-m", "diffjax.main", "--config", config, f"--workdir={workdir}",
            *data, *flags]  # fmt: skip


def run_all(cases: dict, cwd=ROOT, timeout=600) -> dict:
    """Runs every case's command at once (each mostly waits on imports and compiles):
    {name: (returncode, stdout, stderr)}."""
    env = {**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
    procs = {
        name: subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, cmd in cases.items()
    }
    return {name: (p.wait(timeout=timeout), *p.communicate()) for name, p in procs.items()}


def one_line_error(result, *words) -> str:
    """Asserts a bad-input result: exit code 2, one `diffjax:` line holding `words`, no
    traceback. Returns that line."""
    rc, _, err = result
    lines = [x for x in err.splitlines() if x.startswith("diffjax: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err[-2000:])
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def copy_model_dir(source, target, tensors=None, **config):
    """A copy of a diffusers model folder, with other tensors and/or config.json fields."""
    import json
    import shutil

    import safetensors.numpy

    shutil.copytree(source, target)
    if tensors is not None:
        safetensors.numpy.save_file(tensors, target / "diffusion_pytorch_model.safetensors")
    if config:
        content = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**content, **config}))
    return target


def record_digests(builder) -> dict:
    """sha256 of each array_record file a prepared tfds builder wrote (determinism checks)."""
    import hashlib

    directory = builder.data_dir
    return {
        name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(directory))
        if ".array_record" in name
    }


class CompileCounter:
    """Counts XLA compilations through JAX's public monitoring events."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.count += 1

    @contextlib.contextmanager
    def none_expected(self, what: str):
        """Fails if the block compiles anything."""
        before = self.count
        yield
        assert self.count == before, f"{what} compiled {self.count - before} new program(s)"


@pytest.fixture
def compiles():
    import jax.monitoring

    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    yield counter
    jax.monitoring.unregister_event_duration_listener(counter)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
