"""experiments/bench_kernels.py on the CPU (`--dry_run`: tiny shapes, the
Pallas interpreter), so a broken benchmark is caught before it costs device
time."""

import json
import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / (
    "bench_kernels.py")


def _run(tmp_path, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(SCRIPT), "--dry_run", "--out",
                         str(tmp_path), *flags], env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (path,) = tmp_path.glob("kernels_*.json")
  return json.loads(path.read_text())


def test_probe_times_every_config_and_checks_it(tmp_path):
  got = _run(tmp_path, "--probe")
  rows = got["probe"]
  decode = [(r["impl"], r["op"]) for r in rows if r["M"] == 1
            and r["bits"] in (4, None)]
  two_bit = [(r["impl"], r["op"]) for r in rows if r["bits"] == 2]
  assert sorted(two_bit) == [("mma+ptx", "fwd"), ("table", "fwd")]
  nf4_decode = [(r["impl"], r["op"]) for r in rows
                if r["bits"] == "nf4_dq" and r["M"] == 1]
  assert sorted(nf4_decode) == [("nf4+gather", "fwd"), ("nf4+select", "fwd")]
  train = [(r["impl"], r["op"]) for r in rows if r["M"] > 1]
  for op in ("fwd", "dx"):  # XLA bf16 and the table, with and without prefetch
    for impl in ("bf16", "table", "mma+prefetch1", "mma+prefetch2",
                 "mma+ptx", "mma+kreduce", "mma+ptx+kreduce"):
      assert decode.count((impl, op)) == 1, (impl, op, decode)
    # NF4 training: XLA bf16 and dequantize-then-matmul, both lookups
    for impl in ("bf16", "nf4+xla_dequant", "nf4+gather", "nf4+select"):
      assert train.count((impl, op)) == 1, (impl, op, train)
  assert decode.count(("fma", "fwd")) >= 4
  assert decode.count(("fma+prefetch1", "fwd")) >= 1
  for r in rows:
    assert r["error"] is None, r
    assert r["us"] > 0
    if r["impl"] not in ("bf16", "nf4+xla_dequant"):
      assert r["rel_err"] < 1e-2, r
  assert all(r["config"]["scale_mode"] == "weights"
             for r in rows if r["impl"] == "fma")
  for r in rows:
    if r["impl"] in ("nf4+gather", "nf4+select"):
      assert r["bits"] == "nf4_dq"
      assert r["config"]["lookup"] == r["impl"].split("+")[1], r
      if r["M"] > 1:
        assert r["config"]["block_m"] >= 128, r  # the table's training tile


def test_sweep_and_table_rows(tmp_path):
  got = _run(tmp_path, "--sweep", "--no_peer")
  assert got["sweep"] and all(r["error"] is None for r in got["sweep"])
  assert got["rows"]
  for r in got["rows"]:
    assert r["rel_err"] is None or r["rel_err"] < 1e-2, r
