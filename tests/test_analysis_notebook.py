"""Execute examples/analysis.ipynb on the zoo so it cannot go stale."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "examples" / "analysis.ipynb"


@pytest.mark.slow
def test_analysis_notebook_runs(analysis_zoo, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(params + 1, nbformat.v4.new_code_cell(f"zoo_dir = {str(analysis_zoo)!r}"))
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # heatmaps: two specialists, within, angular distance, experts, two task-vector views, CKA
    assert len(images) >= 8
    text = "".join(
        str(o.get("data", {}).get("text/plain", "")) + o.get("text", "") for o in outputs
    )
    for word in ("prune", "baseline_gaussian", "task_cosine", "sign_conflict", "cka"):
        assert word in text, word


def test_demo_analysis_step(analysis_zoo, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", NOTEBOOK.parent / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.analysis_step(analysis_zoo, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {
        "base-vs-math",
        "base-vs-lang",
        "base-layers",
        "base-activations",
        "moe-experts-vs-base",
    }
    assert all((tmp_path / n / "report.json").is_file() for n in names)
    assert "== moe-experts-vs-base ==" in capsys.readouterr().out


def test_the_committed_notebook_shows_its_outputs():
    """The notebook is committed executed (a reader sees the plots without running it), with no
    machine's absolute paths in its outputs."""
    import json

    nb = json.loads(NOTEBOOK.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 8
    assert not [o for o in outputs if o["output_type"] == "error"]
    text = json.dumps(outputs)
    assert "/work/" not in text and "/home/" not in text and "/tmp/" not in text
