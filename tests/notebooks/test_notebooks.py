"""Every notebook in `notebooks/` runs top to bottom under the current KERAS_BACKEND.

Each notebook asserts its own measured effect (the held-out response loss
falls by its stated margin; the distilled student's held-out loss is below
the from-scratch one); a failing cell, that assertion included, fails the
test. The kernel is `python3` launched with this interpreter (the one
running pytest, so the same virtualenv), with `KERAS_BACKEND` passed through
the environment.
"""

import os
import pathlib
import sys
import time

import keras
import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
CELL_TIMEOUT_SECONDS = 600


def notebook_paths():
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_notebooks_exist():
    names = {path.name for path in notebook_paths()}
    assert {"finetune_lora.ipynb", "qlora_chat.ipynb", "distill.ipynb"} <= names


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda path: path.stem)
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    assert notebook.cells[1].source.startswith("import os")
    assert 'os.environ["KERAS_BACKEND"]' in notebook.cells[1].source
    manager = KernelManager(kernel_name="python3")
    # jupyter_client launches a spec's `python` as `sys.executable`: the
    # kernel runs in this virtualenv whatever `python` is on PATH.
    assert manager.format_kernel_cmd()[0] == sys.executable
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=CELL_TIMEOUT_SECONDS,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    environment = {**os.environ, "KERAS_BACKEND": keras.config.backend()}
    start = time.perf_counter()
    client.execute(env=environment)
    seconds = time.perf_counter() - start
    outputs = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    # The backend cell took effect in the kernel.
    assert f"backend: {keras.config.backend()}" in outputs
    # Each prints its held-out losses (and asserts its own effect).
    measured = [line for line in outputs.splitlines() if "held-out" in line]
    assert any("loss" in line for line in measured), outputs[-2000:]
    print(f"{path.name} on {keras.config.backend()}: {seconds:.1f} s", *measured)
