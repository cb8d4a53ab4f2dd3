r"""Training-shape input gradient on Hopper through Mosaic GPU (4-bit).

    dx (M, K) = dy (M, N) @ deq(W) (N, K)

The dequantized weight must be wgmma's shared-memory (B) operand here (its
rows are the contraction), so the compute warpgroups dequantize the step's
code tile in registers (`qmatmul_mgpu.dequantize_plane`, the forward's
exact per-weight rounding) and store it as `[lo | hi]` `(block_n,
2 * block_kb)` bf16 into a shared buffer that both then read as B, each
against its own `tokens` rows of dy's TMA'd tile as A. The two warpgroups
split that work by plane: warpgroup 0 dequantizes and stores the low
nibbles, warpgroup 1 the high ones, so each weight is dequantized once per
`2 * tokens` rows of dy. A barrier per step (two arrivals) tells both that
the tile is whole; the buffer is double (step parity), and each warpgroup
waits for its own wgmma before it arrives at the next step's barrier, so
neither overwrites a buffer the other still reads.

A CTA covers `2 * tokens` rows of dy and `block_kb` byte columns (its
output columns are those of both planes, `block_kb` each); the pipeline
walks the contraction N in `block_n` rows, chained across the CTA's tiles
(`qmatmul_mgpu.tile_state`). A CTA's columns lie in one group (`block_kb`
divides the group size), so each step needs one `(block_n,)` vector of
s, z per plane.

`qmatmul.dx` takes this kernel where `can_use` passes (as `qmatmul.fwd`
takes `qmatmul_mgpu`'s); qdot's default input gradient at training shapes
stays XLA's dequantize-then-matmul unless this kernel is measured faster
(`experiments/bench_mgpu_train.py --op dx`).
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


EPI_TOKENS = 64  # dx rows per epilogue store (a smaller buffer: 4 stages fit)


@dataclasses.dataclass(frozen=True)
class DxConfig:
  """tokens: dy rows per compute warpgroup (wgmma M; a CTA covers two);
  block_kb: byte columns per CTA (its output columns are 2 * block_kb,
  wgmma N); block_n: contraction rows per step; stages: steps in flight."""
  tokens: int = 128
  block_kb: int = 64
  block_n: int = 64
  stages: int = 4
  grid_tile_width: int = 4


def check_shapes(m: int, n: int, k: int, group_size: int,
                 cfg: DxConfig) -> None:
  """Raises ValueError naming the first shape rule (M, N, K, g) broken."""
  half, kb = k // 2, cfg.block_kb
  rules = (
      (k % 2 == 0, f"K={k} must be even (two 4-bit planes)"),
      (cfg.tokens % EPI_TOKENS == 0,
       f"tokens={cfg.tokens} must be a multiple of {EPI_TOKENS}"),
      (m % (2 * cfg.tokens) == 0,
       f"M={m} must be a multiple of 2 * tokens = {2 * cfg.tokens}"),
      (n % cfg.block_n == 0, f"N={n} must be a multiple of block_n="
       f"{cfg.block_n}"),
      (group_size % kb == 0, f"group size {group_size} must be a multiple "
       f"of block_kb = {kb}"),
      (half % group_size == 0,
       f"K/2={half} must be a multiple of the group size {group_size}"),
  )
  mg.raise_first_broken(rules)


def fused_dx(dy: jax.Array, codes: jax.Array, params: jax.Array, *,
             group_size: int, cfg: DxConfig = DxConfig(),
             num_sms: int = 132) -> jax.Array:
  """`dx (M, K)` from dy `(M, N)` bf16, planar codes `(N, K/2)` uint8 and
  `qmatmul_mgpu.group_params` `(G, 2, N)`."""
  m, n = dy.shape
  half = codes.shape[1]
  k = 2 * half
  mg.check_operands(codes, params, n, k, group_size)
  check_shapes(m, n, k, group_size, cfg)
  tokens, kb, bn = cfg.tokens, cfg.block_kb, cfg.block_n
  cta_tokens = 2 * tokens
  steps = n // bn
  m_iters, c_iters = m // cta_tokens, half // kb
  half_groups = half // group_size
  dtype = dy.dtype

  def kernel(dy_gmem, q_gmem, p_gmem, out_gmem, w_smem, out_smem, ready):
    get_pipeline = mg.pipeline_maker([
        plgpu.BlockSpec((cta_tokens, bn), lambda s: (0, s),
                        transforms=mg.swizzled(dtype, bn)),
        plgpu.BlockSpec((bn, kb), lambda s: (s, 0),
                        transforms=mg.swizzled(jnp.uint8, kb)),
        plgpu.BlockSpec((1, 2, bn), lambda s: (0, 0, s)),
        plgpu.BlockSpec((1, 2, bn), lambda s: (0, 0, s)),
    ], steps, cfg.stages)

    @mg.allocated(get_pipeline, (dy_gmem, q_gmem, p_gmem, p_gmem))
    def _scope(allocs):
      wg = lax.axis_index("wg")
      wg_tokens = pl.ds(wg * tokens, tokens)

      @plgpu.nd_loop((m_iters * c_iters,), collective_axes="sm")
      def _tiles(info):
        (lin,) = info.index
        m_idx, c_idx = plgpu.planar_snake(lin, (m_iters, c_iters), 1,
                                          cfg.grid_tile_width)
        cta_m = pl.ds(m_idx * cta_tokens, cta_tokens)
        g_lo = (c_idx * kb) // group_size
        first_step = info.local_index * steps

        def compute_context(run_pipeline):
          @functools.partial(
              pl.run_scoped,
              acc_ref=plgpu.ACC((tokens, 2 * kb), jnp.float32))
          def _acc(acc_ref):
            run_pipeline(acc_ref)
            acc = acc_ref[...].astype(dtype)
            for plane in (0, 1):
              for r in range(0, tokens, EPI_TOKENS):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                out_smem[wg] = acc[r:r + EPI_TOKENS,
                                   plane * kb:(plane + 1) * kb]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    out_smem.at[wg],
                    out_gmem.at[cta_m].at[wg_tokens].at[
                        pl.ds(r, EPI_TOKENS),
                        pl.ds(plane * half + c_idx * kb, kb)])

        def body(idx, dy_smem, q_smem, plo_smem, phi_smem, acc_ref):
          (step,) = idx
          buf = lax.rem(first_step + step, 2)
          for plane, p_smem in ((0, plo_smem), (1, phi_smem)):
            @pl.when(wg == plane)
            def _store():
              w = mg.dequantize_plane(q_smem[...], plane,
                                      *mg.load_params(p_smem), dtype)
              w_smem[buf, :, plane * kb:(plane + 1) * kb] = w
          plgpu.commit_smem()
          plgpu.barrier_arrive(ready.at[buf])
          plgpu.barrier_wait(ready.at[buf])
          plgpu.wgmma(acc_ref, dy_smem.at[wg_tokens], w_smem.at[buf])
          plgpu.wgmma_wait(0)
          return acc_ref

        get_pipeline(body, compute_context, mg.tile_state(info, steps,
                                                          cfg.stages))(
            dy_gmem.at[cta_m, :], q_gmem.at[:, pl.ds(c_idx * kb, kb)],
            p_gmem.at[pl.ds(g_lo, 1)],
            p_gmem.at[pl.ds(half_groups + g_lo, 1)],
            allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  return mg.launch(
      kernel, (m, k), dtype, num_sms,
      w_smem=plgpu.SMEM((2, bn, 2 * kb), dtype,
                        transforms=mg.swizzled(dtype, 2 * kb)),
      out_smem=plgpu.SMEM((2, EPI_TOKENS, kb), dtype,
                          transforms=mg.swizzled(dtype, kb)),
      ready=plgpu.Barrier(num_arrivals=2, num_barriers=2))(
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
