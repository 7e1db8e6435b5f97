"""The Colab notebook runs top to bottom on CPU with the smallest settings (it cannot rot)."""
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "generalist_colab.ipynb"


def test_committed_notebook_has_no_outputs_and_a_parameters_cell():
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
  assert "parameters" in code[0].metadata.get("tags", [])


@pytest.mark.slow
def test_notebook_executes_every_cell_and_writes_its_figures(tmp_path):
  papermill = pytest.importorskip("papermill")
  out = tmp_path / "executed.ipynb"
  workdir = tmp_path / "run"
  nb = papermill.execute_notebook(str(NOTEBOOK),
                                  str(out),
                                  parameters={
                                      "RUN_SIZE": "tiny",
                                      "WORKDIR": str(workdir),
                                      "EVAL_N": 16,
                                      "AUTOATTACK": False,
                                      "SANITY_QUERIES": 50
                                  },
                                  kernel_name="python3",
                                  cwd=str(ROOT),
                                  progress_bar=False)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code)
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  for name in ("curves.png", "tradeoff.png", "boundary.png", "examples.png", "report.md"):
    assert (workdir / "figures" / name).stat().st_size > 0, name
  assert list((workdir / "eval").glob("chosen-beta*/model.json"))
  assert "Square (50-query)" in (workdir / "figures" / "report.json").read_text()
