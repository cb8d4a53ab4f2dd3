r"""Training-shape input gradient on Hopper through Mosaic GPU (4-bit).

    dx (M, K) = dy (M, N) @ deq(W) (N, K)

The dequantized weight must be wgmma's shared-memory (B) operand here (its
rows are the contraction), so each compute warpgroup dequantizes its own
byte columns of the step's code tile in registers (`qmatmul_mgpu.
dequantize_tile`, the forward's exact per-weight rounding) and stores both
planes side by side, `[lo | hi]` `(block_n, 2 * block_kb)` bf16, into its
own shared buffer; one wgmma per step then reads dy's TMA'd tile as A and
that buffer as B. A CTA covers `tokens` rows of dy and `2 * block_kb` byte
columns (each warpgroup `block_kb`, i.e. `2 * block_kb` output columns, half
in each plane); the pipeline walks the contraction N in `block_n` rows. The
group of a CTA's columns is fixed (`2 * block_kb` divides the group size),
so each step needs one `(block_n,)` vector of s, z per plane.

`qmatmul.dx` takes this kernel where `can_use` passes (as `qmatmul.fwd`
takes `qmatmul_mgpu`'s); qdot's default input gradient at training shapes
stays XLA's dequantize-then-matmul, which is faster still
(mgpu_train_dx_h100_2026-11-28.json).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import qmatmul_mgpu as mg


@dataclasses.dataclass(frozen=True)
class DxConfig:
  """tokens: dy rows per CTA (wgmma M); block_kb: byte columns per
  warpgroup (its output columns are 2 * block_kb, wgmma N); block_n:
  contraction rows per step; stages: steps in flight."""
  tokens: int = 128
  block_kb: int = 64
  block_n: int = 64
  stages: int = 4
  grid_tile_width: int = 4


def check_shapes(m: int, n: int, k: int, group_size: int,
                 cfg: DxConfig) -> None:
  """Raises ValueError naming the first shape rule (M, N, K, g) broken."""
  half, cols = k // 2, 2 * cfg.block_kb
  rules = (
      (k % 2 == 0, f"K={k} must be even (two 4-bit planes)"),
      (m % cfg.tokens == 0, f"M={m} must be a multiple of tokens={cfg.tokens}"),
      (n % cfg.block_n == 0, f"N={n} must be a multiple of block_n="
       f"{cfg.block_n}"),
      (group_size % cols == 0, f"group size {group_size} must be a multiple "
       f"of 2 * block_kb = {cols}"),
      (half % group_size == 0,
       f"K/2={half} must be a multiple of the group size {group_size}"),
  )
  mg.raise_first_broken(rules)


def fused_dx(dy: jax.Array, codes: jax.Array, params: jax.Array, *,
             group_size: int, cfg: DxConfig = DxConfig(),
             num_sms: int = 132) -> jax.Array:
  """`dx (M, K)` from dy `(M, N)` bf16, planar codes `(N, K/2)` uint8 and
  `qmatmul_mgpu.group_params` `(G, 4, N)`."""
  m, n = dy.shape
  half = codes.shape[1]
  k = 2 * half
  mg.check_operands(codes, params, n, k, group_size)
  check_shapes(m, n, k, group_size, cfg)
  tokens, kb, bn = cfg.tokens, cfg.block_kb, cfg.block_n
  cta_kb = 2 * kb
  steps = n // bn
  m_iters, c_iters = m // tokens, half // cta_kb
  half_groups = half // group_size
  dtype = dy.dtype

  def kernel(dy_gmem, q_gmem, p_gmem, out_gmem, w_smem, out_smem):
    get_pipeline = mg.pipeline_maker([
        plgpu.BlockSpec((tokens, bn), lambda s: (0, s),
                        transforms=mg.swizzled(dtype, bn)),
        plgpu.BlockSpec((bn, cta_kb), lambda s: (s, 0),
                        transforms=mg.swizzled(jnp.uint8, kb)),
        plgpu.BlockSpec((1, 2, bn), lambda s: (0, 0, s)),
        plgpu.BlockSpec((1, 2, bn), lambda s: (0, 1, s)),
    ], steps, cfg.stages)

    @mg.allocated(get_pipeline, (dy_gmem, q_gmem, p_gmem, p_gmem))
    def _scope(allocs):
      wg = lax.axis_index("wg")

      @plgpu.nd_loop((m_iters * c_iters,), collective_axes="sm")
      def _tiles(info):
        (lin,) = info.index
        m_idx, c_idx = plgpu.planar_snake(lin, (m_iters, c_iters), 1,
                                          cfg.grid_tile_width)
        cta_m = pl.ds(m_idx * tokens, tokens)
        cta_c = pl.ds(c_idx * cta_kb, cta_kb)
        g_lo = (c_idx * cta_kb) // group_size

        def compute_context(run_pipeline):
          @functools.partial(
              pl.run_scoped,
              acc_ref=plgpu.ACC((tokens, 2 * kb), jnp.float32))
          def _acc(acc_ref):
            run_pipeline(acc_ref)
            acc = acc_ref[...].astype(dtype)
            for plane, col0 in ((0, 0), (1, half)):
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)
              out_smem[wg] = acc[:, plane * kb:(plane + 1) * kb]
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(
                  out_smem.at[wg],
                  out_gmem.at[cta_m, pl.ds(col0 + c_idx * cta_kb + wg * kb,
                                           kb)])

        def body(_, dy_smem, q_smem, plo_smem, phi_smem, acc_ref):
          row_vec = plgpu.Layout.WGMMA.reduce(1)
          lo = (mg.load_whole(plo_smem.at[0, 0], row_vec),
                mg.load_whole(plo_smem.at[0, 1], row_vec))
          hi = (mg.load_whole(phi_smem.at[0, 0], row_vec),
                mg.load_whole(phi_smem.at[0, 1], row_vec))
          w_lo, w_hi = mg.dequantize_tile(
              q_smem[:, pl.ds(wg * kb, kb)], lo, hi, dtype)
          w_smem[wg, :, :kb] = w_lo
          w_smem[wg, :, kb:] = w_hi
          plgpu.commit_smem()
          plgpu.wgmma(acc_ref, dy_smem, w_smem.at[wg])
          plgpu.wgmma_wait(0)
          return acc_ref

        get_pipeline(body, compute_context)(
            dy_gmem.at[cta_m, :], q_gmem.at[:, cta_c],
            p_gmem.at[pl.ds(g_lo, 1)],
            p_gmem.at[pl.ds(half_groups + g_lo, 1)],
            allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  return mg.launch(
      kernel, (m, k), dtype, num_sms,
      w_smem=plgpu.SMEM((2, bn, 2 * kb), dtype,
                        transforms=mg.swizzled(dtype, 2 * kb)),
      out_smem=plgpu.SMEM((2, tokens, kb), dtype,
                          transforms=mg.swizzled(dtype, kb)))(
                              dy, codes, params)


def can_use(dy2d: jax.Array, w, cfg: DxConfig = DxConfig()
            ) -> tuple[bool, str]:
  """Whether `dx(dy2d, w)` can run, and if not, why: as
  `qmatmul_mgpu.can_use`, with dy `(M, N)` and this kernel's shape rules."""
  return mg.gate(dy2d, w, "dx", check_shapes, cfg)


def dx(dy2d: jax.Array, w, cfg: DxConfig = DxConfig()) -> jax.Array:
  """`dy2d (M, N) @ dequantize(w) -> (M, K)` for a QArray `can_use`
  accepts."""
  from qft_jax._src import qarray as qa  # pylint: disable=g-import-not-at-top
  ok, reason = can_use(dy2d, w, cfg)
  if not ok:
    raise ValueError(f"qmatmul_mgpu_dx.dx cannot run: {reason}")
  params = mg.group_params(qa.dense_scale(w), w.zero_point, dy2d.dtype)
  return fused_dx(dy2d, w.qvalue, params,
                  group_size=qa.resolve_group_size(w.group_size, w.shape[1]),
                  cfg=cfg, num_sms=jax.devices()[0].core_count)


def reference(dy, qvalue, scale, zero_point, group_size):
  """float32 `dy @ deq(W)` from the planar codes `(N, K/2)` uint8."""
  w = mg.dequantized(qvalue, scale, zero_point, group_size)
  return dy.astype(jnp.float32) @ w
