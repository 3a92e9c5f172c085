"""Bad input through the real CLI: one line naming what is wrong, exit code 2, nothing lost;
and the process setting the entry points apply as they start (glibc's malloc)."""

import os
import platform
import subprocess
import sys

import pytest
from conftest import ROOT, run_all

TINY = f"{ROOT}/configs/digits.py:tiny"


def _cmd(*flags):
    return [sys.executable, "-m", "diffjax.main", *flags]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Every bad command line once, run side by side: {name: (rc, stdout, stderr)}."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "syntax.py").write_text("def get_config(:\n    pass\n")
    (tmp / "noget.py").write_text("X = 1\n")
    (tmp / "a_file").write_text("not a directory")
    data = f"--config.data.data_dir={tmp / 'tfds'}"
    work = f"--workdir={tmp / 'work'}"
    cases = {
        "missing": _cmd("--config", str(tmp / "nope.py"), work),
        "directory": _cmd("--config", f"{ROOT}/configs", work),
        "syntax": _cmd("--config", str(tmp / "syntax.py"), work),
        "no_get_config": _cmd("--config", str(tmp / "noget.py"), work),
        "variant": _cmd("--config", f"{ROOT}/configs/digits.py:huge", work),
        "field": _cmd("--config", TINY, work, "--config.optim.lrr=1"),
        "section": _cmd("--config", TINY, work, "--config.optimiser.lr=1"),
        "value_type": _cmd("--config", TINY, work, "--config.optim.lr=fast"),
        "unknown_flag": _cmd("--config", TINY, work, "--mdoe=train"),
        "workdir_file": _cmd("--config", TINY, f"--workdir={tmp / 'a_file'}", data),
        "workdir_under_file": _cmd("--config", TINY, f"--workdir={tmp / 'a_file' / 'w'}", data),
        "data_dir_file": _cmd("--config", TINY, work, f"--config.data.data_dir={tmp / 'a_file'}"),
        "num_steps_0": _cmd("--config", TINY, work, data, "--config.train.num_steps=0"),
        "keep_negative": _cmd("--config", TINY, work, data, "--config.train.keep_checkpoints=-1"),
        "step_in_train": _cmd("--config", TINY, work, data, "--step=3"),
        "cpu_devices": _cmd("--config", TINY, work, data, "--cpu_devices=-2"),
        "num_samples_0": _cmd("--config", TINY, work, data, "--mode=sample", "--num_samples=0"),
        "num_samples_neg": _cmd("--config", TINY, work, data, "--mode=sample", "--num_samples=-3"),
        "sample_no_workdir": _cmd("--config", TINY, f"--workdir={tmp / 'none'}", "--mode=sample"),
        "verbose": _cmd("--config", TINY, work, data, "--config.data.image_size=7", "--verbose"),
        "other_cwd": _cmd("--config", TINY, work, "--config.data.image_size=7"),
    }
    results = run_all({k: v for k, v in cases.items() if k != "other_cwd"})
    results.update(run_all({"other_cwd": cases["other_cwd"]}, cwd=str(tmp)))
    results["tmp"] = tmp
    return results


EXPECTED = {  # case: words the one-line message must hold
    "missing": ["--config", "no such file", "nope.py"],
    "directory": ["is a directory", "digits.py"],
    "syntax": ["syntax error", "syntax.py", "line 1"],
    "no_get_config": ["no get_config()"],
    "variant": ["unknown variant 'huge'"],
    "field": ["--config.optim.lrr", "did you mean config.optim.lr?"],
    "section": ["--config.optimiser.lr", "did you mean config.optim?"],
    "value_type": ["optim.lr", "fast"],
    "unknown_flag": ["mdoe"],
    "workdir_file": ["--workdir", "not a directory"],
    "workdir_under_file": ["--workdir", "not writable"],
    "data_dir_file": ["config.data.data_dir", "is a file"],
    "num_steps_0": ["config.train.num_steps", ">= 1"],
    "keep_negative": ["config.train.keep_checkpoints", ">= 1"],
    "step_in_train": ["--step", "--mode=eval/sample"],
    "cpu_devices": ["--cpu_devices=-2"],
    "num_samples_0": ["--num_samples=0", ">= 1"],
    "num_samples_neg": ["--num_samples=-3", ">= 1"],
    "sample_no_workdir": ["--workdir", "not there"],
    "other_cwd": ["config.data.image_size: 7"],
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_input_is_one_line_and_exit_code_2(bad, case):
    rc, out, err = bad[case]
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    lines = [x for x in err.splitlines() if x.startswith("diffjax: ")]
    assert len(lines) == 1, err[-2000:]
    for words in EXPECTED[case]:
        assert words in lines[0], lines[0]
    assert not (bad["tmp"] / "work" / "checkpoints").exists()


def test_verbose_shows_the_traceback(bad):
    rc, _, err = bad["verbose"]
    assert rc == 2 and "Traceback" in err and "config.data.image_size: 7" in err


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write to: chmod for users, the immutable flag for root (root
    writes through permission bits)."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("root without chattr: no way to make a read-only directory here")
    yield path
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o755)


def test_read_only_workdir_train_and_sample(read_only_dir):
    work = f"--workdir={read_only_dir}"
    results = run_all(
        {
            "train": _cmd("--config", TINY, work),
            "sample": _cmd("--config", TINY, work, "--mode=sample"),
        }
    )
    for mode, (rc, _, err) in results.items():
        assert rc == 2 and "not writable" in err and "Traceback" not in err, (mode, err[-2000:])


# Allocates, fills and frees a 48 MiB block 20 times through malloc; prints whether
# keep_freed_memory applied its settings and the page faults the loop took.
_REUSE = """
import ctypes, resource
from diffjax import cli
applied = cli.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
n = 48 * 2**20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_entry_points_keep_freed_memory_for_reuse():
    runs = {}
    for setting in ("tuned", "default"):  # DIFFJAX_MALLOC=default: glibc's own behaviour
        env = {**os.environ, "DIFFJAX_MALLOC": setting}
        out = subprocess.run(
            [sys.executable, "-c", _REUSE], env=env, capture_output=True, text=True, check=True
        )
        applied, faults = out.stdout.split()
        runs[setting] = (applied == "True", int(faults))
    block_pages = 48 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert runs["tuned"][0] and not runs["default"][0]
    # Kept: the block's pages fault in once. glibc's own: a fresh mapping, refaulted, each time.
    assert runs["tuned"][1] < 2 * block_pages
    assert runs["default"][1] > 5 * runs["tuned"][1]


def test_start_sets_the_allocator(monkeypatch):
    from diffjax import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    cli.start(["diffjax.main"])
    assert calls == [1]


def test_unknown_malloc_setting_is_refused(tmp_path):
    env = {**os.environ, "DIFFJAX_MALLOC": "fast"}
    res = subprocess.run(
        _cmd("--config", TINY, f"--workdir={tmp_path / 'work'}"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "DIFFJAX_MALLOC='fast': use 'tuned'" in res.stderr
    assert not (tmp_path / "work").exists()  # refused before anything was written
