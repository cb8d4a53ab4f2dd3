"""experiments/bench_multigpu.py: its summary arithmetic, and (slow) a tiny
end-to-end run on simulated CPU devices."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import bench_multigpu as bm  # noqa: E402


def _row(n, tok, peak, state, act=1.0, **extra):
  return {"row": "qlora_13b", "n_devices": n, "step_s": 1.0,
          "tok_per_s": tok, "peak_gib_max": peak, "state_gib_max": state,
          "state_bytes_per_device": [int(state * bm.GIB)] * n,
          "activations_gib_plan": act, "planned_gib_n1": peak, **extra}


def test_summary_efficiency_and_bound():
  rows = [_row(1, 1000.0, 10.0, 8.0),
          _row(2, 1700.0, 6.5, 4.0,
               agree={"ok": True, "loss_max_rel": 1e-4})]
  (s,) = bm.summarize(rows)
  assert s["efficiency"] == pytest.approx(0.85)
  assert s["efficiency_ok"]
  # 1.15 * 10 / 2 + 1.0 (planner activations)
  assert s["peak_bound_gib"] == pytest.approx(6.75)
  assert s["peak_within_bound"]
  # measured activations: 10 - 8 = 2
  assert s["peak_bound_measured_gib"] == pytest.approx(7.75)
  assert s["state_ratio"] == pytest.approx(1.0)
  assert s["agree_ok"]
  text = bm.table(rows, [s])
  assert "0.850" in text and "ok" in text


def test_summary_failures_and_errors():
  rows = [_row(1, 1000.0, 10.0, 8.0), _row(2, 1500.0, 7.0, 4.0),
          {"row": "qft_7b", "n_devices": 1, "error": "exit 1: boom"}]
  (s,) = bm.summarize(rows)
  assert not s["efficiency_ok"] and not s["peak_within_bound"]
  text = bm.table(rows, [s])
  assert "FAIL" in text and "ERROR" in text


def test_gpu_tag():
  assert bm._gpu_tag("NVIDIA H100 80GB HBM3", False, 2) == "h100x2"
  assert bm._gpu_tag("cpu", True, 2) == "tiny_cpux2"


@pytest.mark.slow
def test_tiny_run(tmp_path):
  out = tmp_path / "out"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, str(REPO / "experiments" / "bench_multigpu.py"),
       "--tiny", "--devices=1,2", "--rows=qlora_13b,qft_7b", "--steps=2",
       f"--out={out}"], capture_output=True, text=True, env=env, check=False,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (path,) = out.iterdir()  # exactly one result file
  result = json.loads(path.read_text())
  assert all("error" not in r for r in result["rows"])
  assert {s["row"] for s in result["summary"]} == {"qlora_13b", "qft_7b"}
  assert all(s["agree_ok"] for s in result["summary"])
  assert "row " in proc.stdout and "agree" in proc.stdout
