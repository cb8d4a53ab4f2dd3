r"""Sharded training on 1..n GPUs: per-GPU peak memory, tokens/s, scaling.

  python experiments/bench_multigpu.py --out $OUT                  # all rows
  python experiments/bench_multigpu.py --rows qlora_13b --devices 1,2
  python experiments/bench_multigpu.py --tiny --out /tmp/m         # CPU smoke
                                                                   # test

Rows (LLaMA shapes, random weights built directly in the method's storage):
  qft_13b        QFT: int8 rows + 1 % float outliers, int8 Lion, the
                 layer-streamed step (per-device batch 4 x 512).
  qlora_13b      NF4 (block 64, bf16 scales) + LoRA r16 on all seven
                 linears, AdamW (4 x 512).
  modulora3_65b  3-bit RTN codes (group 128, zero points) + LoRA r16, AdamW
                 (1 x 512).

Each (row, n) runs in a fresh process that sees only the first n GPUs
(`CUDA_VISIBLE_DEVICES`; `--tiny`: n simulated CPU devices) and trains on
an `fsdp:n` mesh with `qft_jax` sharding rules: every weight (codes, scales,
zero points, outliers) and optimizer state is split by rows over the n
devices, built there directly (`jax.jit(make, out_shardings=...)`, no float
copy, no single-device staging), and the batch grows with n (weak scaling:
`per-device batch x n`). It reports, per device, `peak_bytes_in_use` and the
bytes of the training state it holds, and the median step time.

Summary per row and n > 1:
  efficiency   = tok/s(n) / (n * tok/s(1))          (target >= 0.8 at n=2)
  state_ratio  = max state bytes per device(n) / (state bytes(1) / n)
  peak_bound   = 1.15 * peak(1) / n + (peak(1) - state(1))   (the issue's
                 "1.15 x one-GPU / n + activations", activations measured
                 at n = 1 as everything above the state), and whether
                 max peak(n) <= peak_bound.

Writes `$OUT/multigpu_<gpu>_<date>.json` after every (row, n), so a run cut
short keeps what finished. `--budget_s` stops launching new processes when
the remaining time is short (one device call is at most 10 minutes).
`stable_shardings` is true when no leaf changed layout during the timed
steps (no recompilation inside the timing).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_ROWS = flags.DEFINE_string("rows", "", "Comma-separated rows (all).")
_DEVICES = flags.DEFINE_string(
    "devices", "", "Comma-separated device counts (1, 2, 4, ... up to all).")
_OUT = flags.DEFINE_string("out", "/tmp/bench_multigpu", "Output folder.")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny shapes on simulated CPU "
                          "devices (smoke test).")
_STEPS = flags.DEFINE_integer("steps", 4, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Warm-up (compile) steps.")
_BUDGET = flags.DEFINE_float("budget_s", 560.0, "Wall-clock budget of the "
                             "whole run; no process starts after it.")
_CHILD_TIMEOUT = flags.DEFINE_float("child_timeout_s", 420.0,
                                    "Limit of one (row, n) process.")
_ROW = flags.DEFINE_string("row", "", "Internal: run one row in-process.")
_N = flags.DEFINE_integer("n", 0, "Internal: device count of --row.")

# name -> (model, method, per-device batch, seq, options)
ROWS = {
    "qft_13b": ("13b", "qft", 4, 512, dict(optimizer="lion_int8")),
    "qlora_13b": ("13b", "qlora", 4, 512, dict(optimizer="adamw", bits=4,
                                               group_size=64)),
    "modulora3_65b": ("65b", "modulora", 1, 512, dict(
        optimizer="adamw", bits=3, group_size=128)),
}
SHAPES = {  # d, f, layers, heads
    "13b": (5120, 13824, 40, 40),
    "65b": (8192, 22016, 80, 64),
}
LORA_RANK, LORA_ALPHA = 16, 32.0
GIB = 2**30


def model_config(model: str, tiny: bool):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qft_jax._src.models import llama  # pylint: disable=g-import-not-at-top
  if tiny:
    return llama.LlamaConfig(vocab_size=512, hidden_size=128,
                             intermediate_size=256, num_layers=2, num_heads=4,
                             num_kv_heads=4, head_dim=32, remat="full",
                             lora_alpha=LORA_ALPHA, dtype=jnp.float32,
                             param_dtype=jnp.float32)
  d, f, layers, heads = SHAPES[model]
  return llama.LlamaConfig(vocab_size=32000, hidden_size=d,
                           intermediate_size=f, num_layers=layers,
                           num_heads=heads, num_kv_heads=heads, head_dim=128,
                           remat="full", lora_alpha=LORA_ALPHA,
                           dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def random_qarray(key, shape, config, dtype):
  """Random codes / scales / zero points drawn as the stored dtypes.

  Like `qarray.random_qarray`, but the codes come from `jax.random.bits` as
  uint8 (no int32 intermediate four times their size), so building a 65B
  model does not raise the device's peak memory above training's.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qft_jax._src import qarray as qa  # pylint: disable=g-import-not-at-top
  spec = qa.abstract_qarray(shape, config, dtype)
  kq, ks, kz = jax.random.split(key, 3)
  levels = 2**config.bits - 1 if config.codebook is None else 1
  scale = (0.02 / levels) * jax.random.uniform(ks, spec.scale.shape,
                                               jnp.float32, 0.5, 1.5)
  zero = None
  if spec.zero_point is not None:
    zero = jax.random.bits(kz, spec.zero_point.shape, jnp.uint8) % (
        2**config.bits)
  return dataclasses.replace(
      spec, qvalue=jax.random.bits(kq, spec.qvalue.shape, jnp.uint8),
      scale=scale.astype(config.scale_dtype), zero_point=zero)


def param_makers(config, method: str, opts: dict, key) -> dict:
  """The params tree with a zero-argument builder in place of every leaf
  group (a float array, a QArray, a QFTWeight), so each can be jitted with
  its own `out_shardings` and created directly in pieces on the devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qft_jax._src import qarray as qa  # pylint: disable=g-import-not-at-top
  from qft_jax._src.models import llama  # pylint: disable=g-import-not-at-top
  from qft_jax._src.optim import qft  # pylint: disable=g-import-not-at-top
  keys = iter(jax.random.split(key, 64))
  c = config
  # QFT trains embedding, norms and head in float32 with the same optimizer.
  rest_dt = jnp.float32 if method == "qft" else c.param_dtype

  def normal(shape, dt, std=0.02):
    k = next(keys)
    return lambda: (std * jax.random.normal(k, shape, jnp.float32)).astype(dt)

  def const(shape, dt, value):
    return lambda: jnp.full(shape, value, dt)

  def kernel(shape):
    lnum, n, k = shape
    if method == "qft":
      dense_cfg = qa.QuantConfig(bits=8, group_size=-1, symmetric=True)
      n_out = qft.num_outliers((n, k), 0.01)
      stride = n * k // n_out
      k1, k2, k3 = jax.random.split(next(keys), 3)

      def make():
        dense = random_qarray(k1, shape, dense_cfg, c.dtype)
        idx = (jnp.arange(n_out, dtype=jnp.int32) * stride
               + jax.random.randint(k2, (lnum, n_out), 0, stride, jnp.int32))
        val = 0.05 * jax.random.normal(k3, (lnum, n_out), jnp.float32)
        return qft.QFTWeight(dense, idx, val)
      return make
    if method == "qlora":
      cfg = qa.QuantConfig(bits=4, group_size=opts["group_size"],
                           codebook="nf4", scale_dtype=jnp.bfloat16)
    else:
      cfg = qa.QuantConfig(bits=opts["bits"], group_size=opts["group_size"],
                           scale_dtype=jnp.bfloat16)
    kk = next(keys)
    return lambda: random_qarray(kk, shape, cfg, c.dtype)

  tree: dict = {}
  for path, shape in llama.param_shapes(c).items():
    *parents, leaf = path.split("/")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    if path.endswith("_proj/kernel"):
      node[leaf] = kernel(shape)
      if method in ("qlora", "modulora"):
        lnum, n, k = shape
        node["lora_a"] = normal((lnum, LORA_RANK, k), jnp.float32,
                                1.0 / k**0.5)
        node["lora_b"] = const((lnum, n, LORA_RANK), jnp.float32, 0.0)
    elif path.endswith("norm/scale"):
      node[leaf] = const(shape, rest_dt if path.startswith("final")
                         else c.param_dtype, 1.0)
    else:
      node[leaf] = normal(shape, rest_dt)
  return tree


def device_memory() -> tuple[list[int | None], str]:
  import jax  # pylint: disable=g-import-not-at-top
  peaks = []
  for d in jax.local_devices():
    stats = d.memory_stats() or {}
    peaks.append(stats.get("peak_bytes_in_use"))
  return peaks, jax.devices()[0].device_kind


def run_one(name: str, n: int, tiny: bool, steps: int, warmup: int) -> dict:
  """One row on the first `n` devices of this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from qft_jax._src import data as data_lib  # pylint: disable=g-import-not-at-top
  from qft_jax._src import methods  # pylint: disable=g-import-not-at-top
  from qft_jax._src import sharding  # pylint: disable=g-import-not-at-top
  from qft_jax._src import streamed  # pylint: disable=g-import-not-at-top
  from qft_jax._src import train  # pylint: disable=g-import-not-at-top
  from qft_jax._src.models import llama  # pylint: disable=g-import-not-at-top
  from qft_jax._src.optim import masks  # pylint: disable=g-import-not-at-top

  if jax.device_count() != n:
    raise ValueError(f"expected {n} devices, this process sees "
                     f"{jax.device_count()}")
  model, method, per_device_batch, seq, opts = ROWS[name]
  if tiny:
    per_device_batch, seq = 2, 32
  config = model_config(model, tiny)
  mesh = sharding.make_mesh(f"fsdp:{n}")
  # LoRA factors and their AdamW moments split too (`lora="fsdp"`): at 4+
  # devices replicated LoRA state would dominate QLoRA's per-device bytes.
  rules = sharding.default_rules(lora="fsdp")
  batch = per_device_batch * n

  t0 = time.time()
  makers = param_makers(config, method, opts, jax.random.PRNGKey(0))
  abstract = jax.tree.map(jax.eval_shape, makers)
  shardings = sharding.param_shardings(abstract, mesh, rules)
  params = jax.tree.map(lambda make, sh: jax.jit(make, out_shardings=sh)(),
                        makers, shardings)
  jax.block_until_ready(params)
  build_s = time.time() - t0

  batches = [sharding.shard_batch(b, mesh) for b in
             data_lib.random_batches(config.vocab_size, batch, seq)]
  tx = methods.make_optimizer(opts["optimizer"], 1e-5)

  if method == "qft":
    rest = {k: v for k, v in params.items() if k in streamed.REST_UNITS}
    all_true = lambda t: masks.trainable_mask(t, [(r".*", True)],
                                              allow_unmatched=True)
    spec = streamed.StreamedSpec(
        layer_method=methods.qft_method("stochastic"),
        rest_method=methods.masked_method(all_true(rest)))
    init = lambda p: streamed.init_opt_states(spec, p, tx, tx)
    opt_sh = sharding.state_shardings(jax.eval_shape(init, params), mesh,
                                      rules)
    opt = jax.jit(init, out_shardings=opt_sh)(params)
    # The streamed step is jitted without explicit shardings: XLA may move
    # small leaves (norm scales) onto the mesh after the first step, which
    # costs one more compile during warm-up; the layout is then fixed.
    step_fn = streamed.make_streamed_step(config, spec, tx, tx)
    rng = jax.device_put(jax.random.PRNGKey(0), jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    state = (params, opt, rng)
    del params, opt

    def one(state, i):
      p, o, r = state
      with sharding.compute_mesh(mesh):  # gather codes, not floats
        p, o, r, m = step_fn(p, o, r, jnp.int32(i), batches[i % 3], None)
      return (p, o, r), m
  else:
    cfg = methods.MethodConfig(name=method, bits=opts["bits"],
                               group_size=opts["group_size"],
                               lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA)
    method_obj = methods.make_method(cfg, params)
    apply_fn = lambda p, tok: llama.Llama(config).apply({"params": p}, tok)
    init = lambda p: train.init_state(p, method_obj, tx)
    step_sh = sharding.train_step_shardings(jax.eval_shape(init, params),
                                            mesh, rules)
    state = jax.jit(init, out_shardings=step_sh[0])(params)
    step_fn = train.make_train_step(apply_fn, method_obj, tx,
                                    shardings=step_sh)
    del params

    def one(state, i):
      return step_fn(state, batches[i % 3])

  state_bytes = sharding.per_device_bytes(state)
  t0 = time.time()
  for i in range(warmup):
    state, metrics = one(state, i)
  jax.block_until_ready(metrics)
  compile_s = time.time() - t0
  want = jax.tree.map(lambda x: x.sharding, state)
  times = []
  for i in range(warmup, warmup + steps):
    t = time.time()
    state, metrics = one(state, i)
    jax.block_until_ready(metrics)
    times.append(time.time() - t)
  stable = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(
      jax.tree.leaves(state), jax.tree.leaves(want)))
  peaks, kind = device_memory()
  median = statistics.median(times)
  loss = float(np.asarray(metrics["loss"]))
  known = [p for p in peaks if p is not None]
  return {
      "row": name, "method": method,
      "model": "tiny" if tiny else f"llama-{model}", "n_devices": n,
      "mesh": f"fsdp:{n}", "device_kind": kind,
      "per_device_batch": per_device_batch, "global_batch": batch,
      "seq_len": seq, "optimizer": opts["optimizer"],
      "step_s": round(median, 4), "step_s_all": [round(t, 4) for t in times],
      "tok_per_s": round(batch * seq / median, 1),
      "peak_bytes_per_device": peaks,
      "peak_gib_max": round(max(known) / GIB, 3) if known else None,
      "state_bytes_per_device": list(state_bytes.values()),
      "state_gib_max": round(max(state_bytes.values()) / GIB, 3),
      "stable_shardings": stable,
      "loss": loss, "finite": bool(np.isfinite(loss)),
      "build_s": round(build_s, 1), "compile_s": round(compile_s, 1),
  }


def summarize(rows: list[dict]) -> list[dict]:
  """Efficiency and memory checks of each (row, n > 1) against (row, 1)."""
  base = {r["row"]: r for r in rows if r.get("n_devices") == 1
          and "error" not in r}
  out = []
  for r in rows:
    one = base.get(r.get("row"))
    if "error" in r or one is None or r["n_devices"] == 1:
      continue
    n = r["n_devices"]
    s = {"row": r["row"], "n_devices": n,
         "efficiency": round(r["tok_per_s"] / (n * one["tok_per_s"]), 3),
         "state_ratio": round(max(r["state_bytes_per_device"])
                              / (max(one["state_bytes_per_device"]) / n), 3)}
    if r["peak_gib_max"] is not None and one["peak_gib_max"] is not None:
      act = one["peak_gib_max"] - one["state_gib_max"]
      bound = 1.15 * one["peak_gib_max"] / n + act
      s.update(peak_gib_max=r["peak_gib_max"],
               peak_over_ideal=round(r["peak_gib_max"]
                                     / (one["peak_gib_max"] / n), 3),
               peak_bound_gib=round(bound, 3),
               peak_within_bound=r["peak_gib_max"] <= bound)
    out.append(s)
  return out


def _device_counts(tiny: bool) -> list[int]:
  if _DEVICES.value:
    return [int(x) for x in _DEVICES.value.split(",")]
  if tiny:
    return [1, 2, 4]
  probe = subprocess.run(
      [sys.executable, "-c", "import jax; print(jax.device_count())"],
      capture_output=True, text=True, check=True)
  total = int(probe.stdout.strip().splitlines()[-1])
  counts, n = [], 1
  while n <= total:
    counts.append(n)
    n *= 2
  return counts


def _child_env(n: int, tiny: bool) -> dict:
  env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  if tiny:
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
  else:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
  return env


def main(argv):
  del argv
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  if _ROW.value:
    row = run_one(_ROW.value, _N.value, _TINY.value, _STEPS.value,
                  _WARMUP.value)
    (out / f"row_{_ROW.value}_{_N.value}.json").write_text(json.dumps(row))
    print(json.dumps(row), flush=True)
    return
  start = time.time()
  names = _ROWS.value.split(",") if _ROWS.value else list(ROWS)
  for name in names:
    if name not in ROWS:
      raise app.UsageError(f"unknown row {name!r}; rows: {list(ROWS)}")
  counts = _device_counts(_TINY.value)
  date = datetime.date.today().isoformat()
  rows, path = [], None
  for name in names:
    for n in counts:
      left = _BUDGET.value - (time.time() - start)
      if left < 30:
        rows.append({"row": name, "n_devices": n,
                     "error": "skipped: wall-clock budget spent"})
        continue
      t = time.time()
      cmd = [sys.executable, __file__, f"--row={name}", f"--n={n}",
             f"--out={out}", f"--steps={_STEPS.value}",
             f"--warmup={_WARMUP.value}"] + (["--tiny"] if _TINY.value
                                              else [])
      row_file = out / f"row_{name}_{n}.json"
      row_file.unlink(missing_ok=True)
      try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              check=False, env=_child_env(n, _TINY.value),
                              timeout=min(_CHILD_TIMEOUT.value, left))
        err = None if proc.returncode == 0 else (proc.stderr or "")[-1500:]
      except subprocess.TimeoutExpired:
        err = "timeout"
      if err is None and row_file.exists():
        rows.append(json.loads(row_file.read_text()))
      else:
        rows.append({"row": name, "n_devices": n, "error": err})
      print(f"{name} n={n}: {json.dumps(rows[-1])[:300]} "
            f"({time.time() - t:.0f} s)", flush=True)
      kind = next((r["device_kind"] for r in rows if "device_kind" in r),
                  "unknown")
      gpu = "tiny" if _TINY.value else kind.lower().replace(" ", "_")
      result = {"gpu": kind, "date": date,
                "commit": os.environ.get("COMMIT", "unknown"),
                "rows": rows, "summary": summarize(rows)}
      if path is not None and path.name != f"multigpu_{gpu}_{date}.json":
        path.unlink(missing_ok=True)
      path = out / f"multigpu_{gpu}_{date}.json"
      path.write_text(json.dumps(result, indent=1))
  print(json.dumps(summarize(rows), indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
