r"""Upper bound of a Mosaic GPU 4-bit decode kernel, before writing one.

  COMMIT=<hash> python3 experiments/mosaic_decode_probe.py --out $OUT  # H100
  python3 experiments/mosaic_decode_probe.py --lower_only   # CPU: lowering

WORKSPACE.md section 4 ("Next steps", item 2) names a Mosaic GPU decode
kernel as the way past the Triton kernel's floor: TMA streams the packed
weight tiles through shared memory (one instruction per tile, several
stages in flight), the codes become bf16 in registers and feed `wgmma` as
its A operand, `y^T (N, Mp) = deq(W) (N, K) @ x^T (K, Mp)`, so the token
dimension is wgmma's N (16 rows here) and no activation fragment is placed
per weight. This script times that kernel's skeleton on the planar 4-bit
codes of `qft_jax` (byte j of a row holds column j in its low nibble and
column K/2 + j in its high nibble) without group scales or zero points:
`y^T = codes_lo @ x[:, :K/2]^T + codes_hi @ x[:, K/2:]^T`. A scaled kernel
can only be slower, so if the skeleton is not clearly faster than the
Triton kernel's fused time (7.1 us at 4096^2, M = 1, session 9's
breakdown) the route is closed at this shape.

Grid: (N / 64 row blocks) x (split of the contraction); each program is one
warpgroup with a `max_concurrent_steps`-deep TMA pipeline over its share of
the byte tiles, and writes float32 partials `(split, N, Mp)`; the timed call
includes XLA's sum of them, as bench_kernels does. Writes
$OUT/mosaic_decode_<gpu>_<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROWS = 64          # weight rows per program: wgmma's M
TOKENS = 16        # activation rows (M = 1 padded): wgmma's N
SHAPES = ((4096, 4096), (11008, 4096))


@dataclasses.dataclass(frozen=True)
class Config:
  block_kb: int = 64       # packed bytes per row per pipeline step
  split: int = 4           # programs sharing one row block's contraction
  stages: int = 4          # TMA steps in flight


def configs() -> list[Config]:
  return [Config(kb, s, st) for kb in (64, 128) for s in (2, 4, 8)
          for st in (2, 4)]


def _tiled(dtype, minor_bytes: int):
  """Tiling + swizzle transforms for a tile whose rows are `minor_bytes`."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  swizzle = max(s for s in (32, 64, 128) if minor_bytes % s == 0)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def skeleton(x: jax.Array, codes: jax.Array, cfg: Config) -> jax.Array:
  """`(TOKENS, K) bf16, (N, K/2) uint8 -> (TOKENS, N) float32`, no scales.

  x's columns K/2.. must come scaled by 1/16 (`prescale`)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  n, kw = codes.shape
  kb, split = cfg.block_kb, cfg.split
  if n % ROWS or kw % (kb * split):
    raise ValueError(f"N={n} must divide by {ROWS} and K/2={kw} by "
                     f"block_kb * split = {kb * split}")
  steps = kw // kb // split
  planes = kw // kb  # x's column blocks per plane

  def kernel(q_gmem, x_gmem, x_gmem_hi, o_ref, acc_ref):
    row_block, part = pl.program_id(0), pl.program_id(1)

    def body(_, q_smem, lo_smem, hi_smem):
      q = q_smem[...]
      # 8-bit registers take bitwise operations only (no shifts): the high
      # nibble stays in place, 16x its value, and x's high half arrives
      # pre-scaled by 1/16 (exact; a real kernel folds it into the plane's
      # group scale).
      lo = (q & jnp.uint8(0x0F)).astype(jnp.bfloat16)
      hi = (q & jnp.uint8(0xF0)).astype(jnp.bfloat16)
      plgpu.wgmma(acc_ref, lo, plgpu.transpose_ref(lo_smem, (1, 0)))
      plgpu.wgmma(acc_ref, hi, plgpu.transpose_ref(hi_smem, (1, 0)))
      plgpu.wgmma_wait(0)

    first = part * steps
    plgpu.emit_pipeline(
        body, grid=(steps,),
        in_specs=[
            plgpu.BlockSpec((ROWS, kb), lambda t: (row_block, first + t),
                            transforms=_tiled(jnp.uint8, kb)),
            plgpu.BlockSpec((TOKENS, kb), lambda t: (0, first + t),
                            transforms=_tiled(jnp.bfloat16, 2 * kb)),
            plgpu.BlockSpec((TOKENS, kb), lambda t: (0, planes + first + t),
                            transforms=_tiled(jnp.bfloat16, 2 * kb)),
        ],
        max_concurrent_steps=cfg.stages,
    )(q_gmem, x_gmem, x_gmem_hi)
    o_ref[...] = acc_ref[...]

  partials = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((split, n, TOKENS), jnp.float32),
      grid=(n // ROWS, split),
      in_specs=[pl.BlockSpec(memory_space=plgpu.GMEM)] * 3,
      out_specs=pl.BlockSpec((None, ROWS, TOKENS),
                             lambda i, s: (s, i, 0)),
      scratch_shapes=[plgpu.ACC((ROWS, TOKENS), jnp.float32)],
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      name="mosaic_decode_skeleton",
  )(codes, x, x)
  return partials.sum(axis=0).T


def prescale(x: jax.Array) -> jax.Array:
  """x with its high half (the high nibbles' columns) times 1/16."""
  half = x.shape[1] // 2
  return x.at[:, half:].multiply(jnp.asarray(1 / 16, x.dtype))


def reference(x: jax.Array, codes: jax.Array) -> jax.Array:
  lo = (codes & 15).astype(jnp.float32)
  hi = (codes >> 4).astype(jnp.float32)
  w = jnp.concatenate([lo, hi], axis=1)  # (N, K): the planar layout
  return x.astype(jnp.float32) @ w.T


def _inputs(key, n, k, copies):
  kx, kq = jax.random.split(key)
  x = jax.random.normal(kx, (TOKENS, k), jnp.bfloat16)
  x = x.at[1:].set(0)  # M = 1, padded
  qs = [jax.random.randint(kk, (n, k // 2), 0, 256, jnp.int32).astype(
      jnp.uint8) for kk in jax.random.split(kq, copies)]
  return x, qs


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
  ap.add_argument("--lower_only", action="store_true",
                  help="lower every config for CUDA (no GPU needed)")
  args = ap.parse_args()
  if args.lower_only:
    n, k = SHAPES[0]
    x = jax.ShapeDtypeStruct((TOKENS, k), jnp.bfloat16)
    q = jax.ShapeDtypeStruct((n, k // 2), jnp.uint8)
    for cfg in configs():
      f = jax.jit(functools.partial(skeleton, cfg=cfg))
      f.trace(x, q).lower(lowering_platforms=("cuda",))
      print("lowered", cfg, flush=True)
    return
  from experiments import bench_kernels  # pylint: disable=g-import-not-at-top
  timer = bench_kernels.Timer()
  rows = []
  for n, k in SHAPES:
    copies = bench_kernels._copies(n * k // 2)  # pylint: disable=protected-access
    x, qs = _inputs(jax.random.PRNGKey(n), n, k, copies)
    ref = reference(x, qs[0])
    x = prescale(x)
    for cfg in configs():
      row = dict(N=n, K=k, config=dataclasses.asdict(cfg))
      try:
        f = jax.jit(lambda x, qs, cfg=cfg: [skeleton(x, q, cfg) for q in qs])
        compiled = f.lower(x, qs).compile()
        got = jax.jit(functools.partial(skeleton, cfg=cfg))(x, qs[0])
        row["rel_err"] = float(jnp.linalg.norm(got - ref)
                               / jnp.linalg.norm(ref))
        row["us"] = timer(compiled, (x, qs), len(qs)) * 1e3
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
      rows.append(row)
      print(row, flush=True)
  gpu = jax.devices()[0].device_kind
  date = datetime.date.today().isoformat()
  path = pathlib.Path(args.out) / f"mosaic_decode_h100_{date}.json"
  path.write_text(json.dumps(dict(
      gpu=gpu, jax=jax.__version__, commit=os.environ.get("COMMIT", "unknown"),
      date=date, timing=timer.method, what=__doc__.splitlines()[0],
      rows=rows), indent=1))
  print("wrote", path, time.strftime("%X"))


if __name__ == "__main__":
  main()
