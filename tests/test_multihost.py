"""Two processes, one mesh: `jax.distributed` on localhost with CPU devices.

Two worker processes (this file run as a script) each own 2 CPU devices,
join through `jax.distributed.initialize` at 127.0.0.1 (CPU collectives:
gloo, JAX's default), and train QLoRA on one `fsdp:4` mesh spanning all 4
devices (each process holds only its devices' rows of every weight, so
weights are all-gathered and gradients reduced across processes): params
and batches are built from values every process holds
(`sharding.place`, `sharding.shard_batch`), so no host exchanges data.
Process 0 also trains the same model unsharded on its first device; the
losses must agree. The same script runs on a multi-GPU host (one process per
GPU, or per host) by pointing `--coordinator` at process 0.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
XLA_FAST = ("--xla_backend_optimization_level=0 "
            "--xla_llvm_disable_expensive_passes=true")


def _worker(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=args.num_processes,
                             process_id=args.process_id,
                             initialization_timeout=args.timeout)
  sys.path.insert(0, str(REPO))
  sys.path.insert(0, str(REPO / "tests"))
  import test_sharding as ts  # pylint: disable=g-import-not-at-top
  from qft_jax._src import sharding  # pylint: disable=g-import-not-at-top

  out = {"process": jax.process_index(), "processes": jax.process_count(),
         "local_devices": jax.local_device_count(),
         "devices": jax.device_count()}
  config, params, batch = ts.tiny_model()
  runner = ts.Runner(args.method, config, params)
  mesh = sharding.make_mesh(args.mesh)
  state, step, place_batch = runner.build(mesh)
  b = place_batch(batch)
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, b)
    # A replicated scalar: every process holds it whole.
    losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
  out["losses"] = losses
  out["local_shards"] = [list(s.data.shape) for s in state.params["layers"][
      "mlp"]["up_proj"]["kernel"].qvalue.addressable_shards]
  if jax.process_index() == 0:
    local = ts.Runner(args.method, config, params)
    state, step, _ = local.build()
    ref = []
    for _ in range(STEPS):
      state, metrics = step(state, batch)
      ref.append(float(metrics["loss"]))
    out["reference"] = ref
  pathlib.Path(args.out).write_text(json.dumps(out))
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(tmp: pathlib.Path, n: int = 2, local_devices: int = 2,
                  method: str = "qlora", mesh: str = "fsdp:4",
                  timeout: float = 600) -> list[dict]:
  """Starts `n` workers on localhost; returns their reports."""
  coordinator = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count="
             f"{local_devices} " + XLA_FAST)
  procs = []
  for i in range(n):
    log = open(tmp / f"p{i}.log", "w", encoding="utf-8")
    procs.append((subprocess.Popen(
        [sys.executable, __file__, "--coordinator", coordinator,
         "--num_processes", str(n), "--process_id", str(i), "--method",
         method, "--mesh", mesh, "--out", str(tmp / f"p{i}.json")],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log))
  deadline = time.time() + timeout
  failed = []
  for i, (proc, log) in enumerate(procs):
    try:
      rc = proc.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      proc.kill()
      rc = "timeout"
    log.close()
    if rc != 0:
      failed.append(f"process {i} ({rc}):\n"
                    + (tmp / f"p{i}.log").read_text()[-3000:])
  if failed:
    pytest.fail("\n".join(failed))
  return [json.loads((tmp / f"p{i}.json").read_text()) for i in range(n)]


def test_two_processes_train_like_one_device(tmp_path):
  reports = run_processes(tmp_path)
  p0, p1 = reports
  for i, r in enumerate(reports):
    assert r["process"] == i and r["processes"] == 2
    assert r["local_devices"] == 2 and r["devices"] == 4
    # up_proj codes (2, 128, 32) split over fsdp:4: each local device holds
    # a quarter of the rows.
    assert r["local_shards"] == [[2, 32, 32]] * 2
  assert p0["losses"] == p1["losses"]
  assert abs(p0["reference"][-1] - p0["reference"][0]) > 1e-3
  np.testing.assert_allclose(p0["losses"], p0["reference"], rtol=2e-5)


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator", required=True, help="host:port")
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--method", default="qlora")
  parser.add_argument("--mesh", default="fsdp:4")
  parser.add_argument("--out", required=True)
  parser.add_argument("--timeout", type=int, default=300)
  _worker(parser.parse_args())
