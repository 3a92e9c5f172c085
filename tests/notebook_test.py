"""The Colab TPU notebook runs top to bottom on CPU (8 simulated devices) with the tiny config."""

import ast
import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_tpu.ipynb")


def _assigned_names(source: str) -> set[str]:
    return {
        t.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }


def _parameter_cell(nb) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return cells[0]


def _text(nb) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "stream"
    )


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.slow  # the slow tier: `pytest -m slow`, CI's second step
def test_notebook_runs_on_cpu_with_tiny_config(tmp_path, monkeypatch):
    # The kernel is a child process: it inherits this environment, and `python` in the
    # kernelspec resolves to this interpreter (jupyter_client substitutes sys.executable).
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = _parameter_cell(nb)
    workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
    params = "\n".join(
        [
            "INSTALL = False",
            "REPO = ''",
            f"CLONE_DIR = {ROOT!r}",
            f"CONFIG = {os.path.join(ROOT, 'configs', 'digits.py') + ':tiny'!r}",
            f"WORKDIR = {str(workdir)!r}",
            f"DATA_DIR = {str(data_dir)!r}",
            "OVERRIDES = {'train.num_steps': 4, 'train.log_every_steps': 2, "
            "'train.checkpoint_every_steps': 2}",
            "NUM_SAMPLES = 8",
        ]
    )
    assert _assigned_names(params) == _assigned_names(cell.source)  # no parameter left behind
    cell.source = params

    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails

    errors = [
        out
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.outputs
        if out.output_type == "error"
    ]
    assert not errors
    text = _text(nb)
    assert "backend: cpu" in text and "device count: 8" in text
    assert "digits train: 1,501 images" in text
    assert "trained to step 4" in text
    assert "checkpoints at steps [2, 4]" in text
    assert "restored the EMA parameters of step 4" in text and "replicated" in text
    assert (workdir / "checkpoints" / "4").is_dir()
    assert (workdir / "samples" / "sample_0000004.png").is_file()
    assert (workdir / "samples" / "ddim20_0000004.png").is_file()
    assert sum(1 for line in (workdir / "metrics.jsonl").open() if "train/loss" in line) == 2
    images = [
        out
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.outputs
        if "image/png" in out.get("data", {})
    ]
    assert len(images) == 2  # the sample grid and the DDIM grid from the restored parameters
