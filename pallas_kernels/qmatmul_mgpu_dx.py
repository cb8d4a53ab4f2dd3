r"""Training-shape input gradient on Hopper through Mosaic GPU (4-bit).

    dx (M, K) = dy (M, N) @ deq(W) (N, K)

computed transposed, `dx^T (K, M) = deq(W)^T (K, N) @ dy^T (N, M)`, so the
dequantized weight is wgmma's register (A) operand, as in the forward
(`qmatmul_mgpu`), and dy's TMA'd tile its shared-memory (B) operand read
transposed. The weight tile arrives as TMA brought the codes, `(block_n,
64)` bytes of W's rows; each warpgroup reads it through a transposed view
in the WGMMA-transposed register layout (two bytes of one row per register
pair, one 16-bit load), takes its plane (`qmatmul_mgpu.plane_codes`:
warpgroup 0 the low nibbles, 1 the high ones, the same 64 output columns
of each plane), converts to bf16 and casts to the WGMMA layout (a shuffle
and a byte permute per register), then applies the group parameters,
which here vary along the tile's columns (the contraction):

    acc_p += ((q_p - z_p) s_p)^T @ dy^T        (p = this warpgroup's plane)

exactly as `qa.dequantize` rounds. Everything else is the forward's: a
persistent grid, two compute warpgroups sharing dy's tile, a memory
warpgroup running a `stages`-deep TMA pipeline over N in `block_n` rows,
chained across a CTA's tiles (`qmatmul_mgpu.tile_state`), and an epilogue
storing each `(64, tokens)` accumulator through a transposed shared view,
so dx leaves the kernel in its `(M, K)` layout. A CTA's 64 byte columns
lie in one group per plane (64 divides the group size), so each step needs
one `(block_n,)` vector of s, z per plane.

`qmatmul.dx` takes this kernel where `can_use` passes (as `qmatmul.fwd`
takes `qmatmul_mgpu`'s).
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

COLS = 64  # byte columns per CTA = output columns per warpgroup (wgmma M)


@dataclasses.dataclass(frozen=True)
class DxConfig:
  """tokens: dy rows per CTA (wgmma N, a multiple of 8, <= 256); block_n:
  contraction rows per step; stages: steps in flight; grid_tile_width:
  output tiles per stripe of the persistent walk."""
  tokens: int = 256
  block_n: int = 64
  stages: int = 4
  grid_tile_width: int = 4


def check_shapes(m: int, n: int, k: int, group_size: int,
                 cfg: DxConfig) -> None:
  """Raises ValueError naming the first shape rule (M, N, K, g) broken."""
  half = k // 2
  rules = (
      (k % 2 == 0, f"K={k} must be even (two 4-bit planes)"),
      (m % cfg.tokens == 0, f"M={m} must be a multiple of tokens="
       f"{cfg.tokens}"),
      (n % cfg.block_n == 0, f"N={n} must be a multiple of block_n="
       f"{cfg.block_n}"),
      (group_size % COLS == 0, f"group size {group_size} must be a multiple "
       f"of {COLS}"),
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
  tokens, bn = cfg.tokens, cfg.block_n
  steps = n // bn
  m_iters, c_iters = m // tokens, half // COLS
  half_groups = half // group_size
  dtype = dy.dtype
  param_spec = lambda: plgpu.BlockSpec((1, 2, bn), lambda s: (0, 0, s))

  def kernel(dy_gmem, q_gmem, p_gmem, out_gmem, out_smem):
    get_pipeline = mg.pipeline_maker([
        plgpu.BlockSpec((tokens, bn), lambda s: (0, s),
                        transforms=mg.swizzled(dtype, bn)),
        plgpu.BlockSpec((bn, COLS), lambda s: (s, 0),
                        transforms=mg.swizzled(jnp.uint8, COLS)),
        param_spec(), param_spec(),
    ], steps, cfg.stages)

    @mg.allocated(get_pipeline, (dy_gmem, q_gmem, p_gmem, p_gmem))
    def _scope(allocs):
      wg = lax.axis_index("wg")

      @plgpu.nd_loop((m_iters * c_iters,), collective_axes="sm")
      def _tiles(info):
        (lin,) = info.index
        c_idx, m_idx = plgpu.planar_snake(lin, (c_iters, m_iters), 1,
                                          cfg.grid_tile_width)
        cta_m = pl.ds(m_idx * tokens, tokens)
        cols = pl.ds(c_idx * COLS, COLS)
        g_lo = (c_idx * COLS) // group_size

        def compute_context(run_pipeline):
          @functools.partial(
              pl.run_scoped, acc_ref=plgpu.ACC((COLS, tokens), jnp.float32))
          def _acc(acc_ref):
            run_pipeline(acc_ref)
            acc = acc_ref[...].astype(dtype)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            mg._transposed(out_smem.at[wg])[...] = acc  # pylint: disable=protected-access
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                out_smem.at[wg],
                out_gmem.at[cta_m, pl.ds(wg * half + c_idx * COLS, COLS)])

        def body(_, dy_smem, q_smem, plo_smem, phi_smem, acc_ref):
          q_t = mg.load_whole(mg._transposed(q_smem),  # pylint: disable=protected-access
                              plgpu.Layout.WGMMA_TRANSPOSED)
          (s_lo, z_lo), (s_hi, z_hi) = (mg.load_params(plo_smem, axis=1),
                                        mg.load_params(phi_smem, axis=1))
          hi = wg.astype(dtype)  # this warpgroup's plane's, exactly
          s = s_lo * (1 - hi) + s_hi * hi
          z = z_lo * (1 - hi) + z_hi * hi
          w_t = mg.dequantize_plane(q_t, wg, s, z, dtype, axis=1,
                                    layout=plgpu.Layout.WGMMA)
          plgpu.wgmma(acc_ref, w_t, mg._transposed(dy_smem))  # pylint: disable=protected-access
          plgpu.wgmma_wait(0)
          return acc_ref

        get_pipeline(body, compute_context, mg.tile_state(info, steps,
                                                          cfg.stages))(
            dy_gmem.at[cta_m, :], q_gmem.at[:, cols],
            p_gmem.at[pl.ds(g_lo, 1)],
            p_gmem.at[pl.ds(half_groups + g_lo, 1)],
            allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  return mg.launch(
      kernel, (m, k), dtype, num_sms,
      out_smem=plgpu.SMEM((2, tokens, COLS), dtype,
                          transforms=mg.swizzled(dtype, COLS)))(
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
