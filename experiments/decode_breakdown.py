r"""Per-kernel time of the decode kernels: where the microseconds go.

  COMMIT=<hash> python3 experiments/decode_breakdown.py --out $OUT  # H100

bench_kernels.py reports each call's kernel times summed. At M = 1 a call
is the fused kernel plus, when its contraction is split (`split_k > 1`),
XLA's reduction of the float32 partials; this script times every kernel of
the call separately (CUPTI through jax's Mosaic GPU profiler,
`aggregate=False`), for the table's configs and for the same kernels
unsplit, beside XLA's bf16 matmul and a Pallas kernel that only copies the
activation row (the floor of one launch reading and writing a few KiB).
Weights rotate over >= 160 MiB as in bench_kernels, so L2 holds none.
Writes $OUT/decode_breakdown_<gpu>_<date>.json: per row, each kernel name
with its median microseconds per call.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import bench_kernels  # pylint: disable=g-import-not-at-top
from pallas_kernels import qmatmul as kq  # pylint: disable=g-import-not-at-top
from pallas_kernels import tuning  # pylint: disable=g-import-not-at-top

SHAPES = ((4096, 4096), (11008, 4096))
BITS = (4, 2, "nf4")


def per_kernel_us(fn, args, calls: int, iters: int = 7) -> dict[str, float]:
  """Median over `iters` of each kernel name's summed time, per call.

  `fn`: a function of `args` (compiled here) or an already compiled one."""
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
  compiled = (fn if isinstance(fn, jax.stages.Compiled)
              else jax.jit(fn).lower(*args).compile())
  _, timings = profiler.measure(compiled, aggregate=False,
                                iterations=iters)(*args)
  per_name = collections.defaultdict(list)
  for one_iter in timings:
    sums = collections.Counter()
    for name, ms in one_iter:
      sums[name] += ms
    for name, ms in sums.items():
      per_name[name].append(ms)
  return {name: statistics.median(v) * 1e3 / calls
          for name, v in per_name.items()}


def _copy_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...]


def launch_floor(k: int, r: int) -> dict[str, float]:
  """A Pallas launch that copies a `(1, k)` bf16 row."""
  xs = [jax.random.normal(jax.random.PRNGKey(i), (1, k), jnp.bfloat16)
        for i in range(r)]
  copy = pl.pallas_call(_copy_kernel,
                        out_shape=jax.ShapeDtypeStruct((1, k), jnp.bfloat16))
  return per_kernel_us(lambda xs: [copy(x) for x in xs], (xs,), r)


def rows_for(n: int, k: int, bits) -> list[dict]:
  w_bytes = bench_kernels._qbytes(n, k, bits)  # pylint: disable=protected-access
  r = bench_kernels._copies(w_bytes)  # pylint: disable=protected-access
  ws = bench_kernels._weight_sets(1, n, k, bits, r, False)  # pylint: disable=protected-access
  layout_bits = 4 if bits == "nf4" else bits
  out = []
  for op in ("fwd", "dx"):
    a = jax.random.normal(jax.random.PRNGKey(2), (1, k if op == "fwd" else n),
                          jnp.bfloat16)
    table = tuning.choose(op, 1, n, k, layout_bits, codebook=bits == "nf4",
                          dtype=jnp.bfloat16)
    f = kq.fwd if op == "fwd" else kq.dx
    for label, cfg in (("table", table),
                       ("unsplit", dataclasses.replace(table, split_k=1))):
      times = per_kernel_us(
          lambda a, ws, cfg=cfg, f=f: [f(a, w, tuning=cfg) for w in ws],
          (a, ws), r)
      out.append(dict(op=op, N=n, K=k, bits=bits, impl=label,
                      config=dataclasses.asdict(cfg), kernels_us=times,
                      total_us=sum(times.values())))
      print(out[-1]["op"], n, k, bits, label, f"{out[-1]['total_us']:.1f}",
            {kk: round(v, 2) for kk, v in times.items()}, flush=True)
  return out


def bf16_rows(n: int, k: int) -> list[dict]:
  """XLA's bf16 product at M = 1, fwd and dx, weights rotated likewise."""
  wb = [jax.random.normal(jax.random.PRNGKey(i), (n, k), jnp.bfloat16)
        for i in range(bench_kernels._copies(2 * n * k))]  # pylint: disable=protected-access
  out = []
  for op in ("fwd", "dx"):
    a = jax.random.normal(jax.random.PRNGKey(2), (1, k if op == "fwd" else n),
                          jnp.bfloat16)
    mm = ((lambda a, ws: [a @ w.T for w in ws]) if op == "fwd"
          else (lambda a, ws: [a @ w for w in ws]))
    times = per_kernel_us(mm, (a, wb), len(wb))
    out.append(dict(op=op, N=n, K=k, bits=None, impl="xla_bf16", config=None,
                    kernels_us=times, total_us=sum(times.values())))
    print(op, n, k, "xla_bf16", {kk: round(v, 2) for kk, v in times.items()},
          flush=True)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
  args = ap.parse_args()
  rows = []
  for n, k in SHAPES:
    rows += bf16_rows(n, k)
    for bits in BITS:
      rows += rows_for(n, k, bits)
  floor = launch_floor(4096, 64)
  print("launch floor", floor, flush=True)
  gpu = jax.devices()[0].device_kind
  date = datetime.date.today().isoformat()
  path = pathlib.Path(args.out) / (
      f"decode_breakdown_{gpu.split()[1].lower() if ' ' in gpu else gpu}_"
      f"{date}.json")
  path.write_text(json.dumps(dict(
      gpu=gpu, jax=jax.__version__, commit=os.environ.get("COMMIT", "unknown"),
      date=date, timing="CUPTI per kernel, median of 7, per call",
      launch_floor_us=floor, rows=rows), indent=1))
  print("wrote", path)


if __name__ == "__main__":
  main()
