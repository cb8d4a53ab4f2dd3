"""Executes experiments/notebooks/reproduce.ipynb headless (SMALL = True)."""

import pathlib

import pytest

from conftest import shared_path

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = (pathlib.Path(__file__).resolve().parents[1] / "experiments"
            / "notebooks" / "reproduce.ipynb")


def test_notebook_small_variant_runs():
  shared_path("models", "stories260K", "stories260K.bin")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  switch = [c for c in nb.cells if c.cell_type == "code"
            and "SMALL = " in c.source]
  assert switch and "SMALL = True" in switch[0].source
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
  assert "zero-shot SST-2 accuracy" in text
  assert "qlora4: dev accuracy" in text and "    qft: dev accuracy" in text
  images = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert images, "the plotting cell produced no figure"
