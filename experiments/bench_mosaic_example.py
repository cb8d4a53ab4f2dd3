r"""Times jax's own Mosaic GPU mixed-type matmul at the training shapes.

  COMMIT=<hash> python3 experiments/bench_mosaic_example.py --out $OUT  # H100

Measures the Mosaic GPU route before building on it (WORKSPACE.md section 4,
"Why Triton, not Mosaic GPU"): jax ships
`jax.experimental.pallas.ops.gpu.hopper_mixed_type_matmul_mgpu`, a Hopper
kernel computing `a.astype(bf16) @ b` for int8 `a` (held in registers as
wgmma's A operand, converted there) and bf16 `b` (shared memory, TMA,
warp-specialized pipeline). Our training forward `y = x @ deq(W)^T` has that
form transposed, `y^T (N, M) = deq(W) (N, K) @ x^T (K, M)`, so the kernel's
time on `a = W codes (N, K) int8`, `b = x^T (K, M)` is the price of the
matrix-unit work of an int8-weight fused kernel with no scales and no
unpacking: an upper bound for what a Mosaic GPU 8-bit (QFT's weights) or
planar 4-bit kernel could reach, to set beside our Triton kernels (0.63x
fwd at M = 4096 4-bit) and XLA.

For M = 4096 tokens and (N, K) in bench_kernels.SHAPES, each config of a
small grid (`configs`, drawn from the example's own tuning space) and, in
the same run, XLA's bf16 matmul `W_bf16 @ x^T` and XLA's int8-to-bf16
convert-then-matmul. CUPTI kernel times (bench_kernels.Timer), median of 7;
inputs random (int8 uniform over [-128, 127], bf16 normal). Every kernel row
carries its max abs error against XLA's float32-accumulated product.
Writes $OUT/mosaic_example_<gpu>_<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import bench_kernels  # pylint: disable=g-import-not-at-top

M_TOKENS = 4096


def _example():
  from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu  # pylint: disable=g-import-not-at-top
  return hopper_mixed_type_matmul_mgpu


def configs(n: int, m: int) -> list:
  """Example TuningConfigs whose tiles divide `y^T`'s `(n, m)`.

  tile_m over N (the weight rows, A operand) 128 or 256 with the two
  warpgroups split along N or M, tile_n over M 128, tile_k 64 or 128, four
  pipeline stages, 64 x 64 epilogue tiles, snake order over either grid
  dimension with width 8.
  """
  ex = _example()
  known = {f.name for f in dataclasses.fields(ex.TuningConfig)}
  out = []
  for tile_m, tile_k, wg, minor in itertools.product(
      (128, 256), (64, 128), ex.MatmulDimension, ex.MatmulDimension):
    fields = dict(
        tile_m=tile_m, tile_n=128, tile_k=tile_k, max_concurrent_steps=4,
        epi_tile_n=64, epi_tile_m=64, grid_minor_dim=minor,
        grid_tile_width=8, wg_dimension=wg)
    # Fields a later jax drops are left out rather than failing the run.
    cfg = ex.TuningConfig(**{k: v for k, v in fields.items() if k in known})
    cta_m = tile_m * (2 if wg == ex.MatmulDimension.M else 1)
    cta_n = 128 * (2 if wg == ex.MatmulDimension.N else 1)
    if n % cta_m == 0 and m % cta_n == 0:
      out.append(cfg)
  return out


def _inputs(n, k, m):
  ka, kb = jax.random.split(jax.random.PRNGKey(n + k))
  a = jax.random.randint(ka, (n, k), -128, 128, jnp.int8)
  b = jax.random.normal(kb, (k, m), jnp.bfloat16)
  return a, b


def run(timer, deadline: float) -> list[dict]:
  """All rows: per shape, XLA bf16, XLA convert-then-matmul, each config."""
  ex = _example()
  rows = []
  for n, k in bench_kernels.SHAPES:
    a, b = _inputs(n, k, M_TOKENS)
    flops = 2 * n * k * M_TOKENS
    want = jnp.dot(a.astype(jnp.bfloat16), b,
                   preferred_element_type=jnp.float32)
    a16 = a.astype(jnp.bfloat16)
    xla = {
        "xla_bf16": (lambda p, q: jnp.dot(
            p, q, preferred_element_type=jnp.float32).astype(jnp.bfloat16),
                     (a16, b)),
        "xla_int8_convert": (lambda p, q: jnp.dot(
            p.astype(jnp.bfloat16), q,
            preferred_element_type=jnp.float32).astype(jnp.bfloat16),
                             (a, b)),
    }
    base = {}
    for impl, (fn, args) in xla.items():
      ms = timer(jax.jit(fn).lower(*args).compile(), args, 1)
      base[impl] = ms
      rows.append(dict(impl=impl, N=n, K=k, M=M_TOKENS, us=ms * 1e3,
                       TFLOPs=flops / ms / 1e9, config=None, error=None))
      print(rows[-1], flush=True)
    for cfg in configs(n, M_TOKENS):
      row = dict(impl="mosaic_example_int8", N=n, K=k, M=M_TOKENS,
                 config={f.name: str(getattr(cfg, f.name))
                         for f in dataclasses.fields(cfg)})
      if time.time() > deadline:
        rows.append(dict(row, error="skipped: time budget"))
        continue
      try:
        f = jax.jit(lambda p, q, cfg=cfg: ex.mixed_matmul_kernel(
            p, q, out_dtype=jnp.bfloat16, config=cfg))
        compiled = f.lower(a, b).compile()
        out = compiled(a, b).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(out - want)) / jnp.max(jnp.abs(want)))
        ms = timer(compiled, (a, b), 1)
        row.update(us=ms * 1e3, TFLOPs=flops / ms / 1e9,
                   x_xla_bf16=base["xla_bf16"] / ms, rel_max_err=err,
                   error=None)
      except Exception as e:  # pylint: disable=broad-except
        row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
      rows.append(row)
      print(row, flush=True)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
  ap.add_argument("--commit", default=os.environ.get("COMMIT", "uncommitted"))
  ap.add_argument("--budget_s", type=float, default=300)
  args = ap.parse_args(argv)
  gpu = jax.devices()[0].device_kind
  if jax.devices()[0].platform != "gpu":
    raise SystemExit(f"needs a Hopper GPU (Mosaic GPU), found {gpu}")
  timer = bench_kernels.Timer()
  rows = run(timer, time.time() + args.budget_s)
  date = datetime.date.today().isoformat()
  tag = next((t.lower() for t in ("H100", "H200") if t in gpu), "gpu")
  path = pathlib.Path(args.out) / f"mosaic_example_{tag}_{date}.json"
  path.write_text(json.dumps(dict(
      what=("jax's hopper_mixed_type_matmul_mgpu (int8 x bf16) at the "
            "training shapes, y^T = W @ x^T, beside XLA"),
      gpu=gpu, jax=jax.__version__, commit=args.commit, date=date,
      timing_method=timer.method, rows=rows), indent=1) + "\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
