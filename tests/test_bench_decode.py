"""experiments/bench_decode.py on the CPU (`--tiny`), so a broken decode
benchmark is caught before it costs device time."""

import json
import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / (
    "bench_decode.py")


def test_tiny_decode_step_rows(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--context",
                         "16", "--out", str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (path,) = tmp_path.glob("decode_*.json")
  got = json.loads(path.read_text())
  names = [r["variant"] for r in got["rows"]]
  assert names == ["bf16", "int4", "int4_xla", "qlora_nf4", "qlora_nf4_xla"]
  for r in got["rows"]:
    assert r["finite"] and r["kernel_ms"] > 0 and r["wall_ms"] > 0, r
    assert r["top_kernels_us"] is None, r  # no CUPTI on the CPU
  by_name = {r["variant"]: r for r in got["rows"]}
  # quantized storage is smaller than bf16's; defaults match their XLA runs
  assert by_name["int4"]["layer_weight_bytes"] < by_name["bf16"][
      "layer_weight_bytes"] / 3
  for name in ("int4", "qlora_nf4"):
    assert by_name[name]["logits_rel_err_vs_xla"] < 1e-2, by_name[name]
