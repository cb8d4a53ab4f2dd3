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
  module = _load_module()
  decode = [(r["impl"], r["op"], r["bits"]) for r in rows if r["M"] == 1]
  mid = [(r["impl"], r["op"], r["bits"]) for r in rows if r["M"] == 19]
  for variants, op, bits, measured in (
      (module.PROBE_FWD, "fwd", 4, decode),
      (module.PROBE_FWD, "fwd", 2, decode),
      (module.PROBE_DX, "dx", 4, decode),
      (module.PROBE_3BIT, "fwd", 3, decode),
      (module.PROBE_DX3, "dx", 3, decode),
      (module.PROBE_8BIT, "fwd", 8, decode),
      (module.PROBE_8BIT, "dx", 8, decode),
      (module.PROBE_NF4, "fwd", "nf4_dq", decode),
      (module.PROBE_NF4_DX, "dx", "nf4_dq", decode),
      (module.PROBE_MID_FWD, "fwd", 4, mid),
      (module.PROBE_MID_DX, "dx", 4, mid),
      (module.PROBE_MID_NF4_DX, "dx", "nf4_dq", mid)):
    want = ["table"] + [module._probe_label("ours", v) for v in variants]
    got_impls = [i for i, o, b in measured if (o, b) == (op, bits)]
    assert sorted(got_impls) == sorted(want), (op, bits, got_impls)
  for op in ("fwd", "dx"):
    assert mid.count(("bf16", op, None)) == 1
  for op in ("fwd", "dx"):
    assert decode.count(("bf16", op, None)) == 1
    train = [r["impl"] for r in rows if r["M"] == 17 and r["op"] == op]
    variants = [module._probe_label("ours", v) for v in module.PROBE_TRAIN]
    assert sorted(train) == (sorted(["bf16", "xla_dequant"]
                                    + 2 * (["table"] + variants))
                             if variants else []), train
  for r in rows:
    assert r["error"] is None, r
    assert r["us"] > 0
    if r["impl"] not in ("bf16", "xla_dequant"):
      assert r["rel_err"] < 1e-2, r
    if r["impl"].startswith("table+"):
      for kv in r["impl"][len("table+"):].split(","):
        knob, value = kv.split("=")
        assert str(r["config"][knob]) == value, r
      if r["bits"] in (2, 4) and r["M"] == 1:
        assert r["config"]["unpack"] == "ptx", r
    if r["bits"] == "nf4_dq" and r["impl"] == "table" and r["M"] > 1:
      assert r["config"]["lookup"] == "select", r
      assert r["config"]["scale_mode"] == "weights", r  # see tuning


def _load_module():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look themselves up
  spec.loader.exec_module(module)
  return module


def test_sweep_and_table_rows(tmp_path):
  got = _run(tmp_path, "--sweep", "--no_peer")
  assert got["sweep"] and all(r["error"] is None for r in got["sweep"])
  assert got["rows"]
  for r in got["rows"]:
    assert r["rel_err"] is None or r["rel_err"] < 1e-2, r
