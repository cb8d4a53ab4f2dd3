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
import functools
import os
import pathlib
import sys
import traceback

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROWS = 64          # weight rows per program: wgmma's M
TOKENS = 16        # activation rows (M = 1 padded): wgmma's N (or 8)
SHAPES = ((4096, 4096), (11008, 4096))


@dataclasses.dataclass(frozen=True)
class Config:
  block_kb: int = 64       # packed bytes per row per pipeline step
  split: int = 4           # programs sharing one row block's contraction
  stages: int = 4          # TMA steps in flight
  signed: bool = False     # codes stored as int8 (see `skeleton`)
  tokens: int = TOKENS     # padded activation rows, wgmma's N: 16 or 8


def configs() -> list[Config]:
  """The first run's grid (unsigned codes, `..._2026-11-27.json`), then its
  best corners with signed codes."""
  unsigned = [Config(kb, s, st) for kb in (64, 128) for s in (2, 4, 8)
              for st in (2, 4)]
  signed = [Config(kb, s, st, True) for kb, s, st in
            ((64, 4, 2), (64, 8, 2), (128, 4, 2), (128, 8, 2), (128, 8, 4),
             (64, 16, 2))]
  eight = [Config(kb, s, 2, True, 8) for kb, s in
           ((64, 8), (128, 4), (128, 8), (256, 4))]
  return unsigned + signed + eight


def _tiled(dtype, minor_bytes: int):
  """Tiling + swizzle transforms for a tile whose rows are `minor_bytes`."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  swizzle = max(s for s in (32, 64, 128) if minor_bytes % s == 0)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def skeleton(x: jax.Array, codes: jax.Array, cfg: Config) -> jax.Array:
  """`(T, K) bf16, (N, K/2) uint8 -> (T, N) float32`, no scales; T =
  `cfg.tokens`.

  x's columns K/2.. must come scaled by 1/16 (`prescale`). With
  `cfg.signed` the codes come as int8 (`as_signed`): Mosaic GPU converts
  signed 8-bit registers to bf16 with four instructions per pair (byte
  permute into a bf16 exponent, two masks, one paired subtraction), where
  unsigned ones go through a float conversion per element."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  n, kw = codes.shape
  kb, split, tokens = cfg.block_kb, cfg.split, cfg.tokens
  if x.shape != (tokens, 2 * kw):
    raise ValueError(f"x must be ({tokens}, {2 * kw}) for these codes and "
                     f"tokens={tokens}, got {x.shape}")
  if n % ROWS or kw % (kb * split):
    raise ValueError(f"N={n} must divide by {ROWS} and K/2={kw} by "
                     f"block_kb * split = {kb * split}")
  steps = kw // kb // split
  planes = kw // kb  # x's column blocks per plane

  def kernel(q_gmem, x_gmem, x_gmem_hi, o_gmem, out_smem):
    row_block, part = lax.axis_index("rows"), lax.axis_index("split")

    def body(_, q_smem, lo_smem, hi_smem, acc_ref):
      q = q_smem[...]
      # 8-bit registers take bitwise operations only (no shifts): the high
      # nibble stays in place, 16x its value, and x's high half arrives
      # pre-scaled by 1/16 (exact; a real kernel folds it into the plane's
      # group scale).
      lo = (q & jnp.asarray(0x0F, q.dtype)).astype(jnp.bfloat16)
      hi = (q & jnp.asarray(-16 if cfg.signed else 0xF0, q.dtype)).astype(
          jnp.bfloat16)
      plgpu.wgmma(acc_ref, lo, plgpu.transpose_ref(lo_smem, (1, 0)))
      plgpu.wgmma(acc_ref, hi, plgpu.transpose_ref(hi_smem, (1, 0)))
      plgpu.wgmma_wait(0)
      return acc_ref

    first = part * steps

    @functools.partial(pl.run_scoped,
                       acc_ref=plgpu.ACC((ROWS, tokens), jnp.float32))
    def _(acc_ref):
      plgpu.emit_pipeline(
          body, grid=(steps,),
          in_specs=[
              plgpu.BlockSpec((ROWS, kb), lambda t: (row_block, first + t),
                              transforms=_tiled(codes.dtype, kb)),
              plgpu.BlockSpec((tokens, kb), lambda t: (0, first + t),
                              transforms=_tiled(jnp.bfloat16, 2 * kb)),
              plgpu.BlockSpec((tokens, kb),
                              lambda t: (0, planes + first + t),
                              transforms=_tiled(jnp.bfloat16, 2 * kb)),
          ],
          max_concurrent_steps=cfg.stages,
          init_carry=acc_ref,
      )(q_gmem, x_gmem, x_gmem_hi)
      out_smem[...] = acc_ref[...]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(
        out_smem, o_gmem.at[part, pl.ds(row_block * ROWS, ROWS), :])
    plgpu.wait_smem_to_gmem(0)

  partials = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((split, n, tokens), jnp.float32),
      grid=(n // ROWS, split),
      grid_names=("rows", "split"),
      scratch_types=dict(out_smem=plgpu.SMEM((ROWS, tokens), jnp.float32)),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(codes, x, x)
  return partials.sum(axis=0).T


def prescale(x: jax.Array) -> jax.Array:
  """x with its high half (the high nibbles' columns) times 1/16."""
  half = x.shape[1] // 2
  return x.at[:, half:].multiply(jnp.asarray(1 / 16, x.dtype))


def as_signed(codes: jax.Array) -> jax.Array:
  """uint8 codes as int8, the high nibble's top bit flipped, so that the
  byte's high nibble masked in place reads `16 * (h - 8)` (a real kernel
  folds the -8 into the zero point; here `reference` undoes it)."""
  return jax.lax.bitcast_convert_type(codes ^ jnp.uint8(0x80), jnp.int8)


def reference(x: jax.Array, codes: jax.Array) -> jax.Array:
  """What `skeleton` computes from unscaled x: uint8 codes as planar
  nibbles; int8 codes (`as_signed`) with their high nibble minus 8."""
  lo = (codes & 15).astype(jnp.float32)
  hi = ((codes & -16).astype(jnp.float32) / 16 if codes.dtype == jnp.int8
        else (codes >> 4).astype(jnp.float32))
  w = jnp.concatenate([lo, hi], axis=1)  # (N, K): the planar layout
  return x.astype(jnp.float32) @ w.T


def _inputs(key, n, k, copies, tokens=TOKENS):
  kx, kq = jax.random.split(key)
  x = jax.random.normal(kx, (tokens, k), jnp.bfloat16)
  x = x.at[1:].set(0)  # M = 1, padded
  qs = [jax.random.randint(kk, (n, k // 2), 0, 256, jnp.int32).astype(
      jnp.uint8) for kk in jax.random.split(kq, copies)]
  return x, qs


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
  ap.add_argument("--lower_only", action="store_true",
                  help="lower every config for CUDA (no GPU needed)")
  ap.add_argument("--codes", choices=("all", "unsigned", "signed"),
                  default="all", help="which configs to run")
  ap.add_argument("--tokens", type=int, choices=(0, 8, 16), default=0,
                  help="only the configs with this many token rows (0: all)")
  args = ap.parse_args()
  chosen = [c for c in configs()
            if (args.codes == "all" or c.signed == (args.codes == "signed"))
            and args.tokens in (0, c.tokens)]
  if args.lower_only:
    n, k = SHAPES[0]
    for cfg in chosen:
      x = jax.ShapeDtypeStruct((cfg.tokens, k), jnp.bfloat16)
      q = jax.ShapeDtypeStruct((n, k // 2),
                               jnp.int8 if cfg.signed else jnp.uint8)
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
    x_scaled = prescale(x)
    signed_qs = [as_signed(q) for q in qs]
    refs = {False: reference(x, qs[0]), True: reference(x, signed_qs[0])}
    for cfg in chosen:
      row = dict(N=n, K=k, config=dataclasses.asdict(cfg))
      cq = signed_qs if cfg.signed else qs
      ref = refs[cfg.signed][:cfg.tokens]
      xt = x_scaled[:cfg.tokens]  # rows 1.. are zeros
      try:
        f = jax.jit(lambda x, qs, cfg=cfg: [skeleton(x, q, cfg) for q in qs])
        compiled = f.lower(xt, cq).compile()
        got = jax.jit(functools.partial(skeleton, cfg=cfg))(xt, cq[0])
        row["rel_err"] = float(jnp.linalg.norm(got - ref)
                               / jnp.linalg.norm(ref))
        row["us"] = timer(compiled, (xt, cq), len(cq)) * 1e3
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        row["traceback"] = traceback.format_exc()[-2500:]
      rows.append(row)
      print(row, flush=True)
  bench_kernels.write_rows(args.out, "mosaic_decode", timer, rows,
                           __doc__.splitlines()[0])


if __name__ == "__main__":
  main()
