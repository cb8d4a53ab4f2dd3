"""experiments/check_pallas_training.py's logic on the CPU (interpreter)."""

import pathlib
import sys

import pytest

from conftest import shared_path

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import pallas_vs_xla as check  # pylint: disable=g-import-not-at-top
from pallas_kernels import qmatmul as kernels  # pylint: disable=g-import-not-at-top


def test_qlora_training_through_the_interpreted_kernels(monkeypatch):
  text = str(shared_path("text", "tinyshakespeare_input.txt"))
  calls = {"fwd": 0, "dx": 0}
  for name in calls:
    real = getattr(kernels, name)

    def counted(*args, _real=real, _name=name, **kwargs):
      calls[_name] += 1
      assert kwargs.get("interpret")
      return _real(*args, **kwargs)

    monkeypatch.setattr(kernels, name, counted)
  rec = check.run(tiny=True, steps=4, layers=2, batch=2, seq_len=32,
                  lr=1e-3, tol=1e-2, text=text)
  # 7 projections x (scanned layer body) traced for forward and backward.
  assert calls["fwd"] >= 7 and calls["dx"] >= 7, calls
  assert rec["match"] and rec["finite"], rec["rel_diff"]
  assert rec["pallas_implementation"] == "pallas_interpret"
  assert len(rec["loss_xla"]) == len(rec["loss_pallas"]) == 4
  assert rec["loss_xla"][-1] < rec["loss_xla"][0]  # it trains
  assert rec["loss_xla"] != rec["loss_pallas"]  # two different paths


def test_mismatch_and_nan_are_reported():
  assert check.compare([2.0, 1.0], [2.0, 1.05], 1e-2)["match"] is False
  got = check.compare([2.0, float("nan")], [2.0, float("nan")], 1e-2)
  assert got["match"] is False and got["finite"] is False


def test_missing_text_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    check.byte_batches(str(tmp_path / "nope.txt"), 1, 2, 8)
