r"""Decode-shape forward on Hopper through Mosaic GPU (4-bit uniform codes).

    y (M, N) = x (M, K) @ deq(W)^T,   M <= 16

A probe (session 15, not yet timed, not wired into `qmatmul`): the
training forward's structure (`qmatmul_mgpu`: persistent CTAs, a memory
warpgroup feeding a chained TMA pipeline, two compute warpgroups of 64
weight rows each, `y^T = deq(W) x^T` with the weight as wgmma's register
operand) cut for decode, where the weight's bytes, not the MMAs, bound the
time:

- The token dimension is wgmma's N, `tokens` = 8 or 16 rows (x padded by
  XLA, or with `pad=False` its TMA tiles zero-filled past M).
- Each CTA tile is 128 weight rows times `1 / split` of the contraction,
  so `N / 128 * split` tiles keep every SM streaming; the tiles' float32
  partials `(split, N, tokens)` are summed by XLA.
- The group scale leaves the per-weight arithmetic: a step's A operand is
  the exact integer `f (q - z)` (`(128 + f q) - (128 + f z)` in bf16, two
  bit operations and one subtraction per pair of codes, f the plane's
  factor), its wgmma result is multiplied by `s / f` per row and added to
  a float32 total in registers:

      total += (s_lo / 1) * ((q_lo - z_lo) @ x_lo^T)
             + (s_hi / 8) * (8 (q_hi - z_hi) @ x_hi^T)

  which needs `block_kb` to divide the group size (a step's plane lies in
  one group). No weight is rounded: the only roundings are wgmma's float32
  accumulation and the final bf16 cast.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import qmatmul_mgpu as mg

ROWS = 64  # weight rows per compute warpgroup (wgmma M)
CTA_ROWS = 2 * ROWS


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """tokens: padded activation rows (wgmma N: 8 or 16, >= M); split:
  CTA tiles sharing one 128-row block's contraction; block_kb: packed bytes
  per row and pipeline step (divides the group size); stages: steps in
  flight; pad: x padded to `tokens` rows by XLA (False: x's TMA tiles
  keep `tokens` rows and the copy engine fills the rows past M with
  zeros, saving XLA's pad)."""
  tokens: int = 8
  split: int = 4
  block_kb: int = 64
  stages: int = 4
  pad: bool = True


def check_shapes(m: int, n: int, k: int, group_size: int,
                 cfg: DecodeConfig) -> None:
  """Raises ValueError naming the first shape rule (M, N, K, g) broken."""
  half = k // 2
  per_tile = half // cfg.split if cfg.split > 0 else 0
  rules = (
      (k % 2 == 0, f"K={k} must be even (two 4-bit planes)"),
      (cfg.tokens in (8, 16), f"tokens={cfg.tokens} must be 8 or 16"),
      (0 < m <= cfg.tokens, f"M={m} must be in [1, tokens={cfg.tokens}]"),
      (n % CTA_ROWS == 0, f"N={n} must be a multiple of {CTA_ROWS}"),
      (half % group_size == 0,
       f"K/2={half} must be a multiple of the group size {group_size}"),
      (group_size % cfg.block_kb == 0,
       f"group size {group_size} must be a multiple of block_kb="
       f"{cfg.block_kb}"),
      (cfg.split > 0 and half % (cfg.split * cfg.block_kb) == 0,
       f"K/2={half} must be a multiple of split * block_kb = "
       f"{cfg.split} * {cfg.block_kb}"),
      (per_tile % group_size == 0 or group_size % max(per_tile, 1) == 0,
       f"a tile's K/2 / split = {per_tile} bytes must be a multiple or a "
       f"divisor of the group size {group_size}"),
      (cfg.stages > 0 and per_tile // cfg.block_kb >= cfg.stages,
       f"stages={cfg.stages} must not exceed a tile's steps "
       f"({per_tile // max(cfg.block_kb, 1)})"),
  )
  mg.raise_first_broken(rules)


def fused_partials(x: jax.Array, codes: jax.Array, params: jax.Array, *,
                   group_size: int, cfg: DecodeConfig = DecodeConfig(),
                   num_sms: int = 132) -> jax.Array:
  """float32 partials `(split, N, tokens)` of `deq(W) x^T` from x
  `(M, K)` bf16 (M <= tokens; each TMA tile of x has `tokens` rows, those
  past M zero-filled), the planar codes `(N, K/2)` uint8 and
  `group_params` `(G, 2, N)`: their sum over axis 0 is `y^T` (its columns
  past M zero)."""
  m, k = x.shape
  n = codes.shape[0]
  mg.check_operands(codes, params, n, k, group_size)
  check_shapes(m, n, k, group_size, cfg)
  t = cfg.tokens
  half, kb, split = k // 2, cfg.block_kb, cfg.split
  per_tile = half // split
  steps = per_tile // kb
  steps_per_group = group_size // kb
  groups_per_tile = max(per_tile // group_size, 1)
  half_groups = half // group_size
  n_iters = n // CTA_ROWS
  dtype = x.dtype

  def qmatmul_decode_mgpu(q_gmem, x_gmem, p_gmem, out_gmem, out_smem):
    get_pipeline = mg.pipeline_maker([
        plgpu.BlockSpec((CTA_ROWS, kb), lambda s: (0, s),
                        transforms=mg.swizzled(jnp.uint8, kb)),
        plgpu.BlockSpec((t, kb), lambda s: (0, s),
                        transforms=mg.swizzled(dtype, kb)),
        plgpu.BlockSpec((t, kb), lambda s: (0, s),
                        transforms=mg.swizzled(dtype, kb)),
        plgpu.BlockSpec((1, 2, CTA_ROWS),
                        lambda s: (s // steps_per_group, 0, 0)),
        plgpu.BlockSpec((1, 2, CTA_ROWS),
                        lambda s: (s // steps_per_group, 0, 0)),
    ], steps, cfg.stages)

    def tile_refs(n_idx, part):
      rows = pl.ds(n_idx * CTA_ROWS, CTA_ROWS)
      cols = lambda plane: pl.ds(plane * half + part * per_tile, per_tile)
      groups = lambda plane: pl.ds(
          plane * half_groups + (part * per_tile) // group_size,
          groups_per_tile)
      return (q_gmem.at[rows, cols(0)], x_gmem.at[:, cols(0)],
              x_gmem.at[:, cols(1)], p_gmem.at[groups(0), :, rows],
              p_gmem.at[groups(1), :, rows])

    @mg.allocated(get_pipeline, tile_refs(0, 0))
    def _scope(allocs):
      wg = lax.axis_index("wg")
      wg_rows = pl.ds(wg * ROWS, ROWS)

      @plgpu.nd_loop((n_iters * split,), collective_axes="sm")
      def _tiles(info):
        (lin,) = info.index
        n_idx, part = lin // split, lin % split

        def compute_context(run_pipeline):
          zeros = plgpu.layout_cast(jnp.zeros((ROWS, t), jnp.float32),
                                    plgpu.Layout.WGMMA)
          total = run_pipeline(zeros)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          out_smem[wg] = total
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(
              out_smem.at[wg],
              out_gmem.at[part, pl.ds(n_idx * CTA_ROWS + wg * ROWS, ROWS)])

        def body(_, q_smem, xlo_smem, xhi_smem, plo_smem, phi_smem, total):
          q = q_smem[wg_rows]
          planes = []
          for plane, p_smem in ((0, plo_smem), (1, phi_smem)):
            s, z = mg.load_params(p_smem, wg_rows)
            f = mg.PLANE_FACTOR[plane]
            codes_f = mg.biased_codes_ptx(q, plane) - lax.broadcast_in_dim(
                z * f + 128, q.shape, (0,))
            planes.append((codes_f, (s * (1 / f)).astype(jnp.float32)))

          def mma(acc_lo, acc_hi):
            plgpu.wgmma(acc_lo, planes[0][0], mg._transposed(xlo_smem))  # pylint: disable=protected-access
            plgpu.wgmma(acc_hi, planes[1][0], mg._transposed(xhi_smem))  # pylint: disable=protected-access
            plgpu.wgmma_wait(0)
            return acc_lo[...], acc_hi[...]

          parts = pl.run_scoped(mma, plgpu.ACC((ROWS, t), jnp.float32),
                                plgpu.ACC((ROWS, t), jnp.float32))
          for (_, scale), part_sum in zip(planes, parts):
            total = total + lax.broadcast_in_dim(
                scale, part_sum.shape, (0,)) * part_sum
          return total

        get_pipeline(body, compute_context, mg.tile_state(
            info, steps, cfg.stages))(*tile_refs(n_idx, part),
                                      allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  return mg.launch(
      qmatmul_decode_mgpu, (split, n, t), jnp.float32, num_sms,
      out_smem=plgpu.SMEM((2, ROWS, t), jnp.float32))(codes, x, params)


def decode_fwd(x: jax.Array, qvalue: jax.Array, scale: jax.Array,
               zero_point: jax.Array | None, *, group_size: int,
               cfg: DecodeConfig = DecodeConfig(), num_sms: int = 132
               ) -> jax.Array:
  """`y (M, N) = x @ deq(W)^T` for M <= `cfg.tokens` from a 4-bit QArray's
  leaves (qvalue `(N, K/2)` uint8, dense scale and optional zero point
  `(N, G)`): x padded to `tokens` rows if `cfg.pad`, the partials summed
  by XLA."""
  m = x.shape[0]
  if cfg.pad:
    x = jnp.pad(x, ((0, cfg.tokens - m), (0, 0)))
  params = mg.group_params(scale, zero_point, x.dtype)
  partials = fused_partials(x, qvalue, params, group_size=group_size,
                            cfg=cfg, num_sms=num_sms)
  return partials.sum(axis=0)[:, :m].T.astype(x.dtype)
