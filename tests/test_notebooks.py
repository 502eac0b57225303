"""Execute every ``notebooks/*.ipynb`` top to bottom; any cell error fails the test.

The kernel is ``python3`` started with the interpreter running pytest (jupyter_client maps the
native ``python3`` kernel to ``sys.executable`` when ipykernel is importable), so the notebooks
see exactly the environment under test. ``OPD_JAX_NOTEBOOK_FAST=1`` shrinks the quickstart's
training run to a few steps (the notebook reads it); a person running the notebook by hand gets
the full-size run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# Per-cell limits (seconds) on a loaded 2-core CI machine: the losses notebook runs in seconds,
# the quickstart loads SmolLM2-135M and compiles the sampler and train step.
CELL_TIMEOUT = {"quickstart.ipynb": 1200, "losses_in_your_trainer.ipynb": 300}
# Notebooks that need the embedded default teacher (cached by ``make demo`` / the first test run).
NEEDS_TEACHER = {"quickstart.ipynb"}


def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def _teacher_available() -> bool:
    from opd_jax.model.assets import default_teacher_path

    try:
        default_teacher_path(fetch=True)
        return True
    except Exception:  # noqa: BLE001 - offline machine without the cached GGUF
        return False


def test_notebooks_exist_and_are_clean():
    """Every notebook is committed with outputs cleared (small diffs, no stale results)."""
    paths = _notebooks()
    assert {p.name for p in paths} >= {"quickstart.ipynb", "losses_in_your_trainer.ipynb"}
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs, f"{path.name}: commit the notebook with outputs cleared"
                assert cell.execution_count is None, f"{path.name}: clear execution counts"


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path, monkeypatch):
    if path.name in NEEDS_TEACHER and not _teacher_available():
        pytest.skip("default teacher GGUF not cached and not downloadable here")
    monkeypatch.setenv("OPD_JAX_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # Runs write under the notebook's working directory; keep them out of the checkout.
    monkeypatch.setenv("OPD_JAX_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT.get(path.name, 600), kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # the traceback names the failing cell
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
