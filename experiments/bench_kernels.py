"""Benchmark of the fused qmatmul kernels: one script, one device call.

Times, on the GPU at hand, for M in {1, 4, 16, 256, 4096}, (N, K) in
{(4096, 4096), (11008, 4096), (4096, 11008)} and bits in {2, 3, 4, 8}:

  xla_bf16     XLA's bf16 matmul (x @ W^T, and dy @ W for dx)
  xla_dequant  XLA dequantize-then-matmul (qdot's XLA path)
  ours         the Pallas kernels (pallas_kernels.qmatmul.fwd / dx)
  cublas_bf16  PyTorch's bf16 matmul (cuBLAS) on the same shapes  } a torch
  bnb_nf4      bitsandbytes NF4 `matmul_4bit` (blocksize 64)        } subprocess

and measures the two ceilings (device copy bandwidth, bf16 matmul rate) in the
same run. Timing: CUPTI kernel durations (JAX: jax.experimental.mosaic.gpu
.profiler, median of 7 repeats; torch: torch.profiler, mean of 10, plus CUDA
graph replay timed with events as `*_graph_ms`), summed over every kernel of
one call, after warm-up, rotating over enough weight / input copies to
overflow L2. Inputs are random normal (never zeros). Every `ours` row also
carries rel_err against the float32 reference, computed with the output
poisoned (NaN) first.

Usage (device machine, repo root; bitsandbytes installed from a carried wheel):
  COMMIT=<hash> python3 experiments/bench_kernels.py --out $OUT [--sweep]
Writes $OUT/kernels_<gpu>_<date>.json and prints a short table last.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
import traceback

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
MS = [1, 4, 16, 256, 4096]
BITS = [2, 3, 4, 8]
GROUP = 128
NF4_DQ = "nf4_dq"  # QLoRA's base weight: NF4 g64, double-quantized scales
TRAIN_M = 2048  # check_pallas_training.py's tokens per step (4 x 512)
L2_OVERFLOW_BYTES = 160 * 2**20  # rotate over at least this much weight data
INTERPRET = False  # --dry_run: tiny shapes in the Pallas interpreter (CPU)


def _copies(nbytes: int, cap: int = 16) -> int:
  return max(2, min(cap, math.ceil(L2_OVERFLOW_BYTES / max(nbytes, 1))))


# ----------------------------------------------------------------- torch peer
def run_peer(path: str, shapes, ms) -> None:
  """cuBLAS bf16 and bitsandbytes NF4 kernel times; writes JSON to `path`."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.autograd import DeviceType  # pylint: disable=g-import-not-at-top
  dev = "cuda"
  res = {"torch": torch.__version__, "rows": [], "errors": []}
  try:
    import bitsandbytes as bnb  # pylint: disable=g-import-not-at-top
    import bitsandbytes.functional as bnbf  # pylint: disable=g-import-not-at-top
    res["bitsandbytes"] = bnb.__version__
  except Exception as e:  # pylint: disable=broad-except
    bnb = None
    res["errors"].append(f"bitsandbytes import: {e!r}")

  def kernel_ms(fn, calls_per_fn: int, reps: int = 10) -> float:
    for _ in range(3):
      fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
      for _ in range(reps):
        fn()
      torch.cuda.synchronize()
    total_us = sum(e.time_range.elapsed_us() for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    return total_us / 1e3 / (reps * calls_per_fn)

  def graph_ms(fn, calls_per_fn: int, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
      for _ in range(3):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
      fn()
    times = []
    for _ in range(5):
      a = torch.cuda.Event(enable_timing=True)
      b = torch.cuda.Event(enable_timing=True)
      a.record()
      for _ in range(reps):
        g.replay()
      b.record()
      torch.cuda.synchronize()
      times.append(a.elapsed_time(b) / (reps * calls_per_fn))
    return statistics.median(times)

  torch.manual_seed(0)
  for n, k in shapes:
    r = _copies(2 * n * k)
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
          for _ in range(r)]
    q4 = []
    if bnb is not None:
      rq = _copies(n * k // 2)
      q4 = [bnbf.quantize_4bit(ws[i % r], quant_type="nf4", blocksize=64)
            for i in range(rq)]
    for m in ms:
      xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            for _ in range(r)]
      dys = [torch.randn(m, n, device=dev, dtype=torch.bfloat16)
             for _ in range(r)]
      row = {"M": m, "N": n, "K": k}
      fns = {
          "cublas_bf16_fwd": (lambda: [x @ w.t() for x, w in zip(xs, ws)], r),
          "cublas_bf16_dx": (lambda: [d @ w for d, w in zip(dys, ws)], r),
      }
      if q4:
        xq = [xs[i % r] for i in range(len(q4))]
        fns["bnb_nf4_fwd"] = (lambda: [
            bnb.matmul_4bit(x, q.t(), quant_state=st)
            for x, (q, st) in zip(xq, q4)], len(q4))
      for name, (fn, calls) in fns.items():
        for how, timer in (("kernel", kernel_ms), ("graph", graph_ms)):
          try:
            row[f"{name}_{how}_ms"] = timer(fn, calls)
          except Exception as e:  # pylint: disable=broad-except
            res["errors"].append(f"{name} {how} {m}x{n}x{k}: {e!r}"[:300])
      res["rows"].append(row)
      print("peer", row, flush=True)
    torch.cuda.empty_cache()
  with open(path, "w") as f:
    json.dump(res, f, indent=1)


# ------------------------------------------------------------------- JAX side
def _jax_setup():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jax, jnp


class Timer:
  """CUPTI kernel time of a compiled function (falls back to wall clock)."""

  def __init__(self):
    self.method = "cupti"
    try:
      from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
      self._profiler = profiler
    except Exception:  # pylint: disable=broad-except
      self._profiler = None
      self.method = "wall"

  def __call__(self, compiled, args, per_call: int, iters: int = 7) -> float:
    jax, _ = _jax_setup()
    if self._profiler is not None:
      try:
        _, times = self._profiler.measure(compiled, iterations=iters)(*args)
        if times:
          return statistics.median(times) / per_call
      except Exception as e:  # pylint: disable=broad-except
        print("cupti failed, wall clock from now on:", repr(e)[:200])
        self._profiler = None
        self.method = "wall"
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
      t = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times) / per_call


def gpu_tag(device_kind: str) -> str:
  """'h100' / 'h200' / 'a100' for those GPUs' device kinds, else the kind
  with non-alphanumerics as '_' (the results files' GPU field)."""
  return next((t.lower() for t in ("H100", "H200", "A100") if t in device_kind),
              "".join(c if c.isalnum() else "_" for c in device_kind))


def write_rows(out_dir: str, stem: str, timer, rows: list, what: str):
  """Writes `rows` with the run's GPU, jax, commit and date to
  `out_dir/<stem>_<gpu>_<date>.json` (the probe scripts' format)."""
  jax, _ = _jax_setup()
  date = datetime.date.today().isoformat()
  kind = jax.devices()[0].device_kind
  path = pathlib.Path(out_dir) / f"{stem}_{gpu_tag(kind)}_{date}.json"
  path.write_text(json.dumps(dict(
      gpu=kind, jax=jax.__version__,
      commit=os.environ.get("COMMIT", "unknown"), date=date,
      timing=timer.method, what=what, rows=rows), indent=1))
  print("wrote", path, time.strftime("%X"))


def row_timer(timer, rows: list):
  """`timed(label, fn, sets, **extra) -> row`: compiles `fn` over every
  argument tuple in `sets` as one jitted call, times it with `timer` (per
  set), appends `dict(impl=label, **extra, us=...)` (or the error) to
  `rows` and prints it (the probe scripts' timing)."""
  jax, _ = _jax_setup()

  def timed(label, fn, sets, **extra):
    row = dict(impl=label, **extra)
    try:
      compiled = jax.jit(lambda sets: [fn(*s) for s in sets]).lower(
          sets).compile()
      row["us"] = timer(compiled, (sets,), len(sets)) * 1e3
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
      row["traceback"] = traceback.format_exc()[-2000:]
    rows.append(row)
    print(row, flush=True)
    return row
  return timed


def ceilings(timer) -> dict:
  """Measured copy bandwidth (read + write) and bf16 matmul rate."""
  jax, jnp = _jax_setup()
  out = {}
  n = 2**12 if INTERPRET else 256 * 2**20  # 512 MiB of bf16
  a = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.bfloat16)
  f = jax.jit(lambda v: -v).lower(a).compile()
  ms = timer(f, (a,), 1)
  out["copy_GBps"] = 2 * 2 * n / ms / 1e6
  del a
  s = 64 if INTERPRET else 8192
  x = jax.random.normal(jax.random.PRNGKey(1), (s, s), jnp.bfloat16)
  y = jax.random.normal(jax.random.PRNGKey(2), (s, s), jnp.bfloat16)
  f = jax.jit(lambda p, q: p @ q).lower(x, y).compile()
  ms = timer(f, (x, y), 1)
  out["bf16_matmul_TFLOPs"] = 2 * s**3 / ms / 1e9
  return out


def quant_config(bits):
  """QuantConfig of `bits` (NF4_DQ: its first level, see `_random_weight`)."""
  from qft_jax._src import qarray as qa  # pylint: disable=g-import-not-at-top
  _, jnp = _jax_setup()
  if bits in ("nf4", NF4_DQ):
    return qa.QuantConfig(bits=4, group_size=64, symmetric=True,
                          codebook="nf4", scale_dtype=jnp.bfloat16)
  return qa.QuantConfig(bits=bits, group_size=GROUP, symmetric=False,
                        scale_dtype=jnp.bfloat16)


@dataclasses.dataclass
class Job:
  """One timed function over rotated inputs."""
  key: tuple
  fn: object           # python callable over (sets,)
  make_args: object    # () -> args tuple (concrete arrays)
  per_call: int
  compiled: object = None
  error: str | None = None


def _compile_all(jobs, workers: int, deadline: float):
  jax, _ = _jax_setup()

  def one(job):
    if time.time() > deadline:
      job.error = "skipped: time budget"
      return
    try:
      args = job.make_args(abstract=True)
      job.compiled = jax.jit(job.fn).lower(*args).compile()
    except Exception as e:  # pylint: disable=broad-except
      job.error = f"compile: {type(e).__name__}: {str(e)[:300]}"
  with concurrent.futures.ThreadPoolExecutor(workers) as ex:
    list(ex.map(one, jobs))


def _random_weight(key, n, k, bits):
  """A random `(n, k)` QArray of `bits`. NF4_DQ stores its scales as QLoRA
  and check_pallas_training.py do (`nf4.double_quantize`: 8-bit codes in
  blocks of 256 scales, float32 second-level scales)."""
  from qft_jax._src import qarray as qa  # pylint: disable=g-import-not-at-top
  from qft_jax._src.quantizers import nf4  # pylint: disable=g-import-not-at-top
  w = qa.random_qarray(key, (n, k), quant_config(bits))
  if bits == NF4_DQ:
    w = dataclasses.replace(w, scale=nf4.double_quantize(w.scale))
  return w


def _weight_sets(key, n, k, bits, r, abstract):
  jax, _ = _jax_setup()
  make = functools.partial(_random_weight, n=n, k=k, bits=bits)
  if abstract:
    return [jax.eval_shape(make, jax.random.PRNGKey(key))] * r
  return [make(kk) for kk in jax.random.split(jax.random.PRNGKey(key), r)]


def _act_sets(key, shape, r, abstract):
  jax, jnp = _jax_setup()
  if abstract:
    return [jax.ShapeDtypeStruct(shape, jnp.bfloat16)] * r
  keys = jax.random.split(jax.random.PRNGKey(key), r)
  return [jax.random.normal(kk, shape, jnp.bfloat16) for kk in keys]


def _qbytes(n, k, bits):
  cfg = quant_config(bits)
  g = cfg.group_size
  zero = 0 if cfg.symmetric else 1
  scale = 1 if bits == NF4_DQ else 2
  return n * k * cfg.bits // 8 + n * (k // g) * (scale + zero)


def _check_fn(a, w, poison, *, op, tuning):
  """rel err of the kernel (output poisoned with NaN first) vs float32."""
  from pallas_kernels import qmatmul as kq  # pylint: disable=g-import-not-at-top
  _, jnp = _jax_setup()
  f, ref_f = ((kq.fwd, kq.reference) if op == "fwd"
              else (kq.dx, kq.reference_dx))
  got = f(a, w, tuning=tuning, out_init=poison,
          interpret=INTERPRET).astype(jnp.float32)
  ref = ref_f(a, w)
  err = jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)
  return jnp.where(jnp.isfinite(err), err, jnp.inf)


def _check_args(abstract=False, *, op, m, n, k, bits):
  jax, jnp = _jax_setup()
  seed = int(time.time_ns() % 2**31)
  a_shape = (m, k) if op == "fwd" else (m, n)
  out_shape = (m, n) if op == "fwd" else (m, k)
  poison = (jax.ShapeDtypeStruct(out_shape, jnp.bfloat16) if abstract
            else jnp.full(out_shape, jnp.nan, jnp.bfloat16))
  return (_act_sets(seed, a_shape, 1, abstract)[0],
          _weight_sets(seed + 1, n, k, bits, 1, abstract)[0], poison)


def make_jobs(m, n, k, bits, tuning=None, which=("ours", "deq", "check")):
  """Jobs for one (M, N, K, bits): ours / XLA dequant, fwd and dx."""
  from pallas_kernels import qmatmul as kq  # pylint: disable=g-import-not-at-top
  from qft_jax._src import qarray as qa  # pylint: disable=g-import-not-at-top
  _, jnp = _jax_setup()
  r = _copies(_qbytes(n, k, bits))
  jobs = []
  for op in ("fwd", "dx"):
    a_shape = (m, k) if op == "fwd" else (m, n)

    def make_args(abstract=False, a_shape=a_shape):
      return (list(zip(_act_sets(1, a_shape, r, abstract),
                       _weight_sets(2, n, k, bits, r, abstract))),)

    if "ours" in which:
      f = kq.fwd if op == "fwd" else kq.dx
      jobs.append(Job(("ours", op, m, n, k, bits, tuning),
                      lambda sets, f=f: [f(a, w, tuning=tuning,
                                           interpret=INTERPRET)
                                         for a, w in sets],
                      make_args, r))
    if "check" in which:
      jobs.append(Job(("check", op, m, n, k, bits, tuning),
                      functools.partial(_check_fn, op=op, tuning=tuning),
                      functools.partial(_check_args, op=op, m=m, n=n, k=k,
                                        bits=bits), 1))
    if "deq" in which:
      if op == "fwd":
        fn = lambda sets: [jnp.dot(a, qa.dequantize(w, a.dtype).T,
                                   preferred_element_type=jnp.float32
                                   ).astype(a.dtype) for a, w in sets]
      else:
        fn = lambda sets: [jnp.dot(a, qa.dequantize(w, a.dtype),
                                   preferred_element_type=jnp.float32
                                   ).astype(a.dtype) for a, w in sets]
      jobs.append(Job(("deq", op, m, n, k, bits, None), fn, make_args, r))
  return jobs


def _row_kernel(op, m, n, k, bits) -> dict:
  """The kernel and config `qmatmul.fwd` / `dx` pick for this row: the
  Mosaic GPU kernels where their gates pass, else the Triton table's."""
  from pallas_kernels import qmatmul as kq  # pylint: disable=g-import-not-at-top
  from pallas_kernels import qmatmul_mgpu  # pylint: disable=g-import-not-at-top
  from pallas_kernels import qmatmul_mgpu_dx  # pylint: disable=g-import-not-at-top
  from pallas_kernels import tuning as tuning_lib  # pylint: disable=g-import-not-at-top
  _, jnp = _jax_setup()
  a, w, _ = _check_args(True, op=op, m=m, n=n, k=k, bits=bits)
  if op == "fwd" and kq.can_use_mosaic(a, w)[0]:
    return dict(kernel="mosaic_gpu",
                config=dataclasses.asdict(qmatmul_mgpu.MgpuConfig()))
  if op == "dx" and kq.can_use_mosaic_dx(a, w)[0]:
    return dict(kernel="mosaic_gpu",
                config=dataclasses.asdict(qmatmul_mgpu_dx.DxConfig()))
  return dict(kernel="triton", config=dataclasses.asdict(tuning_lib.choose(
      op, m, n, k, 4 if bits == "nf4" else bits, codebook=bits == "nf4",
      dtype=jnp.bfloat16)))


def make_bf16_jobs(m, n, k):
  jax, jnp = _jax_setup()
  r = _copies(2 * n * k)
  jobs = []
  for op in ("fwd", "dx"):
    a_shape = (m, k) if op == "fwd" else (m, n)

    def make_args(abstract=False, a_shape=a_shape):
      ws = _act_sets(3, (n, k), r, abstract)
      if not abstract:
        ws = [w * 0.02 for w in ws]
      return (list(zip(_act_sets(4, a_shape, r, abstract), ws)),)

    if op == "fwd":
      fn = lambda sets: [jnp.dot(a, w.T, preferred_element_type=jnp.float32
                                 ).astype(a.dtype) for a, w in sets]
    else:
      fn = lambda sets: [jnp.dot(a, w, preferred_element_type=jnp.float32
                                 ).astype(a.dtype) for a, w in sets]
    jobs.append(Job(("bf16", op, m, n, k, None, None), fn, make_args, r))
  return jobs


def time_jobs(jobs, timer, deadline):
  jax, _ = _jax_setup()
  results = {}
  for job in jobs:
    if job.compiled is None or time.time() > deadline:
      results[job.key] = None if job.compiled else (job.error or "skipped")
      continue
    try:
      args = job.make_args()
      if job.key[0] == "check":
        results[job.key] = float(job.compiled(*args))
      else:
        results[job.key] = timer(job.compiled, args, job.per_call)
      del args
    except Exception as e:  # pylint: disable=broad-except
      results[job.key] = f"run: {type(e).__name__}: {str(e)[:300]}"
  return results


def sweep_candidates():
  """Decode variants around the table's choice.

  Run 1's geometry sweep (156 configs) chose the table; this one checks the
  split factor and program width it did not cover at M = 16, the word tile
  of 2/3-bit decode, the vector contraction (`contraction="fma"`, one row
  per program) at M = 1, `prefetch` at the table's geometries, split
  contraction at M = 256, and the PTX unpacking (`unpack="ptx"`) of 2/4-bit
  decode around the table's geometry, also with the in-kernel reduction of
  the split (`split_reduce="kernel"`), timed first.
  """
  from pallas_kernels import tuning  # pylint: disable=g-import-not-at-top
  cands = []
  for n, k in ((4096, 4096), (11008, 4096)):
    for bn in (32, 64):
      for split in (1, 2, 4, 8, 16):
        cands.append(("fwd", 16, n, k, 4, tuning.TuningConfig(
            block_m=16, block_n=bn, block_k=128, num_warps=2, num_stages=5,
            scale_mode="activations", split_k=split)))
    for split in (4, 8):
      cands.append(("fwd", 16, n, k, 4, tuning.TuningConfig(
          block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3,
          scale_mode="activations", split_k=split)))
    for bn in (16, 32, 64):
      for warps in (1, 2, 4):
        for split in (4, 8, 16):
          cands.append(("fwd", 1, n, k, 4, tuning.TuningConfig(
              block_m=1, block_n=bn, block_k=128, num_warps=warps,
              num_stages=3, scale_mode="weights", split_k=split,
              contraction="fma")))
    # Prefetch (the next 1 or 2 steps' loads in flight during a step's
    # arithmetic) at the table's decode and training geometries.
    for op in ("fwd", "dx"):
      for m in (1, 16, 4096):
        for bits in ((2, 3, 4) if m == 1 else (4,)):
          base = tuning.choose(op, m, n, k, bits)
          for depth in (1, 2):
            cands.append((op, m, n, k, bits,
                          dataclasses.replace(base, prefetch=depth)))
          if m <= 16 and op == "fwd":
            cands.append((op, m, n, k, bits, dataclasses.replace(
                base, prefetch=1, split_k=8)))
    # M = 256 ("mid": 128 programs at N = 4096, latency-bound like unsplit
    # decode in run 2): split its contraction too.
    for op in ("fwd", "dx"):
      base = tuning.choose(op, 256, n, k, 4)
      for split in (2, 4):
        for depth in (0, 1):
          cands.append((op, 256, n, k, 4, dataclasses.replace(
              base, split_k=split, prefetch=depth)))
    # 2/3-bit hold a word tile of 4 / 8 planes live through the step: does
    # a narrower word tile (fewer registers) cut their per-plane cost?
    for bits in (2, 3):
      for m in (1, 16):
        for bk in (32, 64, 128):
          cands.append(("fwd", m, n, k, bits, tuning.TuningConfig(
              block_m=16, block_n=64, block_k=bk, num_warps=4, num_stages=3,
              scale_mode="activations", split_k=4)))
    for bits in (2, 3, 8):
      for bn, warps in ((32, 2), (64, 4)):
        cands.append(("fwd", 1, n, k, bits, tuning.TuningConfig(
            block_m=1, block_n=bn, block_k=128, num_warps=warps,
            num_stages=3, scale_mode="weights", split_k=8,
            contraction="fma")))
    # PTX unpacking (two codes per instruction) at and around the table's
    # decode geometry: block_n and split, 2- and 4-bit, fwd and dx.
    for op in ("fwd", "dx"):
      for m in (1, 16):
        for bits in (2, 4):
          base = dataclasses.replace(tuning.choose(op, m, n, k, bits),
                                     unpack="ptx")
          cands.append((op, m, n, k, bits, base))
          cands.append((op, m, n, k, bits, dataclasses.replace(
              base, split_reduce="kernel")))
          if op == "fwd":
            for bn, split in ((32, 4), (64, 8), (128, 4), (128, 8)):
              cands.append((op, m, n, k, bits, dataclasses.replace(
                  base, block_n=bn, split_k=split)))
  # PTX unpacking first (the lead of session 6): the sweep times in order
  # until its deadline.
  return sorted(cands, key=lambda c: c[5].unpack != "ptx")


def run_sweep(timer, deadline, workers):
  cands = sweep_candidates()
  if INTERPRET:
    fma = [c for c in cands if c[5].contraction == "fma"]
    ahead = [c for c in cands if c[5].prefetch]
    cands = [(op, min(m, 17), 48, 256, bits, cfg)
             for op, m, n, k, bits, cfg in cands[::40] + fma[:1] + ahead[:2]]
  jobs = []
  for op, m, n, k, bits, cfg in cands:
    for job in make_jobs(m, n, k, bits, tuning=cfg, which=("ours",)):
      if job.key[1] == op:
        jobs.append(job)
  t = time.time()
  _compile_all(jobs, workers, deadline)
  print(f"sweep: compiled {len(jobs)} in {time.time() - t:.0f}s", flush=True)
  res = time_jobs(jobs, timer, deadline)
  out = []
  for job in jobs:
    _, op, m, n, k, bits, cfg = job.key
    v = res[job.key]
    out.append(dict(op=op, M=m, N=n, K=k, bits=bits,
                    config=dataclasses.asdict(cfg),
                    ms=v if isinstance(v, float) else None,
                    error=None if isinstance(v, float) else (v or job.error)))
  best = {}
  for r in out:
    if r["ms"] is None:
      continue
    key = (r["op"], r["M"], r["N"], r["K"], r["bits"])
    if key not in best or r["ms"] < best[key]["ms"]:
      best[key] = r
  for key, r in sorted(best.items(), key=str):
    print("sweep best", key, f"{r['ms'] * 1e3:.1f}us", r["config"], flush=True)
  return out


# Decode probe variants, each relative to the table's kernel (`tuning.choose`
# with bf16 activations). Nsight Compute's source view of the 4-bit decode
# kernels (experiments/results/ncu/*_ptx_sass.csv, session 8): Triton
# streams the packed bytes and the activation tiles through shared memory
# (cp.async, `num_stages` deep); the hottest stall is the wait for a stage
# at the loop's top, then the plain scale / zero-point loads; about a
# quarter of the instructions load and move the activation operand, which
# M = 1 pads to 16 rows. Session 8's variants all lost (WORKSPACE.md
# section 4, "Session-8 probes"): the scale / zero-point loads carried a
# step ahead 23-61 % (probe 7, kernels_probe_h100_2026-11-27_run7.json),
# more weight rows per warp 17-51 % (probe 8, _run8.json; one 2-bit case
# 5 % faster at 4096^2 and 18 % slower at 11008x4096), the codes' bias
# subtracted once per output element instead of per weight 26-70 % at
# 4-bit (probe 10, _run10.json). None is left to try at M = 1 within the
# knobs Triton exposes.
# Session 9's per-kernel breakdown (decode_breakdown_h100_2026-11-27.json:
# XLA's sum of the split partials costs 1.2-1.4 us per call) led to probe
# 13 (..._run13.json), splits 1 and 2: 4-bit fwd now splits toward
# `tuning.FWD4_TARGET_PROGRAMS` (11008x4096 split 2, 17.1 -> 15.1 us); 2-bit
# keeps split 4 (split 2: 11.0 / 20.7 us against 8.9 / 16.4).
PROBE_FWD = ()
PROBE_DX = ()
# 3-bit decode with its three byte planes unpacked in PTX: session 10's
# probe (kernels_probe_h100_2026-11-28.json) put it into the table, fwd and
# dx (`tuning._DECODE_3BIT`). 8-bit decode with the PTX unpacking lost in
# the same probe (fwd 13.0 -> 13.1 us, dx 27.2 -> 30.0 us at 4096^2).
PROBE_3BIT = ()
PROBE_8BIT = ()
# 3-bit dx decode: session 9's probe 11 (..._run11.json) moved it to
# 128-row steps (`tuning._DECODE_3BIT`, 50.7 -> 26.2 us at 4096^2); its
# neighbours lost or tied in probe 12 (_run12.json: block_n 64 30.5 us, two
# stages 26.5, a 64-word tile 49.9); the PTX unpacking (session 10) won.
PROBE_DX3 = ()
# NF4 decode (QLoRA's weight): probes 11-12 put the PTX lookup into the
# table (`tuning._PTX_CODEBOOK`): fwd split 8 ways, dx with 4-bit dx's
# geometry. Nothing queued.
PROBE_NF4 = ()
PROBE_NF4_DX = ()
# Training shapes (M = TRAIN_M): session 9's probe (..._run11.json) timed
# the PTX codes / levels with partial-product scaling against the table's
# float32 dequantization: NF4 dx was faster but failed QLoRA's training
# check on accuracy (tuning._PTX_CODEBOOK), NF4 fwd and uniform 4-bit lost.
# Nothing queued: the training rows run only when this is set.
PROBE_TRAIN = ()
# M = 256 (prefill): probes 9 and 10 (..._run9.json, _run10.json) moved its
# tiles (`tuning._prefill`); their neighbours lost in probe 11
# (..._run11.json). NF4 dx with PTX levels and dy scaled beat the select
# tree there in probe 12 (65.5 vs 102.9 us at 4096^2) but is not taken: it
# failed QLoRA's training check on accuracy (tuning._PTX_CODEBOOK).
MID_M = 256
PROBE_MID_FWD = ()
PROBE_MID_DX = ()
PROBE_MID_NF4_DX = ()


def _probe_label(kind: str, overrides: dict | None) -> str:
  """A probe row's impl: "bf16", "xla_dequant", "table" (the kernel as
  `tuning.choose` configures it) or "table+<knob>=<value>,..."."""
  if kind == "bf16":
    return "bf16"
  if kind == "deq":
    return "xla_dequant"
  if not overrides:
    return "table"
  return "table+" + ",".join(f"{k}={v}" for k, v in overrides.items())


def run_probe(timer, deadline, workers):
  """Decode, prefill and training variants of the table's kernels, each
  with its poisoned-output error check (a minute or two).

  Decode, M = 1, at the two decode acceptance shapes: XLA bf16; the table's
  kernel (`tuning.choose` with bf16 activations) and each `PROBE_FWD`
  variant for 4- and 2-bit fwd, each `PROBE_DX` variant for 4-bit dx and
  each `PROBE_3BIT` / `PROBE_DX3` variant for 3-bit fwd / dx, each
  `PROBE_8BIT` variant for 8-bit fwd and dx; NF4
  (NF4_DQ) fwd / dx, the table and each `PROBE_NF4` / `PROBE_NF4_DX`
  variant.
  Prefill, M = MID_M: XLA bf16, the table and each `PROBE_MID_FWD` /
  `PROBE_MID_DX` variant at 4-bit and each `PROBE_MID_NF4_DX` variant for
  NF4 dx (the dry run times them at M = 19).

  Training, only while `PROBE_TRAIN` holds variants: M = TRAIN_M with
  QLoRA's weight (NF4_DQ) and uniform 4-bit at the same two shapes, fwd and
  dx: XLA bf16, XLA dequantize-then-matmul (NF4) and the table's kernel and
  each variant. The dry run times the TRAIN_M configs at M = 17.
  """
  from pallas_kernels import tuning  # pylint: disable=g-import-not-at-top
  _, jnp = _jax_setup()
  shapes = [(48, 256)] if INTERPRET else [(4096, 4096), (11008, 4096)]
  train_m = 17 if INTERPRET else TRAIN_M
  mid_m = 19 if INTERPRET else MID_M
  jobs, labels = [], {}

  def add(op, m, n, k, bits, overrides, config_m=None):
    """Jobs of the table's kernel (as chosen for M = `config_m`, default m)
    with `overrides`."""
    cfg = None
    if overrides or config_m:
      cfg = dataclasses.replace(tuning.choose(
          op, config_m or m, n, k, 4 if bits == NF4_DQ else bits,
          codebook=bits == NF4_DQ, dtype=jnp.bfloat16), **overrides)
    for job in make_jobs(m, n, k, bits, tuning=cfg, which=("ours", "check")):
      if job.key[1] == op:
        jobs.append(job)
        labels[job.key] = _probe_label("ours", overrides)

  for n, k in shapes:
    jobs += make_bf16_jobs(1, n, k)
    for bits in (4, 2):
      for overrides in ({},) + PROBE_FWD:
        add("fwd", 1, n, k, bits, overrides)
    for overrides in ({},) + PROBE_DX:
      add("dx", 1, n, k, 4, overrides)
    for overrides in ({},) + PROBE_3BIT:
      add("fwd", 1, n, k, 3, overrides)
    for overrides in ({},) + PROBE_DX3:
      add("dx", 1, n, k, 3, overrides)
    for op in ("fwd", "dx"):
      for overrides in ({},) + PROBE_8BIT:
        add(op, 1, n, k, 8, overrides)
    for overrides in ({},) + PROBE_NF4:  # QLoRA decode (bitsandbytes' gemv)
      add("fwd", 1, n, k, NF4_DQ, overrides)
    for overrides in ({},) + PROBE_NF4_DX:
      add("dx", 1, n, k, NF4_DQ, overrides)
    jobs += make_bf16_jobs(mid_m, n, k)
    for op, variants in (("fwd", PROBE_MID_FWD), ("dx", PROBE_MID_DX)):
      for overrides in ({},) + variants:
        add(op, mid_m, n, k, 4, overrides, config_m=MID_M)
    for overrides in ({},) + PROBE_MID_NF4_DX:
      add("dx", mid_m, n, k, NF4_DQ, overrides, config_m=MID_M)
  for n, k in shapes if PROBE_TRAIN else ():
    jobs += make_bf16_jobs(train_m, n, k)
    jobs += make_jobs(train_m, n, k, NF4_DQ, which=("deq",))
    for op in ("fwd", "dx"):
      for bits in (NF4_DQ, 4):
        for overrides in ({},) + PROBE_TRAIN:
          add(op, train_m, n, k, bits, overrides, config_m=TRAIN_M)
  _compile_all(jobs, workers, deadline)
  res = time_jobs(jobs, timer, deadline)
  rows = []
  for job in jobs:
    kind, op, m, n, k, bits, cfg = job.key
    if kind == "check":
      continue
    check = res.get(("check",) + job.key[1:])
    v = res[job.key]
    rows.append(dict(
        impl=labels.get(job.key) or _probe_label(kind, None), op=op, M=m,
        bits=bits,
        N=n, K=k, config=dataclasses.asdict(cfg) if cfg else None,
        us=v * 1e3 if isinstance(v, float) else None,
        rel_err=check if isinstance(check, float) else None,
        error=None if isinstance(v, float) else (v or job.error)))
    print("probe", rows[-1], flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
  ap.add_argument("--commit", default=os.environ.get("COMMIT", "uncommitted"))
  ap.add_argument("--peer", help="internal: run the torch peer into this file")
  ap.add_argument("--sweep", action="store_true")
  ap.add_argument("--probe", action="store_true",
                  help="only `run_probe` (decode, prefill and training "
                  "variants, a minute or two)")
  ap.add_argument("--no_peer", action="store_true")
  ap.add_argument("--ms", default=",".join(map(str, MS)))
  ap.add_argument("--bits", default=",".join(map(str, BITS)) + ",nf4")
  ap.add_argument("--budget_s", type=float, default=480)
  ap.add_argument("--workers", type=int, default=12)
  ap.add_argument("--dry_run", action="store_true",
                  help="CPU smoke test: tiny shapes, Pallas interpreter")
  args = ap.parse_args()
  if args.dry_run:
    global INTERPRET, SHAPES, L2_OVERFLOW_BYTES
    INTERPRET, SHAPES, L2_OVERFLOW_BYTES = True, [(48, 256)], 1
    args.ms, args.bits = "1,17", "4,3,nf4"
  t0 = time.time()
  deadline = t0 + args.budget_s
  ms = [int(v) for v in args.ms.split(",")]
  if args.peer:
    run_peer(args.peer, SHAPES, ms)
    return
  if args.probe:
    args.no_peer = True

  os.makedirs(args.out, exist_ok=True)
  peer_path = os.path.join(args.out, "peer_torch_kernels.json")
  try:
    if args.no_peer:
      raise RuntimeError("skipped (--no_peer)")
    subprocess.run([sys.executable, __file__, "--peer", peer_path,
                    "--ms", args.ms], check=True, timeout=200)
    with open(peer_path) as f:
      peer = json.load(f)
  except Exception as e:  # pylint: disable=broad-except
    peer = {"rows": [], "errors": [f"peer run: {e!r}"]}
  print(f"peer done at {time.time() - t0:.0f}s", flush=True)

  jax, jnp = _jax_setup()
  timer = Timer()
  gpu = jax.devices()[0].device_kind
  result = dict(gpu=gpu, jax=jax.__version__, commit=args.commit,
                date=datetime.date.today().isoformat(),
                timing=("CUPTI kernel durations summed per call, median of 7 "
                        "repeats, rotated over >=160 MiB of weights"),
                quant=dict(group_size=GROUP, zero_point=True,
                           scale_dtype="bfloat16",
                           nf4=dict(group_size=64, scale_dtype="bfloat16"),
                           nf4_dq=dict(group_size=64, scales=(
                               "8-bit, blocks of 256, float32 second level"))),
                peer={k: v for k, v in peer.items() if k != "rows"},
                rows=[])
  path = os.path.join(args.out,
                      f"kernels_{gpu_tag(gpu)}_{result['date']}.json")

  def dump():
    with open(path, "w") as f:
      json.dump(result, f, indent=1)

  if args.probe:
    result["probe"] = run_probe(timer, deadline, args.workers)
    result["timing_method"] = timer.method
    path = path.replace("kernels_", "kernels_probe_")
    dump()
    return
  result["ceilings"] = ceilings(timer)
  result["timing_method"] = timer.method
  print("ceilings", result["ceilings"], flush=True)
  dump()

  if args.sweep:
    sweep_deadline = t0 + args.budget_s * 0.55
    result["sweep"] = run_sweep(timer, sweep_deadline, args.workers)
    dump()

  bits_list = [b if b == "nf4" else int(b) for b in args.bits.split(",")]
  jobs = []
  for n, k in SHAPES:
    for m in ms:
      jobs += make_bf16_jobs(m, n, k)
      for bits in bits_list:
        if bits == "nf4" and m not in (1, 16, 4096):
          continue
        jobs += make_jobs(m, n, k, bits)
  # Acceptance shapes first, in case the time budget runs out.
  jobs.sort(key=lambda j: (j.key[5] not in (None, 4), j.key[2] in (4, 256)))
  t = time.time()
  _compile_all(jobs, args.workers, deadline - 60)
  print(f"compiled {len(jobs)} jobs in {time.time() - t:.0f}s", flush=True)
  times = time_jobs(jobs, timer, deadline - 30)
  errors = {str(k): v for k, v in times.items() if not isinstance(v, float)}
  result["errors"] = errors

  peer_rows = {(r["M"], r["N"], r["K"]): r for r in peer.get("rows", [])}
  cl = result["ceilings"]
  for n, k in SHAPES:
    for m in ms:
      pr = peer_rows.get((m, n, k), {})
      for bits in bits_list:
        if bits == "nf4" and m not in (1, 16, 4096):
          continue
        for op in ("fwd", "dx"):
          ours = times.get(("ours", op, m, n, k, bits, None))
          if not isinstance(ours, float):
            continue
          bf = times.get(("bf16", op, m, n, k, None, None))
          dq = times.get(("deq", op, m, n, k, bits, None))
          flops = 2 * m * n * k
          a_bytes = 2 * (m * k + m * n)
          q_bytes = _qbytes(n, k, bits) + a_bytes
          roof_ms = max(flops / (cl["bf16_matmul_TFLOPs"] * 1e9),
                        q_bytes / (cl["copy_GBps"] * 1e6))
          cub = pr.get(f"cublas_bf16_{op}_kernel_ms",
                       pr.get(f"cublas_bf16_{op}_graph_ms"))
          row = dict(
              op=op, M=m, N=n, K=k, bits=bits, ours_ms=ours,
              xla_bf16_ms=bf if isinstance(bf, float) else None,
              xla_dequant_ms=dq if isinstance(dq, float) else None,
              cublas_bf16_ms=cub,
              cublas_bf16_graph_ms=pr.get(f"cublas_bf16_{op}_graph_ms"),
              bnb_nf4_ms=(pr.get("bnb_nf4_fwd_kernel_ms")
                          if op == "fwd" and bits in (4, "nf4") else None),
              ours_TFLOPs=flops / ours / 1e9,
              ours_GBps=q_bytes / ours / 1e6,
              ours_pct_roofline=100 * roof_ms / ours,
              bytes_bound=q_bytes / (cl["copy_GBps"] * 1e6)
              > flops / (cl["bf16_matmul_TFLOPs"] * 1e9),
              **_row_kernel(op, m, n, k, bits))
          if isinstance(bf, float):
            row["speedup_vs_xla_bf16"] = bf / ours
          if cub:
            row["speedup_vs_cublas_bf16"] = cub / ours
          err = times.get(("check", op, m, n, k, bits, None))
          row["rel_err"] = err if isinstance(err, float) else None
          result["rows"].append(row)
  result["wall_s"] = time.time() - t0
  dump()
  print(f"wrote {path}")
  print(f"{'op':3} {'M':>5} {'N':>5} {'K':>5} {'b':>3} {'ours':>8} "
        f"{'xlabf16':>8} {'xladeq':>8} {'cublas':>8} {'xbf16':>6} "
        f"{'xcub':>6} {'%roof':>5} {'relerr':>7}")
  for r in result["rows"]:
    def f(v):
      return f"{v * 1e3:8.1f}" if isinstance(v, float) else f"{'-':>8}"
    print(f"{r['op']:3} {r['M']:5d} {r['N']:5d} {r['K']:5d} {r['bits']!s:>3} "
          f"{f(r['ours_ms'])} {f(r['xla_bf16_ms'])} {f(r['xla_dequant_ms'])} "
          f"{f(r['cublas_bf16_ms'])} "
          f"{r.get('speedup_vs_xla_bf16', 0):6.2f} "
          f"{r.get('speedup_vs_cublas_bf16', 0):6.2f} "
          f"{r['ours_pct_roofline']:5.0f} {r['rel_err'] or -1:7.1e}")
  print("times in microseconds; errors:", len(errors))


if __name__ == "__main__":
  main()
