r"""Times the Mosaic GPU 4-bit kernels (pallas_kernels/qmatmul_mgpu.py,
forward; qmatmul_mgpu_dx.py, input gradient) at training shapes against
XLA's bf16 matmul.

  COMMIT=<hash> python3 experiments/bench_mgpu_train.py --op both --out $OUT
  COMMIT=<hash> python3 experiments/bench_mgpu_train.py --op dx --ablate --out $OUT
  python3 experiments/bench_mgpu_train.py --lower_only   # CPU: lowering

For M = 4096 and (N, K) in issue 5's three shapes: XLA bf16 `x @ W^T`
(`dy @ W` for dx), with `--triton` the Triton fused kernel (the table's
config), and each `CONFIGS` (`DX_CONFIGS`) entry of the Mosaic kernel,
twice: the whole call (group parameters prepared by XLA) and the kernel
alone (`--ablate`: also the input gradient's kernel under each
`experiments/dx_ablations.py` ablation). CUPTI kernel time per call, median of 7,
over rotated weight copies; relative error against the float32 reference
on fresh random data. Writes $OUT/mgpu_train_<gpu>_<date>.json.
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
from pallas_kernels import qmatmul_mgpu_dx as mdx  # pylint: disable=g-import-not-at-top,wrong-import-position

M = 4096
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
GROUP = 128
# Run 1 (mgpu_train_h100_2026-11-28.log, y^T transposed by XLA): 128 x 128
# warpgroup tiles 236.8-243.1 us kernel-only at 4096^2 (grid_tile_width
# 4-16), block_kb 32 270.9; 64 x 256 tiles 192.7 (block_kb 64, 2 stages),
# 198.9 (block_kb 32, 4 stages); XLA bf16 184.5. Run 2
# (mgpu_train_h100_2026-11-28.json, y stored through a transposed view):
# 64 x 256 tiles, block_kb 64, 2 stages, grid_tile_width 4 best at every
# shape (kernel-only 192.4 / 528.8 / 496.9 us against XLA bf16 184.1 /
# 544.6 / 482.6); the whole call then still bitcast the codes to int8 in
# XLA (a copy of the weight), now done in registers.
# Session 11: the group parameters as (G, 2, N) (one XLA transpose; the
# high plane's derived in registers) and the tiles' pipelines chained.
CONFIGS = (
    mg.MgpuConfig(),
    mg.MgpuConfig(grid_tile_width=8),
    mg.MgpuConfig(block_kb=32, stages=4),
)
# dx run 1 (mgpu_train_dx_h100_2026-11-28.json): 128-token tiles 298.5 /
# 742.0 / 866.5 us with block_n 64 (282.1 / 739.2 / 908.1 with 128, two
# stages) against XLA bf16 183.7 / 486.2 / 553.1 and the Triton table
# 405.3 / 1087.6 / 1299.8; 64-token tiles about 2x slower. 256-token tiles
# over 32 byte columns (half the dequantization per MMA) do not lower as
# written: the epilogue's 32-column slices of the accumulator cut its
# 64-column tiles. Session 11 (H100, XLA bf16 181.6 / 478.2 / 549.7 us):
# two warpgroups sharing each dequantized tile (one plane each, 2 x 128
# tokens per CTA) in lockstep behind a per-step barrier were slower,
# 307.3 / 812.5 / 851.6 (mgpu_train_dx_h100_2026-11-28_s11a.log); the same
# dequantizing one step ahead of the MMAs, 249.9 / 642.8 / 679.6 with two
# buffers and 4 stages, 255.0 / 662.7 / 706.6 with three and 3
# (mgpu_train_dx_h100_2026-11-28_s11.json); dx^T = deq(W)^T dy^T with the
# weight read transposed as the register operand (the forward's design),
# 286.8 / 752.6 / 747.0 (..._s11_transposed.json, commit 58ce326).
# Session 12 (H200 ncu profile of DxConfig() at 4096^2: the compute
# warpgroups spent ~57 % of their samples dequantizing, about eight
# instructions per pair of codes; the tensor core ~57 % busy). First probe
# (H100, mgpu_train_dx_h100_2026-11-28_s12a.json, commit c3309fd; XLA bf16
# 185.4 / 485.1 / 554.3 us): three buffers keeping each wgmma in flight
# into the next step (4 stages) 247.8 / 632.8 / 673.8 against the default's
# 250.4 / 653.1 / 691.1; with 3 stages 255.9 / 653.4 / 707.2; wgmma N = 256
# over 64-token warpgroup tiles (twice the dequantization per MMA) 303.9 /
# 792.5 / 826.8, in flight 336.4 / 862.5 / 851.7. Now the codes are
# converted by bit operations (`qmatmul_mgpu.biased_codes_ptx`): 246.5 /
# 632.2 / 648.4 (mgpu_train_both_h100_2026-11-28_s12b.json, commit dfeef38),
# in flight 253.2 / 652.8 / 663.1. Its profile (H100, commit 93a13a2) has
# the dequantization waiting on its 20 16-bit shared loads per warp and
# step. Session 13 (H200, XLA bf16 about 185 / 480 / 518 us): that design
# (tiles stored as wgmma's B operand) 245-246 / 630-637 / 656-658, its code
# tile carried in registers a step early slower still, 257.0 / 659.7 /
# 688.8 (mgpu_train_dx_h200_2026-11-28_s13a.json, commit e31db35). Replaced
# by the transposed design with the accumulator's rows permuted (no
# exchange between threads; qmatmul_mgpu_dx's docstring): 284.1 / 720.8 /
# 714.2 with the group parameters loaded as Mosaic column vectors (_s13b,
# ce78d61), 206.4 / 523.8 / 552.2 with them prepared as one 8-byte load
# per column pair (_s13c, b919192; unswizzled code tiles 213.4 / 543.9 /
# 567.7, 128-row steps 221.1 / 543.8 / 581.5), 199.2 / 513.1 / 543.5 with
# that preparation one transpose (_s13d, 30ca035; grid_tile_width 2 / 8,
# 3 stages within 1 %). Each wgmma kept in flight into the next step
# (delay_release=1, unchained tiles) gave NaNs (_s13d, _s13 at 29a5061):
# not kept. The default at 29a5061: 199.7 / 516.1 / 543.2 against XLA
# bf16 183.8 / 478.0 / 519.2, 0.92 / 0.93 / 0.96x (_s13).
# Session 14 (H200): the in-flight variant retiring each tile's last wgmma
# at once still gave NaNs (196.0 / 494.3 / 526.8 against the default's
# 198.1 / 510.3 / 542.4, _s14a.json, 34fd239): removed. Splitting each step
# into wgmma groups over separately TMA'd dy chunks, each chunk's weights
# dequantized under the previous chunk's MMA (correct, no NaN), was slower:
# 2 x 32 rows 211.5 / 536.7 / 567.4, 4 x 16 287.0 / 720.4 / 739.7, 128-row
# steps in 2 x 64 218.6 / 546.4 / 584.5, 4 x 32 230.8 / 578.6 / 610.4,
# against 199.3 / 516.1 / 543.4; the forward's plane 1 dequantized under
# plane 0's MMA tied (178.6 / 483.5 vs 178.1 / 484.2;
# mgpu_train_both_h200_2026-11-28_s14.log, commit 83ed0e7): removed.
DX_CONFIGS = (mdx.DxConfig(),)


COPIES = 4  # weight + activation sets rotated (>= 160 MiB at every shape)


def _leaves(w):
  """A random 4-bit QArray's (qvalue, dense scale, zero point)."""
  return w.qvalue, w.scale, w.zero_point


def lower_all() -> None:
  n, k = SHAPES[0]
  x = jax.ShapeDtypeStruct((M, k), jnp.bfloat16)
  q = jax.ShapeDtypeStruct((n, k // 2), jnp.uint8)
  s = jax.ShapeDtypeStruct((n, k // GROUP), jnp.bfloat16)
  z = jax.ShapeDtypeStruct((n, k // GROUP), jnp.uint8)
  for cfg in DX_CONFIGS:
    f = jax.jit(functools.partial(mdx.fused_dx, group_size=GROUP, cfg=cfg))
    f.trace(jax.ShapeDtypeStruct((M, n), jnp.bfloat16), q,
            jax.eval_shape(mdx.transposed_params, s, z)
            ).lower(lowering_platforms=("cuda",))
    print("lowered", cfg, flush=True)
  from experiments import dx_ablations  # pylint: disable=g-import-not-at-top
  for name, patch in dx_ablations.ABLATIONS.items():
    with patch():
      jax.jit(functools.partial(mdx.fused_dx, group_size=GROUP)).trace(
          jax.ShapeDtypeStruct((M, n), jnp.bfloat16), q,
          jax.eval_shape(mdx.transposed_params, s, z)
      ).lower(lowering_platforms=("cuda",))
    print("lowered ablation", name, flush=True)
  for cfg in CONFIGS:
    f = jax.jit(functools.partial(mg.qmatmul_fwd, group_size=GROUP, cfg=cfg))
    f.trace(x, q, s, z).lower(lowering_platforms=("cuda",))
    print("lowered", cfg, flush=True)


def run_dx(timed, shape, xs, ws, n, k, flops, with_triton, ablate=False):
  """dx rows: XLA bf16 `dy @ W`, the Triton table (`with_triton`), each
  DX_CONFIGS entry, whole call and kernel alone, and with `ablate` the
  default config's kernel under each `dx_ablations.ABLATIONS` entry (rows
  `mgpu_dx_ablate_<name>`, timing only: their outputs are wrong)."""
  from pallas_kernels import qmatmul as kq  # pylint: disable=g-import-not-at-top
  num_sms = jax.devices()[0].core_count
  dys = [x[:, :n] if n <= k else jnp.tile(x, (1, -(-n // k)))[:, :n]
         for x in xs]
  bf16 = timed("xla_bf16", lambda dy, w: jnp.dot(
      dy, w, preferred_element_type=jnp.float32).astype(dy.dtype),
               [(dy, jax.random.normal(jax.random.PRNGKey(i), (n, k),
                                       jnp.bfloat16) * 0.02)
                for i, dy in enumerate(dys)], **shape)
  if with_triton:
    timed("triton_table", lambda dy, w: kq.dx(dy, w), list(zip(dys, ws)),
          **shape)
  from experiments import bench_kernels as bk  # pylint: disable=g-import-not-at-top
  fresh = bk._random_weight(jax.random.PRNGKey(int(time.time())), n, k, 4)  # pylint: disable=protected-access
  dy0 = jax.random.normal(jax.random.PRNGKey(int(time.time())), (M, n),
                          jnp.bfloat16)
  ref = kq.reference_dx(dy0, fresh)
  for cfg in DX_CONFIGS:
    call = lambda dy, w, cfg=cfg: mdx.fused_dx(
        dy, w.qvalue, mdx.transposed_params(w.scale, w.zero_point),
        group_size=GROUP, cfg=cfg, num_sms=num_sms)
    extra = dict(shape, config=dataclasses.asdict(cfg))
    row = timed("mgpu_dx", call, list(zip(dys, ws)), **extra)
    if "us" not in row:
      continue
    timed("mgpu_dx_kernel_only", functools.partial(
        mdx.fused_dx, group_size=GROUP, cfg=cfg, num_sms=num_sms),
          [(dy, w.qvalue, mdx.transposed_params(w.scale, w.zero_point))
           for dy, w in zip(dys, ws)], **extra)
    got = jax.jit(call)(dy0, fresh).astype(jnp.float32)
    err = jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)
    row["rel_err"] = float(jnp.where(jnp.isfinite(err), err, jnp.inf))
    row["tflops"] = flops / row["us"] / 1e6
    row["vs_bf16"] = bf16.get("us", float("nan")) / row["us"]
    print("  rel_err", row["rel_err"], "vs bf16", row["vs_bf16"], flush=True)
  if not ablate:
    return
  from experiments import dx_ablations  # pylint: disable=g-import-not-at-top
  prepped = [(dy, w.qvalue, mdx.transposed_params(w.scale, w.zero_point))
             for dy, w in zip(dys, ws)]
  for name, patch in dx_ablations.ABLATIONS.items():
    with patch():  # traced (and compiled) inside
      timed(f"mgpu_dx_ablate_{name}", functools.partial(
          mdx.fused_dx, group_size=GROUP, num_sms=num_sms), prepped,
            **shape)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
  ap.add_argument("--lower_only", action="store_true")
  ap.add_argument("--op", choices=("fwd", "dx", "both"), default="fwd")
  ap.add_argument("--triton", action="store_true",
                  help="also time the Triton kernel (the table's config)")
  ap.add_argument("--ablate", action="store_true",
                  help="also time the input gradient's ablations "
                  "(experiments/dx_ablations.py)")
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
    shape = dict(M=M, N=n, K=k)
    r = COPIES
    keys = jax.random.split(jax.random.PRNGKey(n + k), r)
    ws = [bk._random_weight(kk, n, k, 4) for kk in keys]  # pylint: disable=protected-access
    xs = [jax.random.normal(kk, (M, k), jnp.bfloat16)
          for kk in jax.random.split(jax.random.PRNGKey(7), r)]
    flops = 2 * M * n * k
    if args.op in ("dx", "both"):
      run_dx(timed, dict(shape, op="dx"), xs, ws, n, k, flops, args.triton,
             args.ablate)
    if args.op == "dx":
      continue
    shape = dict(shape, op="fwd")
    bf16 = timed("xla_bf16", lambda x, w: jnp.dot(
        x, w.T, preferred_element_type=jnp.float32).astype(x.dtype),
                 [(x, (jax.random.normal(jax.random.PRNGKey(i), (n, k),
                                         jnp.bfloat16) * 0.02))
                  for i, x in enumerate(xs[:4])], **shape)
    if args.triton:
      timed("triton_table", lambda x, w: kq.fwd(x, w), list(zip(xs, ws)),
            **shape)
    fresh = bk._random_weight(jax.random.PRNGKey(int(time.time())), n, k, 4)  # pylint: disable=protected-access
    x0 = jax.random.normal(jax.random.PRNGKey(int(time.time()) + 1), (M, k),
                           jnp.bfloat16)
    ref = kq.reference(x0, fresh)
    for cfg in CONFIGS:
      extra = dict(shape, config=dataclasses.asdict(cfg))
      call = functools.partial(mg.qmatmul_fwd, group_size=GROUP, cfg=cfg,
                               num_sms=num_sms)
      row = timed("mgpu", lambda x, w: call(x, *_leaves(w)),
                  list(zip(xs, ws)), **extra)
      if "us" not in row:
        continue
      got = jax.jit(call)(x0, *_leaves(fresh)).astype(jnp.float32)
      err = jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)
      row["rel_err"] = float(jnp.where(jnp.isfinite(err), err, jnp.inf))
      row["tflops"] = flops / row["us"] / 1e6
      row["vs_bf16"] = bf16.get("us", float("nan")) / row["us"]
      print("  rel_err", row["rel_err"], "vs bf16", row["vs_bf16"],
            flush=True)
      prepped = [(x, w.qvalue,
                  mg.group_params(w.scale, w.zero_point)) for x, w in
                 zip(xs, ws)]
      timed("mgpu_kernel_only", functools.partial(
          mg.fused_fwd, group_size=GROUP, cfg=cfg, num_sms=num_sms),
            prepped, **extra)
  bk.write_rows(args.out, f"mgpu_train_{args.op}", timer, rows,
                __doc__.splitlines()[0])


if __name__ == "__main__":
  main()
