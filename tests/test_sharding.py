"""SPMD sharding: path rules, and sharded training equal to one device.

The device count is fixed when JAX initializes, so the sharded runs happen in
worker subprocesses (this file run as a script):

  A  8 simulated CPU devices: every method trains a few steps on a mesh (the
     meshes cover fsdp, data x fsdp and tensor axes); QFT trains on a
     4-device mesh and saves an orbax checkpoint after 2 steps, which A also
     restores onto an 8-device mesh.
  B  1 CPU device: the same runs unsharded (the references), then restores
     A's 4-device checkpoint on its single device and continues.

Both start at once (B waits for A's checkpoint after its own references).
The pytest process only compares their reports. `-m slow` adds every method
on every mesh.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from qft_jax._src import checkpoint
from qft_jax._src import methods
from qft_jax._src import qarray as qa
from qft_jax._src import sharding
from qft_jax._src import train
from qft_jax._src.data import Batch
from qft_jax._src.models import llama
from qft_jax._src.optim import hift as hift_lib
from qft_jax._src.optim import lion_int8
from qft_jax._src.optim import masks

REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "qlora", "peqa", "qft", "hift")
# The default run: the three quantized storages, one mesh each (8 devices
# unless noted); `-m slow` runs every method on every mesh.
DEFAULT_METHODS = ("qlora", "peqa", "qft")
MESHES = {
    "full": "fsdp:8",
    "lora": "data:2,fsdp:2,tensor:2",
    "qlora": "fsdp:8",
    "peqa": "data:2,fsdp:2,tensor:2",
    "qft": "data:2,fsdp:2",     # on 4 devices; its state is checkpointed
    "hift": "fsdp:8",
}
ALL_MESHES = ("fsdp:8", "data:2,fsdp:4", "data:2,fsdp:2,tensor:2")
STEPS = 3
CKPT_STEP = 2
# Compile faster (CPU codegen effort only; both workers use the same flags).
XLA_FAST = ("--xla_backend_optimization_level=0 "
            "--xla_llvm_disable_expensive_passes=true")
RTOL = 2e-5


# ----------------------------------------------------------------- worker


def tiny_model():
  """(config, params, batch) of a random 2-layer LLaMA and random tokens."""
  config = llama.LlamaConfig(vocab_size=256, hidden_size=64,
                             intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=16)
  # Random params straight from numpy (no init compile): normal(0.02)
  # matrices, unit norm scales.
  rng = np.random.default_rng(0)
  params = {}
  for path, shape in llama.param_shapes(config).items():
    *parents, leaf = path.split("/")
    node = params
    for key in parents:
      node = node.setdefault(key, {})
    value = (np.ones(shape) if path.endswith("norm/scale")
             else rng.normal(0.0, 0.02, shape))
    node[leaf] = jnp.asarray(value, jnp.float32)
  toks = np.random.default_rng(0).integers(0, 256, (8, 17)).astype(np.int32)
  batch = Batch(tokens=toks[:, :-1], targets=toks[:, 1:],
                loss_mask=np.ones((8, 16), np.float32))
  return config, params, batch


class Runner:
  """Builds one method's state and step, unsharded or on a mesh."""

  def __init__(self, name, config, params):
    self.name = name
    mcfg = methods.MethodConfig(name=name, bits=4, group_size=64,
                                lora_rank=4)
    if name == "hift":
      self.params, self.config = params, config
    else:
      # Jitted: one compile instead of many eager ones (3-5x faster on
      # CPU); the (static) model config comes out of the trace.
      prepared = {}

      def prepare(p):
        p, prepared["config"] = methods.prepare_params(
            mcfg, p, config, jax.random.PRNGKey(1))
        return p

      self.params = jax.jit(prepare)(params)
      self.config = prepared["config"]
    self.apply_fn = lambda p, t: llama.Llama(self.config).apply(
        {"params": p}, t)
    if name == "hift":
      self.tx = lambda lr: optax.adamw(lr)
    else:
      self.method = methods.make_method(mcfg, self.params)
      self.tx = methods.make_optimizer(
          "lion_int8" if name == "qft" else "adamw", 1e-3)

  def init(self, p):
    return train.init_state(p, self.method, self.tx, 0)

  def fresh_params(self):
    return jax.tree.map(jnp.copy, self.params)  # steps donate their input

  def build(self, mesh=None):
    """`(state, step, place_batch)`; sharded over `mesh` if given."""
    self.mesh = mesh
    params = self.fresh_params()
    place_batch = lambda b: b
    shardings = None
    if mesh is not None:
      params = sharding.place(params, sharding.param_shardings(params, mesh))
      place_batch = lambda b: sharding.shard_batch(b, mesh)
    if self.name == "hift":
      return self._build_hift(params, place_batch)
    if mesh is not None:
      shardings = sharding.train_step_shardings(
          jax.eval_shape(self.init, params), mesh)
    init = jax.jit(self.init, out_shardings=shardings and shardings[0])
    step = train.make_train_step(self.apply_fn, self.method, self.tx,
                                 shardings=shardings)
    return init(params), step, place_batch

  def _build_hift(self, params, place_batch):
    units = hift_lib.hift_units(params)
    schedule = hift_lib.HiFTSchedule(units, group_size=3)  # 2 groups
    hift = hift_lib.HiFT(schedule, self.tx, 1e-3)

    def loss_fn(p, tokens, targets, mask):
      nll, n = train.cross_entropy(self.apply_fn(p, tokens), targets, mask)
      return nll / jnp.maximum(n, 1.0)

    hift_step = hift.make_step(loss_fn)

    def step(state, batch):
      p, opt, t = state
      with sharding.compute_mesh(self.mesh) if self.mesh else nullcontext():
        p, opt, loss = hift_step(p, opt, t, batch.tokens, batch.targets,
                                 batch.loss_mask)
      return (p, opt, t + 1), {"loss": loss}

    return (params, hift.init(params), 0), step, place_batch


def _train(state, step, batch, steps):
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def _host(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _same(a, b) -> bool:
  return len(a) == len(b) and all(
      x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
      for x, y in zip(a, b))


def _worker_sharded(args, config, params, batch) -> dict:
  out = {"devices": jax.device_count(), "losses": {}, "layouts": {}}
  ckpt_dir = pathlib.Path(args.ckpt)
  todo = [(m, s) for m in args.methods
          for s in (ALL_MESHES if args.all_meshes else (MESHES[m],))]
  if "qft" in args.methods and ("qft", MESHES["qft"]) not in todo:
    todo.append(("qft", MESHES["qft"]))
  try:
    for name, spec in todo:
      t0 = time.time()
      runner = Runner(name, config, params)
      ndev = int(np.prod([int(p.split(":")[1]) for p in spec.split(",")]))
      mesh = sharding.make_mesh(spec, jax.devices()[:ndev])
      state, step, place_batch = runner.build(mesh)
      b = place_batch(batch)
      if name == "qft" and spec == MESHES["qft"]:
        state, l1 = _train(state, step, b, CKPT_STEP)
        saved = _host(state)
        ckpt = checkpoint.Checkpointer(ckpt_dir / "qft")
        ckpt.save(CKPT_STEP, state, {"mesh": spec, "devices": ndev})
        np.savez(ckpt_dir / "qft_saved.npz", *saved)
        # Restore the 4-device checkpoint onto 8 devices.
        mesh8 = sharding.make_mesh("fsdp:8")
        target = sharding.abstract(
            state, sharding.state_shardings(state, mesh8))
        _, restored, meta = ckpt.restore_latest(target)
        out["restore_on_8"] = {
            "equal": _same(saved, _host(restored)),
            "shardings_ok": all(
                r.sharding == t.sharding for r, t in zip(
                    jax.tree.leaves(restored), jax.tree.leaves(target))),
            "meta": meta}
        ckpt.close()
        state, l2 = _train(state, step, b, STEPS - CKPT_STEP)
        losses = l1 + l2
        (ckpt_dir / "READY").write_text("ok")
        # The sharded state keeps its shardings step after step.
        want = sharding.state_shardings(state, mesh)
        out["stable_shardings"] = all(
            x.sharding.spec == s.spec for x, s in zip(
                jax.tree.leaves(state), jax.tree.leaves(want)))
        q = state.params["layers"]["attn"]["q_proj"]["kernel"]
        out["layouts"]["qft"] = {
            "qvalue": [list(s.data.shape) for s in q.dense.qvalue
                       .addressable_shards],
            "scale": [list(s.data.shape) for s in q.dense.scale
                      .addressable_shards],
            "mu": list(state.opt_state[0].mu["layers"]["attn"]["q_proj"]
                       ["kernel"].sharding.spec),
            "mu_scale": list(state.opt_state[0].mu_scale["layers"]["attn"]
                             ["q_proj"]["kernel"].sharding.spec),
        }
      else:
        if name == "qlora" and spec == MESHES[name]:
          step = step.lower(state, b).compile()
          out["qlora_all_gathers"] = re.findall(
              r"= (\w+)\[([\d,]*)\]\S* all-gather(?:-start)?\(",
              step.as_text())
        state, losses = _train(state, step, b, STEPS)
      if name == "qlora" and spec == MESHES[name]:
        q = state.params["layers"]["mlp"]["up_proj"]["kernel"]
        out["layouts"]["qlora"] = {
            "qvalue_spec": list(q.qvalue.sharding.spec),
            "qvalue_shard": list(q.qvalue.addressable_shards[0].data.shape),
        }
      out["losses"][f"{name}@{spec}"] = losses
      print(f"{name}@{spec} {losses} {time.time() - t0:.1f}s", flush=True)
  finally:
    if not (ckpt_dir / "READY").exists():
      (ckpt_dir / "FAILED").write_text("sharded worker failed")
  return out


def _worker_single(args, config, params, batch) -> dict:
  out = {"devices": jax.device_count(), "losses": {}}
  qft_step = None
  for name in args.methods:
    t0 = time.time()
    runner = Runner(name, config, params)
    state, step, _ = runner.build()
    _, out["losses"][name] = _train(state, step, batch, STEPS)
    print(f"{name} {out['losses'][name]} {time.time() - t0:.1f}s", flush=True)
    if name == "qft":
      qft_runner, qft_step = runner, step
  if qft_step is None:
    return out
  ckpt_dir = pathlib.Path(args.ckpt)
  deadline = time.time() + args.timeout
  while not (ckpt_dir / "READY").exists():
    if (ckpt_dir / "FAILED").exists() or time.time() > deadline:
      out["restore_on_1"] = {"error": "no checkpoint from the sharded worker"}
      return out
    time.sleep(0.5)
  like = jax.eval_shape(qft_runner.init, qft_runner.params)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = sharding.abstract(like, jax.tree.map(lambda _: one, like))
  ckpt = checkpoint.Checkpointer(ckpt_dir / "qft")
  step0, restored, meta = ckpt.restore_latest(target)
  ckpt.close()
  with np.load(ckpt_dir / "qft_saved.npz") as z:
    saved = [z[f"arr_{i}"] for i in range(len(z.files))]
  equal = _same(saved, _host(restored))
  devices = sorted({d.id for x in jax.tree.leaves(restored)
                    for d in x.devices()})
  _, losses = _train(restored, qft_step, batch, STEPS - CKPT_STEP)
  out["restore_on_1"] = {"step": step0, "equal": equal, "losses": losses,
                         "meta": meta, "devices": devices}
  return out


def _worker_main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--role", choices=("sharded", "single"), required=True)
  parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
  parser.add_argument("--all_meshes", action="store_true")
  parser.add_argument("--ckpt", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--timeout", type=float, default=600)
  args = parser.parse_args(argv)
  args.methods = args.methods.split(",")
  sys.path.insert(0, str(REPO))
  config, params, batch = tiny_model()
  fn = _worker_sharded if args.role == "sharded" else _worker_single
  start = time.time()
  out = fn(args, config, params, batch)
  out["seconds"] = round(time.time() - start, 1)
  pathlib.Path(args.out).write_text(json.dumps(out))


# ------------------------------------------------------------ pytest side


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             + XLA_FAST,
             PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def run_workers(tmp: pathlib.Path, *extra: str, timeout: float = 900
                ) -> tuple[dict, dict]:
  """Runs workers A (8 devices) and B (1 device) at once; their reports."""
  ckpt = tmp / "ckpt"
  ckpt.mkdir(parents=True, exist_ok=True)
  procs = {}
  for role, devices in (("sharded", 8), ("single", 1)):
    log = open(tmp / f"{role}.log", "w", encoding="utf-8")
    procs[role] = (subprocess.Popen(
        [sys.executable, __file__, "--role", role, "--ckpt", str(ckpt),
         "--out", str(tmp / f"{role}.json"), *extra],
        env=_env(devices), cwd=REPO, stdout=log, stderr=subprocess.STDOUT),
                   log)
  reports = []
  for role, (proc, log) in procs.items():
    try:
      rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      rc = "timeout"
    log.close()
    if rc != 0:
      tail = (tmp / f"{role}.log").read_text()[-4000:]
      pytest.fail(f"{role} worker failed ({rc}):\n{tail}")
    reports.append(json.loads((tmp / f"{role}.json").read_text()))
  return reports[0], reports[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
  return run_workers(tmp_path_factory.mktemp("sharding"))


@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_sharded_loss_matches_one_device(reports, method):
  sharded, single = reports
  assert sharded["devices"] == 8 and single["devices"] == 1
  key = f"{method}@{MESHES[method]}"
  ref = single["losses"][method]
  got = sharded["losses"][key]
  assert len(got) == len(ref) == STEPS
  # The steps change the loss (so equal losses are not a frozen model's).
  assert abs(ref[-1] - ref[0]) > 1e-3, ref
  np.testing.assert_allclose(got, ref, rtol=RTOL, err_msg=key)


def test_quantized_fields_are_split_by_rows(reports):
  sharded, _ = reports
  q = sharded["layouts"]["qlora"]
  assert q["qvalue_spec"] == [None, "fsdp", None]
  # up_proj (2 layers, N=128, K=64 at 4 bits -> 32 bytes) on fsdp:8.
  assert q["qvalue_shard"] == [2, 128 // 8, 32]
  qft = sharded["layouts"]["qft"]
  # q_proj (2, 64, 64) int8 codes and (2, 64, 1) row scales on data:2,fsdp:2:
  # each device holds the same half of the rows of both.
  assert qft["qvalue"] == [[2, 32, 64]] * 4
  assert qft["scale"] == [[2, 32, 1]] * 4
  # lion_int8's int8 momentum like the codes; its block scales by blocks.
  assert qft["mu"] == [None, "fsdp", None]
  assert qft["mu_scale"] == ["fsdp"]
  assert sharded["stable_shardings"]


def test_fsdp_gathers_quantized_codes_not_floats(reports):
  """Each decoder weight is all-gathered as uint8 codes before it is
  dequantized (`sharding.gather_for_compute`), never as a float matrix."""
  gathers = [(dtype, tuple(int(d) for d in dims.split(",") if d))
             for dtype, dims in reports[0]["qlora_all_gathers"]]
  # Decoder (out, in) of the tiny model: q/o (64, 64), k/v (32, 64),
  # gate/up (128, 64), down (64, 128); codes pack `in` 2 per byte.
  kernels = {(64, 64), (32, 64), (128, 64), (64, 128)}
  floats = [g for g in gathers if g[0].startswith(("f", "bf"))
            and g[1][-2:] in kernels]
  assert not floats, f"float weights all-gathered: {floats}"
  codes = {g[1][-2:] for g in gathers if g[0] == "u8"}
  assert {(64, 32), (32, 32), (128, 32), (64, 64)} <= codes, gathers


def test_checkpoint_from_4_devices_restores_on_1_and_continues(reports):
  sharded, single = reports
  r = single["restore_on_1"]
  assert "error" not in r, r
  assert r["step"] == CKPT_STEP and r["meta"]["devices"] == 4
  assert r["equal"], "restored state differs from the saved one"
  assert r["devices"] == [0]
  cont = sharded["losses"][f"qft@{MESHES['qft']}"][CKPT_STEP:]
  np.testing.assert_allclose(r["losses"], cont, rtol=RTOL)
  np.testing.assert_allclose(r["losses"], single["losses"]["qft"][CKPT_STEP:],
                             rtol=RTOL)


def test_checkpoint_from_4_devices_restores_on_8(reports):
  r = reports[0]["restore_on_8"]
  assert r["equal"] and r["shardings_ok"], r


@pytest.mark.slow
def test_every_method_on_every_mesh(tmp_path):
  sharded, single = run_workers(tmp_path, "--all_meshes", "--methods",
                                ",".join(METHODS), timeout=3600)
  for method in METHODS:
    for spec in ALL_MESHES:
      np.testing.assert_allclose(sharded["losses"][f"{method}@{spec}"],
                                 single["losses"][method], rtol=RTOL,
                                 err_msg=f"{method}@{spec}")


# ---------------------------------------------- rules (no devices needed)


def _abstract_params(n=64, k=64, layers=2):
  sds = jax.ShapeDtypeStruct
  q = qa.abstract_qarray((layers, n, k), qa.QuantConfig(bits=4,
                                                        group_size=32))
  return {
      "embed": {"embedding": sds((256, 64), jnp.float32)},
      "layers": {
          "attn": {"q_proj": {"kernel": q,
                              "lora_a": sds((layers, 4, k), jnp.float32),
                              "lora_b": sds((layers, n, 4), jnp.float32)},
                   "o_proj": {"kernel": sds((layers, 64, n), jnp.float32)}},
          "mlp": {"up_proj": {"kernel": sds((layers, 96, 64), jnp.float32)}},
          "input_norm": {"scale": sds((layers, 64), jnp.float32)}},
      "final_norm": {"scale": sds((64,), jnp.float32)},
  }


def _specs(tree, **sizes):
  specs = sharding.partition_specs(tree, sizes)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  return {masks.path_str(k): s for (k, _), s in zip(flat, spec_leaves)}


def test_rules_split_qarray_fields_along_rows_together():
  specs = _specs(_abstract_params(), fsdp=4, tensor=2)
  kern = "layers/attn/q_proj/kernel"
  for field in ("qvalue", "scale", "zero_point"):
    assert specs[f"{kern}/{field}"] == P(None, ("tensor", "fsdp"), None)
  # Float kernels: column-parallel out over tensor x fsdp, row-parallel
  # out over fsdp and in over tensor.
  assert specs["layers/mlp/up_proj/kernel"] == P(None, ("tensor", "fsdp"),
                                                 None)
  assert specs["layers/attn/o_proj/kernel"] == P(None, "fsdp", "tensor")
  assert specs["layers/attn/q_proj/lora_a"] == P(None, None, None)
  assert specs["layers/input_norm/scale"] == P(None, None)
  assert specs["final_norm/scale"] == P(None)
  assert specs["embed/embedding"] == P(("tensor", "fsdp"), None)


def test_rules_fall_back_when_not_divisible(caplog):
  # 12 rows over tensor x fsdp = 2 x 4: 8 does not divide 12; of the subsets
  # that do, fsdp (4) splits the most.
  specs = _specs(_abstract_params(n=12), fsdp=4, tensor=2)
  for field in ("qvalue", "scale", "zero_point"):
    assert specs[f"layers/attn/q_proj/kernel/{field}"] == P(None, "fsdp",
                                                            None)
  # 12 rows over fsdp = 8: nothing divides, the rows stay whole.
  specs = _specs(_abstract_params(n=12), fsdp=8)
  assert specs["layers/attn/q_proj/kernel/qvalue"] == P(None, None, None)
  assert specs["layers/attn/q_proj/kernel/scale"] == P(None, None, None)
  assert any("not divisible" in r.getMessage() for r in caplog.records)


def test_rules_place_optimizer_moments_like_their_params():
  trainable = {"layers": {"attn": {"q_proj": {
      "kernel": jax.ShapeDtypeStruct((2, 64, 64), jnp.float32)}}},
               "final_norm": {"scale": jax.ShapeDtypeStruct((64,),
                                                            jnp.float32)}}
  for tx in (optax.adamw(1e-3), lion_int8.lion_int8(1e-3)):
    state = jax.eval_shape(tx.init, trainable)
    specs = _specs({"opt_state": state}, fsdp=8)
    for path, spec in specs.items():
      if path.endswith("q_proj/kernel") and "mu_scale" not in path:
        assert spec == P(None, "fsdp", None), path
      elif "mu_scale" in path and path.endswith("kernel"):
        assert spec == P("fsdp"), path   # 2*64*64/256 = 32 blocks
      elif path.endswith(("count", "key")) or "norm" in path:
        assert all(s is None for s in spec), path


def test_parse_mesh():
  assert sharding.parse_mesh("", 4) == {"data": 1, "fsdp": 4, "tensor": 1}
  assert sharding.parse_mesh("data:2,fsdp:-1", 8) == {
      "data": 2, "fsdp": 4, "tensor": 1}
  assert sharding.parse_mesh(" tensor:2 , fsdp:2", 4)["tensor"] == 2
  for bad, n in (("fsdp:3", 4), ("pipe:2", 2), ("fsdp", 2), ("fsdp:2,fsdp:1",
                                                             2),
                 ("fsdp:0", 1), ("data:-1,fsdp:-1", 4), ("fsdp:x", 2)):
    with pytest.raises(ValueError, match="mesh spec"):
      sharding.parse_mesh(bad, n)


def test_rules_must_cover_every_leaf():
  with pytest.raises(ValueError, match="matched no mask rule"):
    sharding.partition_specs(_abstract_params(), {"fsdp": 2},
                             rules=[(r"kernel", sharding.AUTO)])
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.split(-1, "model")


if __name__ == "__main__":
  _worker_main(sys.argv[1:])
