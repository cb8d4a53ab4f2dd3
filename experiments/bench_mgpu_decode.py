r"""Times the Mosaic GPU 4-bit decode probe (pallas_kernels/qmatmul_mgpu_decode.py)
against XLA's bf16 matmul and the Triton kernel qdot uses at decode.

  COMMIT=<hash> python3 experiments/bench_mgpu_decode.py --out $OUT
  python3 experiments/bench_mgpu_decode.py --lower_only   # CPU: lowering

For M in (1, 16) and issue 5's three (N, K): XLA bf16 `x @ W^T`, the
Triton table kernel (`qmatmul.fwd`, what bench_kernels reports as `ours`),
and each `CONFIGS` entry of the probe twice: the whole call (x padded,
group parameters prepared and partials summed by XLA) and the kernel
alone. CUPTI kernel time per call, median of 7, rotated over at least 160
MiB of weights (bench_kernels' rule); relative error of the whole call
against the float32 reference on fresh random data. Writes
$OUT/mgpu_decode_<gpu>_<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pallas_kernels import qmatmul_mgpu as mg  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import qmatmul_mgpu_decode as dec  # pylint: disable=g-import-not-at-top,wrong-import-position

MS = (1, 16)
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
GROUP = 128
# Tiles: N / 128 row blocks x split. 4096 rows: split 4 -> 128 tiles (one
# per SM); 11008: 86 x split. Steps per tile: K/2 / split / block_kb.
CONFIGS = (
    dec.DecodeConfig(tokens=16, split=4, block_kb=64, stages=4),
    dec.DecodeConfig(tokens=16, split=4, block_kb=64, stages=8),
    dec.DecodeConfig(tokens=16, split=4, block_kb=128, stages=4),
    dec.DecodeConfig(tokens=16, split=2, block_kb=128, stages=4),
    dec.DecodeConfig(tokens=16, split=8, block_kb=64, stages=4),
    dec.DecodeConfig(tokens=8, split=4, block_kb=64, stages=4),
    dec.DecodeConfig(tokens=8, split=4, block_kb=64, stages=4, pad=False),
    dec.DecodeConfig(tokens=16, split=4, block_kb=64, stages=4, pad=False),
)


def _fits(m, n, k, cfg) -> bool:
  try:
    dec.check_shapes(m, n, k, GROUP, cfg)
  except ValueError:
    return False
  return True


def lower_all() -> None:
  for n, k in SHAPES:
    for m in MS:
      for cfg in CONFIGS:
        if not _fits(m, n, k, cfg):
          print("skipped (shape rules)", m, n, k, cfg, flush=True)
          continue
        jax.jit(functools.partial(dec.decode_fwd, group_size=GROUP,
                                  cfg=cfg)).trace(
            jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
            jax.ShapeDtypeStruct((n, k // GROUP), jnp.bfloat16),
            jax.ShapeDtypeStruct((n, k // GROUP), jnp.uint8),
        ).lower(lowering_platforms=("cuda",))
        print("lowered", m, n, k, cfg, flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
  ap.add_argument("--lower_only", action="store_true")
  args = ap.parse_args()
  if args.lower_only:
    lower_all()
    return
  from experiments import bench_kernels as bk  # pylint: disable=g-import-not-at-top
  from pallas_kernels import qmatmul as kq  # pylint: disable=g-import-not-at-top
  timer = bk.Timer()
  num_sms = jax.devices()[0].core_count
  rows = []
  timed = bk.row_timer(timer, rows)

  for n, k in SHAPES:
    copies = bk._copies(n * k // 2)  # pylint: disable=protected-access
    keys = jax.random.split(jax.random.PRNGKey(n + k), copies)
    ws = [bk._random_weight(kk, n, k, 4) for kk in keys]  # pylint: disable=protected-access
    dense = [jax.random.normal(kk, (n, k), jnp.bfloat16) * 0.02
             for kk in keys[:max(2, copies // 4)]]
    fresh = bk._random_weight(jax.random.PRNGKey(int(time.time())), n, k, 4)  # pylint: disable=protected-access
    for m in MS:
      shape = dict(op="fwd", M=m, N=n, K=k)
      xs = [jax.random.normal(kk, (m, k), jnp.bfloat16)
            for kk in jax.random.split(jax.random.PRNGKey(m), copies)]
      bf16 = timed("xla_bf16", lambda x, w: jnp.dot(
          x, w.T, preferred_element_type=jnp.float32).astype(x.dtype),
                   list(zip(xs, dense)), **shape)
      timed("triton_table", kq.fwd, list(zip(xs, ws)), **shape)
      x0 = jax.random.normal(jax.random.PRNGKey(int(time.time()) + m),
                             (m, k), jnp.bfloat16)
      ref = kq.reference(x0, fresh)
      for cfg in CONFIGS:
        if not _fits(m, n, k, cfg):
          continue
        extra = dict(shape, config=dataclasses.asdict(cfg))
        call = functools.partial(dec.decode_fwd, group_size=GROUP, cfg=cfg,
                                 num_sms=num_sms)
        row = timed("mgpu_decode",
                    lambda x, w, call=call: call(x, w.qvalue, w.scale,
                                                 w.zero_point),
                    list(zip(xs, ws)), **extra)
        if "us" not in row:
          continue
        got = jax.jit(call)(x0, fresh.qvalue, fresh.scale,
                            fresh.zero_point).astype(jnp.float32)
        err = jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)
        row["rel_err"] = float(jnp.where(jnp.isfinite(err), err, jnp.inf))
        row["vs_bf16"] = bf16.get("us", float("nan")) / row["us"]
        print("  rel_err", row["rel_err"], "vs bf16", row["vs_bf16"],
              flush=True)
        prepped = [(jnp.pad(x, ((0, cfg.tokens - m), (0, 0))) if cfg.pad
                    else x, w.qvalue, mg.group_params(w.scale, w.zero_point))
                   for x, w in zip(xs, ws)]
        timed("mgpu_decode_kernel_only", functools.partial(
            dec.fused_partials, group_size=GROUP, cfg=cfg, num_sms=num_sms),
              prepped, **extra)
  bk.write_rows(args.out, "mgpu_decode", timer, rows,
                __doc__.splitlines()[0])


if __name__ == "__main__":
  main()
