r"""Sharded training on 1..n GPUs: per-GPU peak memory, tokens/s, scaling,
and sharded-vs-unsharded agreement. One device call, one JSON.

  python experiments/bench_multigpu.py --devices 1,2 --out $OUT    # default
  python experiments/bench_multigpu.py --rows qlora_13b --devices 1,2
  python experiments/bench_multigpu.py --tiny --devices 1,2 --out /tmp/m
                                          # CPU smoke test (simulated devices)

Rows (LLaMA shapes, random weights built on the devices in the method's
storage, never as float copies and never in host numpy):
  qlora_13b      NF4 (block 64, bf16 scales, no double quantization) + LoRA
                 r16 on all seven linears, AdamW, ordinary sharded step
                 (`train.make_train_step(shardings=...)`), chunked head.
  qft_7b         QFT: int8 rows + 1 % float outliers, int8 Lion, the
                 layer-streamed step (full-parameter, FSDP-sharded states).
  qft_13b, modulora3_65b   optional (not in the default list).
All rows: per-device batch 4 x 512 (65B: 1 x 512), full remat.

Each (row, n) runs in a fresh process that sees only the first n GPUs
(`CUDA_VISIBLE_DEVICES=0` for n = 1; `--tiny`: n simulated CPU devices) and
trains on an `fsdp:n` mesh with `qft_jax.sharding`'s default rules (LoRA
factors split too, `lora="fsdp"`): every weight (codes, scales, outliers)
and optimizer state is split by rows over the n devices, built there
directly (`jax.jit(make, out_shardings=...)`), and the batch grows with n
(weak scaling, `per-device batch x n`). The process reports per device
`memory_stats()["peak_bytes_in_use"]` (read right after the timed steps),
the training state's bytes, the median step time, the compiled step's
`memory_analysis()` (ordinary step) and the memory planner's prediction.

Agreement (each n > 1 process; after its measurement and peak reading):
the same params (rebuilt from the same keys) and the same global batches
are trained for `--agree_steps` steps on device 0 alone (an `fsdp:1` mesh,
i.e. unsharded) and compared with the sharded run's first steps: loss and
gradient norm per step (`LOSS_RTOL`, `GNORM_RTOL`), and per-leaf relative
L2 distances, estimated from float32 sketches (norm and a fixed +-1
projection, `sketch`), of the initial params (`INIT_RTOL`) and of the
optimizer state after step 0 (`OPT_RTOL`; AdamW's / Lion's moments are then
a multiple of the first gradient, so this compares gradients leaf by leaf,
which random-weight losses alone would not: they all sit near ln V; a
different batch moves the loss by only ~2e-3). The sharded run's sketches
are taken during its warm-up (fused reductions, one layer at a time;
`sketch_raised_peak` says whether they set the high-water mark).

Summary per row and n > 1 (targets from the multi-GPU issue):
  efficiency    = tok/s(n) / (n * tok/s(1))            (>= 0.8 at n = 2)
  peak_bound    = 1.15 * peak(1) / n + activations      (per-GPU peak must
                  stay below; activations = the planner's (`memory.plan`)
                  activation bytes at the per-device batch)
  peak_bound_measured   the same with activations measured at n = 1 as
                  peak(1) - state(1) (informative)
  agree_ok      all agreement tolerances met

Writes ONE file, `$OUT/multigpu_<gpu>x<n>_<date>.json`, after every
(row, n), so a run cut short keeps what finished (per-row scratch files go
to a temporary folder). `--budget_s` stops launching processes when the
remaining time is short; a process past it is killed, and a row whose
measurement finished before its agreement check was killed is kept.
Progress lines are streamed, and a table ends the output.
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
import tempfile
import threading
import time

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_ROWS = flags.DEFINE_string("rows", "qlora_13b,qft_7b",
                            "Comma-separated rows, in the order they run.")
_DEVICES = flags.DEFINE_string(
    "devices", "", "Comma-separated device counts (default: 1, 2, 4, ... up "
    "to all, probed in a subprocess).")
_OUT = flags.DEFINE_string("out", "/tmp/bench_multigpu", "Output folder "
                           "(receives one JSON file).")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny shapes on simulated CPU "
                          "devices (smoke test).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Warm-up steps (after compile).")
_AGREE = flags.DEFINE_bool("agree", True, "Sharded-vs-unsharded check in "
                           "each n > 1 process.")
_AGREE_STEPS = flags.DEFINE_integer("agree_steps", 3, "Steps compared.")
_BUDGET = flags.DEFINE_float("budget_s", 480.0, "Wall-clock budget of the "
                             "whole run; processes past it are killed.")
_MIN_START = flags.DEFINE_float("min_start_s", 75.0, "Start no process with "
                                "less than this left of the budget.")
_AGREE_MIN = flags.DEFINE_float("agree_min_s", 60.0, "Skip the agreement "
                                "check with less than this left.")
_ROW = flags.DEFINE_string("row", "", "Internal: run one row in-process.")
_N = flags.DEFINE_integer("n", 0, "Internal: device count of --row.")
_ROW_FILE = flags.DEFINE_string("row_file", "", "Internal: result file.")
_DEADLINE = flags.DEFINE_float("deadline", 0.0, "Internal: epoch seconds "
                               "at which the parent kills this process.")

# name -> (model, method, per-device batch, seq, options)
ROWS = {
    "qlora_13b": ("13b", "qlora", 4, 512, dict(optimizer="adamw", bits=4,
                                               group_size=64)),
    "qft_7b": ("7b", "qft", 4, 512, dict(optimizer="lion_int8")),
    "qft_13b": ("13b", "qft", 4, 512, dict(optimizer="lion_int8")),
    "modulora3_65b": ("65b", "modulora", 1, 512, dict(
        optimizer="adamw", bits=3, group_size=128)),
}
SHAPES = {  # d, f, layers, heads
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
    "65b": (8192, 22016, 80, 64),
}
LORA_RANK, LORA_ALPHA = 16, 32.0
LOSS_CHUNK = 128   # positions per head + cross-entropy chunk (bench_train's)
LR = 1e-5
MEM_SLACK = 1.15   # the issue's per-GPU bound: 1.15 x peak(1) / n + act.
EFF_TARGET = 0.8   # the issue's scaling target at 2 GPUs
LOSS_RTOL = 5e-3   # bf16 compute: sharded and unsharded losses
GNORM_RTOL = 5e-2  # ... and gradient norms
INIT_RTOL = 1e-3   # initial params (float32 sketches; same keys)
OPT_RTOL = 5e-2    # optimizer state after step 0 (~ the first gradient;
                   # params after it are reported only: Adam's / Lion's
                   # sign-like first update turns bf16 noise of near-zero
                   # gradients into whole-step differences)
GIB = 2**30


def _say(msg: str) -> None:
  print(msg, flush=True)


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

  Like `qarray.random_qarray`, but zero points come from `jax.random.bits`
  as uint8 (no int32 intermediate four times their size).
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
  its own `out_shardings` and created directly in pieces on the devices.
  The same `key` gives the same values on any mesh (threefry is
  partitionable)."""
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
        # One layer at a time (`lax.map`): the random-bit temporaries of a
        # whole stack would set the process's peak memory.
        dense = jax.lax.map(lambda kl: random_qarray(kl, (n, k), dense_cfg,
                                                     c.dtype),
                            jax.random.split(k1, lnum))
        idx = (jnp.arange(n_out, dtype=jnp.int32) * stride
               + jax.random.randint(k2, (lnum, n_out), 0, stride, jnp.int32))
        val = 0.05 * jax.random.normal(k3, (lnum, n_out), jnp.float32)
        return qft.QFTWeight(dense, idx, val)
      return make
    lnum, n, k = shape
    if method == "qlora":
      cfg = qa.QuantConfig(bits=4, group_size=opts["group_size"],
                           codebook="nf4", scale_dtype=jnp.bfloat16)
    else:
      cfg = qa.QuantConfig(bits=opts["bits"], group_size=opts["group_size"],
                           scale_dtype=jnp.bfloat16)
    kk = next(keys)
    return lambda: jax.lax.map(
        lambda kl: random_qarray(kl, (n, k), cfg, c.dtype),
        jax.random.split(kk, lnum))

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


def planned(config, method: str, opts: dict, per_device_batch: int,
            seq: int, tiny: bool):
  """The memory planner's prediction for one device at n = 1."""
  from qft_jax._src import memory  # pylint: disable=g-import-not-at-top
  return memory.plan(
      config, method, batch=per_device_batch, seq_len=seq,
      bits=opts.get("bits", 4), group_size=opts.get("group_size", 64),
      lora_rank=LORA_RANK, optimizer=opts["optimizer"],
      weight_bytes=4 if tiny else 2, scale_bytes=2,
      zero_point=method != "qlora", streamed=method == "qft",
      act_bytes=4 if tiny else 2, loss_chunk=min(LOSS_CHUNK, seq))


@dataclasses.dataclass
class Run:
  """A built training run on one mesh."""
  state: object
  one: object          # (state, i) -> (state, metrics)
  parts: object        # state -> {"params": ..., "opt_state": ...}
  init_sketch: list    # `sketch` of the initial params ([] if not asked)
  build_s: float
  compile_s: float
  compiled_memory: dict | None
  first: object = None  # the streamed step's step 0, already taken
  sketch0: list | None = None  # `sketch` of `parts(state)` after step 0
  sketch_raised_peak: bool | None = None  # did sketching raise a peak?


def _peaks() -> list:
  """`peak_bytes_in_use` of every local device (None where unknown)."""
  import jax  # pylint: disable=g-import-not-at-top
  return [(d.memory_stats() or {}).get("peak_bytes_in_use")
          for d in jax.local_devices()]


def _hash_sign(shape, lead=None):
  """A fixed pseudo-random +-1 per element, a function of its global
  index only (so any sharding computes the same pattern)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  u = lambda v: jnp.uint32(v)
  h = jnp.zeros(shape, jnp.uint32) if lead is None else jnp.full(
      shape, lead, jnp.uint32)
  for d in range(len(shape)):
    h = h * u(0x9E3779B1) + jax.lax.broadcasted_iota(jnp.uint32, shape, d)
  h = h ^ (h >> 15)
  h = h * u(0x2C1B3C6D)
  h = h ^ (h >> 12)
  h = h * u(0x297A2D39)
  h = h ^ (h >> 15)
  return 1.0 - 2.0 * (h >> 31).astype(jnp.float32)


def sketch(tree) -> list:
  """`(path, norm, projection)` per leaf: the float32 L2 norm and the inner
  product with `_hash_sign`. For two trees, |proj_a - proj_b| / norm
  estimates their relative L2 distance per leaf. Stacked leaves are
  reduced one layer at a time (`lax.map`), so no float copy of a whole
  quantized leaf is ever made."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from qft_jax._src.optim import masks  # pylint: disable=g-import-not-at-top
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  paths = [masks.path_str(k) for k, _ in flat]

  def one(x):
    if x.ndim >= 3:
      def layer(args):
        i, xi = args
        xi = xi.astype(jnp.float32)
        return (jnp.sum(xi * xi),
                jnp.sum(xi * _hash_sign(xi.shape, i.astype(jnp.uint32))))
      sq, pr = jax.lax.map(layer, (jnp.arange(x.shape[0]), x))
      return jnp.sqrt(jnp.sum(sq)), jnp.sum(pr)
    xf = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(xf * xf)), jnp.sum(xf * _hash_sign(x.shape))

  out = jax.jit(lambda leaves: [one(x) for x in leaves])(
      [x for _, x in flat])
  return [(p, float(np.asarray(a)), float(np.asarray(b)))
          for p, (a, b) in zip(paths, out)]


def compare_sketches(a: list, b: list) -> dict:
  """Largest per-leaf relative L2 distance (estimated) and the worst
  leaves."""
  if len(a) != len(b):
    return {"max_rel": float("inf"), "worst": [["tree mismatch", None]]}
  rel = []
  for (path, na, pa), (_, nb, pb) in zip(a, b):
    scale = max(na, nb)
    r = 0.0 if scale == 0 else max(abs(pa - pb), abs(na - nb)) / scale
    rel.append((r, path))
  rel.sort(reverse=True)
  return {"max_rel": rel[0][0] if rel else 0.0,
          "worst": [[p, float(f"{r:.3g}")] for r, p in rel[:3]]}


def _compiled_memory(compiled) -> dict | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  names = ("argument_size_in_bytes", "output_size_in_bytes",
           "alias_size_in_bytes", "temp_size_in_bytes",
           "generated_code_size_in_bytes")
  return {n: int(getattr(m, n)) for n in names if hasattr(m, n)}


def build_run(name: str, mesh, tiny: bool, batches,
              with_sketch: bool) -> Run:
  """Params, optimizer state and the step of row `name` on `mesh`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qft_jax._src import methods  # pylint: disable=g-import-not-at-top
  from qft_jax._src import sharding  # pylint: disable=g-import-not-at-top
  from qft_jax._src import streamed  # pylint: disable=g-import-not-at-top
  from qft_jax._src import train  # pylint: disable=g-import-not-at-top
  from qft_jax._src.optim import masks  # pylint: disable=g-import-not-at-top

  model, method, _, seq, opts = ROWS[name]
  if tiny:
    seq = 32
  config = model_config(model, tiny)
  # LoRA factors and their AdamW moments split too (`lora="fsdp"`): at 4+
  # devices replicated LoRA state would dominate QLoRA's per-device bytes.
  rules = sharding.default_rules(lora="fsdp")

  t0 = time.time()
  makers = param_makers(config, method, opts, jax.random.PRNGKey(0))
  abstract = jax.tree.map(jax.eval_shape, makers)
  shardings = sharding.param_shardings(abstract, mesh, rules)
  params = jax.tree.map(lambda make, sh: jax.jit(make, out_shardings=sh)(),
                        makers, shardings)
  jax.block_until_ready(params)
  init_sketch = sketch(params) if with_sketch else []
  tx = methods.make_optimizer(opts["optimizer"], LR)
  compiled_memory = None

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
    jax.block_until_ready(state)
    del params, opt
    build_s = time.time() - t0

    parts = lambda st: {"params": st[0], "opt_state": st[1]}

    def one(state, i):
      p, o, r = state
      with sharding.compute_mesh(mesh):  # gather codes, not floats
        p, o, r, m = step_fn(p, o, r, jnp.int32(i), batches[i % 3], None)
      return (p, o, r), m

    # Compile (and run) the first step here so compile_s is its own.
    t0 = time.time()
    state, m = one(state, 0)
    jax.block_until_ready(m)
    compile_s = time.time() - t0
    first = (state, m)
  else:
    cfg = methods.MethodConfig(name=method, bits=opts["bits"],
                               group_size=opts["group_size"],
                               lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA)
    method_obj = methods.make_method(cfg, params)
    init = lambda p: train.init_state(p, method_obj, tx)
    step_sh = sharding.train_step_shardings(jax.eval_shape(init, params),
                                            mesh, rules)
    state = train.jit_init_state(method_obj, tx, 0, step_sh[0])(params)
    jax.block_until_ready(state)
    del params
    build_s = time.time() - t0
    step_fn = train.make_train_step(
        None, method_obj, tx, shardings=step_sh,
        loss_fn=train.chunked_lm_loss(config, min(LOSS_CHUNK, seq)))
    t0 = time.time()
    compiled = step_fn.lower(state, batches[0]).compile()
    compile_s = time.time() - t0
    compiled_memory = _compiled_memory(compiled)

    parts = lambda st: {"params": st.params, "opt_state": st.opt_state}

    def one(state, i):
      return compiled(state, batches[i % 3])
    first = None

  return Run(state=state, one=one, parts=parts, init_sketch=init_sketch,
             build_s=round(build_s, 1), compile_s=round(compile_s, 1),
             compiled_memory=compiled_memory, first=first)


def _steps(run: Run, count: int, start: int = 0, sketch_step0=False):
  """Runs `count` steps; returns per-step (seconds, loss, grad_norm).
  With `sketch_step0`, sketches the state right after step 0."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = []
  state = run.state
  run.state = None
  for i in range(start, start + count):
    if i == 0 and run.first is not None:
      state, m = run.first
      run.first = None
      dt = None
    else:
      t = time.time()
      state, m = run.one(state, i)
      jax.block_until_ready(m)
      dt = time.time() - t
    if i == 0 and sketch_step0:
      before = _peaks()
      run.sketch0 = sketch(run.parts(state))
      run.sketch_raised_peak = any(
          a is not None and b is not None and b > a
          for a, b in zip(before, _peaks()))
    out.append((dt, float(np.asarray(m["loss"])),
                float(np.asarray(m["grad_norm"]))))
  run.state = state
  return out


def _rel(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-12)


def run_one(name: str, n: int, tiny: bool, steps: int, warmup: int,
            agree_steps: int, deadline: float, row_file: pathlib.Path,
            agree: bool) -> dict:
  """One row on the first `n` devices of this process."""
  import jax  # pylint: disable=g-import-not-at-top
  from qft_jax._src import data as data_lib  # pylint: disable=g-import-not-at-top
  from qft_jax._src import sharding  # pylint: disable=g-import-not-at-top

  tag = f"[{name} n={n}]"
  if jax.device_count() != n:
    raise ValueError(f"expected {n} devices, this process sees "
                     f"{jax.device_count()}")
  model, method, per_device_batch, seq, opts = ROWS[name]
  if tiny:
    per_device_batch, seq = 2, 32
  config = model_config(model, tiny)
  batch = per_device_batch * n
  plan = planned(config, method, opts, per_device_batch, seq, tiny)
  mesh = sharding.make_mesh(f"fsdp:{n}")
  batches = [sharding.shard_batch(b, mesh) for b in
             data_lib.random_batches(config.vocab_size, batch, seq)]
  do_agree = agree and n > 1
  warmup = max(warmup, 1)  # the streamed step's step 0 is its compile

  run = build_run(name, mesh, tiny, batches, do_agree)
  _say(f"{tag} built in {run.build_s} s, compiled in {run.compile_s} s")
  state_bytes = sharding.per_device_bytes(run.state)
  trace = _steps(run, warmup, sketch_step0=do_agree)
  want = jax.tree.map(lambda x: x.sharding, run.state)
  trace += _steps(run, steps, warmup)
  stable = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(
      jax.tree.leaves(run.state), jax.tree.leaves(want)))
  # Read the peaks now: the agreement run below uses device 0 again.
  peaks = _peaks()
  times = [t for t, _, _ in trace[warmup:]]
  median = statistics.median(times)
  peak_source = "memory_stats"
  if not any(p is not None for p in peaks) and run.compiled_memory:
    # CPU has no memory_stats: the compiled step's live bytes stand in
    # (arguments + outputs - aliased + temporaries), per device.
    m = run.compiled_memory
    proxy = (m.get("argument_size_in_bytes", 0)
             + m.get("output_size_in_bytes", 0)
             - m.get("alias_size_in_bytes", 0)
             + m.get("temp_size_in_bytes", 0))
    peaks, peak_source = [proxy] * n, "memory_analysis"
  known = [p for p in peaks if p is not None]
  loss = trace[-1][1]
  row = {
      "row": name, "method": method,
      "model": "tiny" if tiny else f"llama-{model}", "n_devices": n,
      "mesh": f"fsdp:{n}", "device_kind": jax.devices()[0].device_kind,
      "jax": jax.__version__,
      "per_device_batch": per_device_batch, "global_batch": batch,
      "seq_len": seq, "optimizer": opts["optimizer"],
      "step": "streamed" if method == "qft" else "train_step",
      "step_s": round(median, 4), "step_s_all": [round(t, 4) for t in times],
      "tok_per_s": round(batch * seq / median, 1),
      "tok_per_s_per_device": round(batch * seq / median / n, 1),
      "peak_bytes_per_device": peaks, "peak_source": peak_source,
      "peak_gib_max": round(max(known) / GIB, 3) if known else None,
      "state_bytes_per_device": list(state_bytes.values()),
      "state_gib_max": round(max(state_bytes.values()) / GIB, 3),
      "planned_n1": plan.as_dict(),
      "planned_gib_n1": round(plan.total / GIB, 3),
      "activations_gib_plan": round(plan.activations / GIB, 3),
      "compiled_memory": run.compiled_memory,
      "stable_shardings": stable,
      # True: the agreement's sketch after step 0 set a new high-water
      # mark (then the peak may be the sketch's, not training's).
      "sketch_raised_peak": run.sketch_raised_peak,
      "losses": [round(l, 5) for _, l, _ in trace],
      "grad_norms": [g for _, _, g in trace],
      "loss": loss, "finite": loss == loss and abs(loss) != float("inf"),
      "build_s": run.build_s, "compile_s": run.compile_s,
  }
  row_file.write_text(json.dumps(row))
  _say(f"{tag} step {row['step_s']} s, {row['tok_per_s']} tok/s, peak "
       f"{row['peak_gib_max']} GiB/device (state {row['state_gib_max']}), "
       f"loss {loss:.4f}")

  if do_agree:
    k = min(agree_steps, len(trace))
    left = deadline - time.time() if deadline else float("inf")
    if left < _AGREE_MIN.value and not tiny:
      row["agree"] = {"skipped": f"only {left:.0f} s left"}
    else:
      init_a, step0_a = run.init_sketch, run.sketch0
      del run  # free the sharded state first
      mesh1 = sharding.make_mesh("fsdp:1", jax.devices()[:1])
      batches1 = [sharding.shard_batch(b, mesh1) for b in
                  data_lib.random_batches(config.vocab_size, batch, seq)]
      ref = build_run(name, mesh1, tiny, batches1, True)
      got = _steps(ref, k, sketch_step0=True)
      init = compare_sketches(init_a, ref.init_sketch)
      split = lambda sk, part: [x for x in sk if x[0].startswith(part)]
      opt0 = compare_sketches(split(step0_a, "opt_state"),
                              split(ref.sketch0, "opt_state"))
      par0 = compare_sketches(split(step0_a, "params"),
                              split(ref.sketch0, "params"))
      loss_err = max(_rel(a[1], b[1]) for a, b in zip(trace[:k], got))
      gn_err = max(_rel(a[2], b[2]) for a, b in zip(trace[:k], got))
      ok = (init["max_rel"] <= INIT_RTOL and opt0["max_rel"] <= OPT_RTOL
            and loss_err <= LOSS_RTOL and gn_err <= GNORM_RTOL)
      row["agree"] = {
          "steps": k, "global_batch": batch,
          "unsharded_losses": [round(l, 5) for _, l, _ in got],
          "unsharded_grad_norms": [g for _, _, g in got],
          "loss_max_rel": loss_err, "grad_norm_max_rel": gn_err,
          "init_params": init, "opt_state_after_step0": opt0,
          "params_after_step0": par0,
          "tolerances": {"loss": LOSS_RTOL, "grad_norm": GNORM_RTOL,
                         "init_params": INIT_RTOL,
                         "opt_state_after_step0": OPT_RTOL},
          "ok": bool(ok),
      }
      _say(f"{tag} agreement vs 1 device: {k} steps loss rel "
           f"{loss_err:.1e}, grad-norm rel {gn_err:.1e}; L2 rel: init params "
           f"{init['max_rel']:.1e}, optimizer state after step 0 "
           f"{opt0['max_rel']:.1e}, params after step 0 "
           f"{par0['max_rel']:.1e} (info) -> {'OK' if ok else 'MISMATCH'}")
    row_file.write_text(json.dumps(row))
  return row


# ------------------------------------------------------------------ parent


def summarize(rows: list[dict]) -> list[dict]:
  """Efficiency, memory bound and agreement of each (row, n > 1)."""
  base = {r["row"]: r for r in rows if r.get("n_devices") == 1
          and "step_s" in r}
  out = []
  for r in rows:
    one = base.get(r.get("row"))
    if "step_s" not in r or r["n_devices"] == 1:
      continue
    n = r["n_devices"]
    s = {"row": r["row"], "n_devices": n}
    if one is not None:
      s["efficiency"] = round(r["tok_per_s"] / (n * one["tok_per_s"]), 3)
      s["efficiency_ok"] = s["efficiency"] >= EFF_TARGET
      s["state_ratio"] = round(max(r["state_bytes_per_device"])
                               / (max(one["state_bytes_per_device"]) / n), 3)
      if r["peak_gib_max"] is not None and one["peak_gib_max"] is not None:
        p1 = one["peak_gib_max"]
        act = one["activations_gib_plan"]
        bound = MEM_SLACK * p1 / n + act
        act_meas = p1 - one["state_gib_max"]
        bound_meas = MEM_SLACK * p1 / n + act_meas
        s.update(peak_gib_1=p1, peak_gib_max=r["peak_gib_max"],
                 peak_over_ideal=round(r["peak_gib_max"] / (p1 / n), 3),
                 activations_gib_plan=act,
                 peak_bound_gib=round(bound, 3),
                 peak_within_bound=r["peak_gib_max"] <= bound,
                 activations_gib_measured=round(act_meas, 3),
                 peak_bound_measured_gib=round(bound_meas, 3),
                 peak_within_bound_measured=r["peak_gib_max"] <= bound_meas)
    if "agree" in r:
      s["agree_ok"] = r["agree"].get("ok")
      s["agree_loss_max_rel"] = r["agree"].get("loss_max_rel")
    out.append(s)
  return out


def table(rows: list[dict], summary: list[dict]) -> str:
  """A compact text table of every (row, n) and its checks."""
  by = {(s["row"], s["n_devices"]): s for s in summary}
  fmt = lambda v, spec: format("-" if v is None else v,
                               spec if v is not None else spec.split(".")[0])
  ok = lambda v: "-" if v is None else ("ok" if v else "FAIL")
  head = (f"{'row':<14}{'n':>2} {'step_s':>7} {'tok/s':>8} {'peakGiB':>8} "
          f"{'state':>6} {'plan1':>6} {'eff':>6} {'bound':>6} {'mem':>4} "
          f"{'agree':>5}")
  lines = [head, "-" * len(head)]
  for r in rows:
    if "step_s" not in r:
      lines.append(f"{r.get('row', '?'):<14}{r.get('n_devices', 0):>2} "
                   f"ERROR {str(r.get('error'))[-200:]!r}")
      continue
    s = by.get((r["row"], r["n_devices"]), {})
    agree = r.get("agree")
    if not agree:
      agree_s = "-"
    elif "skipped" in agree:
      agree_s = "skip"
    else:
      agree_s = ok(agree.get("ok")) if "error" not in agree else "ERR"
    plan1 = r["planned_gib_n1"] if r["n_devices"] == 1 else None
    lines.append(
        f"{r['row']:<14}{r['n_devices']:>2} {r['step_s']:>7.3f} "
        f"{r['tok_per_s']:>8.0f} {fmt(r['peak_gib_max'], '>8.2f')} "
        f"{r['state_gib_max']:>6.2f} {fmt(plan1, '>6.2f')} "
        f"{fmt(s.get('efficiency'), '>6.3f')} "
        f"{fmt(s.get('peak_bound_gib'), '>6.2f')} "
        f"{ok(s.get('peak_within_bound')):>4} {agree_s:>5}")
  if any(r.get("peak_source") == "memory_analysis" for r in rows):
    lines.append("(peaks from the compiled step's memory_analysis: this "
                 "backend has no memory_stats)")
  return "\n".join(lines)


def _device_counts(tiny: bool) -> list[int]:
  if _DEVICES.value:
    return [int(x) for x in _DEVICES.value.split(",")]
  if tiny:
    return [1, 2]
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
  env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
         "PYTHONUNBUFFERED": "1"}
  env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
  root = str(pathlib.Path(__file__).resolve().parents[1])
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (root, env.get("PYTHONPATH", "")) if p)
  if tiny:
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
  else:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
  return env


def _run_child(cmd, env, timeout_s: float, err_path: pathlib.Path,
               prefix: str) -> tuple[int | None, str]:
  """Runs `cmd`, echoing its stdout lines; kills it after `timeout_s`.
  Returns (returncode, or None if it was killed at the limit; stderr tail).
  """
  with open(err_path, "w") as err:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                            text=True, env=env)
    killed = threading.Event()

    def kill():
      killed.set()
      proc.kill()

    timer = threading.Timer(max(timeout_s, 1.0), kill)
    timer.start()
    try:
      for line in proc.stdout:
        line = line.rstrip()
        if line:
          _say(f"  {line}" if line.startswith("[") else f"  {prefix}{line}")
      rc = proc.wait()
    finally:
      timer.cancel()
  tail = err_path.read_text(errors="replace")[-1500:]
  return (None if killed.is_set() else rc), tail


def _gpu_tag(kind: str, tiny: bool, n_max: int) -> str:
  if tiny:
    return f"tiny_cpux{n_max}"
  k = kind.lower()
  for name in ("h200", "h100", "a100", "b200", "gh200"):
    if name in k:
      return f"{name}x{n_max}"
  return "".join(ch if ch.isalnum() else "_" for ch in k) + f"x{n_max}"


def main(argv):
  del argv
  if _ROW.value:
    row = run_one(_ROW.value, _N.value, _TINY.value, _STEPS.value,
                  _WARMUP.value, _AGREE_STEPS.value, _DEADLINE.value,
                  pathlib.Path(_ROW_FILE.value), _AGREE.value)
    del row
    return
  start = time.time()
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="bench_multigpu_"))
  names = [x for x in _ROWS.value.split(",") if x]
  for name in names:
    if name not in ROWS:
      raise app.UsageError(f"unknown row {name!r}; rows: {list(ROWS)}")
  counts = _device_counts(_TINY.value)
  date = datetime.date.today().isoformat()
  _say(f"bench_multigpu: rows {names}, devices {counts}, budget "
       f"{_BUDGET.value:.0f} s, out {out}")
  rows, path = [], None
  for name in names:
    for n in counts:
      left = _BUDGET.value - (time.time() - start)
      if left < (_MIN_START.value if not _TINY.value else 5):
        rows.append({"row": name, "n_devices": n,
                     "error": f"skipped: only {left:.0f} s of the budget "
                              "left"})
        _say(f"{name} n={n}: skipped ({left:.0f} s left)")
        continue
      t = time.time()
      row_file = scratch / f"row_{name}_{n}.json"
      cmd = [sys.executable, os.path.abspath(__file__), f"--row={name}",
             f"--n={n}", f"--row_file={row_file}",
             f"--steps={_STEPS.value}", f"--warmup={_WARMUP.value}",
             f"--agree_steps={_AGREE_STEPS.value}",
             f"--deadline={start + _BUDGET.value}",
             f"--agree_min_s={_AGREE_MIN.value}",
             "--agree" if _AGREE.value else "--noagree"]
      cmd += ["--tiny"] if _TINY.value else []
      _say(f"{name} n={n}: starting ({left:.0f} s of budget left)")
      rc, err = _run_child(cmd, _child_env(n, _TINY.value), left,
                           scratch / f"err_{name}_{n}.txt", f"[{name} n={n}] ")
      row = json.loads(row_file.read_text()) if row_file.exists() else None
      if row is None:
        row = {"row": name, "n_devices": n,
               "error": "killed at the budget" if rc is None else
                        f"exit {rc}: {err}"}
      elif rc != 0:
        row.setdefault("agree", {})["error"] = (
            "killed at the budget" if rc is None else f"exit {rc}: {err}")
        row["agree"]["ok"] = row["agree"].get("ok", None)
      rows.append(row)
      _say(f"{name} n={n}: done in {time.time() - t:.0f} s"
           + ("" if "error" not in row else f": ERROR {row['error'][-600:]}"))
      kind = next((r["device_kind"] for r in rows if "device_kind" in r),
                  "unknown")
      summary = summarize(rows)
      result = {"gpu": kind, "date": date,
                "jax": next((r["jax"] for r in rows if "jax" in r), None),
                "commit": os.environ.get("COMMIT", "unknown"),
                "tiny": _TINY.value, "counts": counts,
                "targets": {"efficiency_at_2": EFF_TARGET,
                            "mem_slack": MEM_SLACK, "loss_rtol": LOSS_RTOL,
                            "grad_norm_rtol": GNORM_RTOL},
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "wall_s": round(time.time() - start, 1),
                "rows": rows, "summary": summary}
      tag = _gpu_tag(kind, _TINY.value, max(counts))
      new = out / f"multigpu_{tag}_{date}.json"
      if path is not None and path != new:
        path.unlink(missing_ok=True)
      path = new
      path.write_text(json.dumps(result, indent=1))
  summary = summarize(rows)
  _say(json.dumps(summary, indent=1))
  _say(table(rows, summary))
  _say(f"wrote {path} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
  app.run(main)
