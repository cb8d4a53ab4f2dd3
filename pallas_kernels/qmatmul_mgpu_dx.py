r"""Training-shape input gradient on Hopper through Mosaic GPU (4-bit).

    dx (M, K) = dy (M, N) @ deq(W) (N, K)

The dequantized weight must be wgmma's shared-memory (B) operand here (its
rows are the contraction), so the compute warpgroups dequantize each step's
code tile in registers (`qmatmul_mgpu.dequantize_plane`, the forward's
exact per-weight rounding) and store it as `[lo | hi]` `(block_n,
2 * block_kb)` bf16 into a shared buffer that both read as B, each against
its own `tokens` rows of dy's TMA'd tile as A. The warpgroups split that
work by plane (warpgroup 0 the low nibbles, 1 the high ones), so each
weight is dequantized once per `2 * tokens` rows of dy, and they run one
step ahead of the MMAs: step s waits until tile s is whole (a barrier per
buffer, one arrival per warpgroup), issues its wgmma on it, and
dequantizes its half of tile s + 1 while that wgmma runs:

    wait ready[s];  wgmma(acc, dy_s, w[s]);  w[s + 1] <- deq(q_{s+1});
    arrive ready[s + 1];  wgmma_wait

(tile 0 is made before step 0 from code rows each warpgroup loads itself).
With two buffers (`w_buffers`) a warpgroup arrives only after its wgmma is
done, which also frees the other buffer; so both warpgroups' wgmmas finish
before either issues the next, and the tensor core drains at every step.
With three, each wgmma stays in flight into the next step:

    wait ready[s];  wgmma(acc, dy_s, w[s]);  wgmma_wait(1);
    w[s + 1] <- deq(q_{s+1});  arrive ready[s + 1]

`wgmma_wait(1)` retires this warpgroup's wgmma of step s - 1, and the other
warpgroup arrived at `ready[s]` (awaited above) after retiring its own, so
`w[s + 1] = w[s - 2]` has no reader left; the pipeline releases each
input slot one step late (`delay_release=1`) for the same reason.

A CTA covers `2 * tokens` rows of dy and `block_kb` byte columns (its
output columns are those of both planes, `block_kb` each); the pipeline
walks the contraction N in `block_n` rows. A CTA's columns lie in one
group (`block_kb` divides the group size), so each step needs one
`(block_n,)` vector of s, z per plane.

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

EPI_TOKENS = 64  # dx rows per epilogue store (a smaller buffer: more stages)


@dataclasses.dataclass(frozen=True)
class DxConfig:
  """The defaults won experiments/bench_mgpu_train.py's session-11 and -12
  runs at all three training shapes (mgpu_train_dx_h100_2026-11-28_s11.json,
  mgpu_train_both_h100_2026-11-28_s12b.json).

  tokens: dy rows per compute warpgroup (wgmma M; a CTA covers two);
  block_kb: byte columns per CTA (its output columns are 2 * block_kb,
  wgmma N); block_n: contraction rows per step; stages: steps in flight;
  w_buffers: dequantized tiles in shared memory: 2 (each step's wgmma
    retired within the step) or 3 (kept in flight into the next step);
  carry_codes: read each code tile (and its group parameters) into
    registers one step before it is dequantized, carried across the step,
    so the shared-memory loads' latency hides under a step's work (queued
    for a probe: the session-12 profile found the dequantization waiting on
    them)."""
  tokens: int = 128
  block_kb: int = 64
  block_n: int = 64
  stages: int = 4
  grid_tile_width: int = 4
  w_buffers: int = 2
  carry_codes: bool = False


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
      (cfg.w_buffers in (2, 3), f"w_buffers={cfg.w_buffers} must be 2 or 3"),
      (not cfg.carry_codes or n >= 2 * cfg.block_n,
       f"N={n} must be at least 2 * block_n={2 * cfg.block_n} with "
       "carry_codes (two tiles before the pipeline)"),
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
  tokens, kb, bn, nbuf = cfg.tokens, cfg.block_kb, cfg.block_n, cfg.w_buffers
  in_flight = nbuf == 3  # each wgmma stays in flight into the next step
  late = dict(delay_release=1) if in_flight else {}
  cta_tokens = 2 * tokens
  steps = n // bn
  m_iters, c_iters = m // cta_tokens, half // kb
  half_groups = half // group_size
  dtype = dy.dtype
  # The code rows a step reads: those it dequantizes (s + 1) or, carried,
  # those the next step dequantizes (s + 2).
  lead = 2 if cfg.carry_codes else 1
  ahead = lambda s: (jnp.minimum(s + lead, steps - 1), 0)
  rows0 = lead * bn  # code rows each warpgroup loads before the pipeline
  code_spec = functools.partial(plgpu.BlockSpec, (bn, kb),
                                transforms=mg.swizzled(jnp.uint8, kb), **late)
  param_spec = functools.partial(plgpu.BlockSpec, (1, 2, bn), **late)

  def qmatmul_dx_mgpu(dy_gmem, q_gmem, p_gmem, out_gmem, w_smem, out_smem,
                      ready, q0_smem, p0_smem, loaded):
    get_pipeline = mg.pipeline_maker([
        plgpu.BlockSpec((cta_tokens, bn), lambda s: (0, s),
                        transforms=mg.swizzled(dtype, bn), **late),
        code_spec(ahead), param_spec(lambda s: (0, 0, ahead(s)[0])),
        param_spec(lambda s: (0, 0, ahead(s)[0])),
    ], steps, cfg.stages)
    gmem = (dy_gmem, q_gmem, p_gmem, p_gmem)

    @mg.allocated(get_pipeline, gmem)
    def _scope(allocs):
      wg = lax.axis_index("wg")
      wg_tokens = pl.ds(wg * tokens, tokens)

      def store_half(codes, plane_params, buf):
        """This warpgroup's plane of a code tile into buffer `buf`:
        `codes()` the uint8 `(block_n, block_kb)` tile, `plane_params(p)`
        plane p's `(s, z)` row vectors (read where called, in the
        warpgroup's branch)."""
        for plane in (0, 1):
          @pl.when(wg == plane)
          def _store():
            w = mg.dequantize_plane(codes(), plane, *plane_params(plane))
            w_smem[buf, :, plane * kb:(plane + 1) * kb] = w
        plgpu.commit_smem()

      def read_tile(q_smem, plo_smem, phi_smem, rows=slice(None)):
        """A code tile and both planes' parameters, into registers."""
        return (q_smem[rows], (mg.load_params(plo_smem, rows),
                               mg.load_params(phi_smem, rows)))

      @plgpu.nd_loop((m_iters * c_iters,), collective_axes="sm")
      def _tiles(info):
        (lin,) = info.index
        m_idx, c_idx = plgpu.planar_snake(lin, (m_iters, c_iters), 1,
                                          cfg.grid_tile_width)
        cta_m = pl.ds(m_idx * cta_tokens, cta_tokens)
        g_lo = (c_idx * kb) // group_size
        first = info.local_index * steps  # this CTA's steps before the tile
        buffer = lambda s: lax.rem(first + s, nbuf)

        cols = pl.ds(c_idx * kb, kb)
        lo, hi = pl.ds(g_lo, 1), pl.ds(half_groups + g_lo, 1)

        def compute_context(run_pipeline):
          # Tile 0 (and, carried, tile 1), before the pipeline: the first
          # code rows and both planes' parameters, loaded by TMA here.
          plgpu.copy_gmem_to_smem(q_gmem.at[pl.ds(0, rows0), cols],
                                  q0_smem.at[wg], loaded.at[wg])
          for plane in (0, 1):
            plgpu.copy_gmem_to_smem(
                p_gmem.at[pl.ds(g_lo + plane * half_groups, 1), :,
                          pl.ds(0, rows0)],
                p0_smem.at[wg, plane], loaded.at[wg])
          plgpu.barrier_wait(loaded.at[wg])
          tile0 = pl.ds(0, bn)
          store_half(lambda: q0_smem.at[wg][tile0],
                     lambda p: mg.load_params(p0_smem.at[wg, p], tile0),
                     buffer(0))
          plgpu.barrier_arrive(ready.at[buffer(0)])

          @functools.partial(
              pl.run_scoped,
              acc_ref=plgpu.ACC((tokens, 2 * kb), jnp.float32))
          def _acc(acc_ref):
            if cfg.carry_codes:
              run_pipeline((acc_ref, *read_tile(
                  q0_smem.at[wg], p0_smem.at[wg, 0], p0_smem.at[wg, 1],
                  pl.ds(bn, bn))))
            else:
              run_pipeline(acc_ref)
            plgpu.wgmma_wait(0)
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

        def body(idx, dy_smem, q_next, plo_next, phi_next, carry):
          (s,) = idx
          acc_ref = carry[0] if cfg.carry_codes else carry
          plgpu.barrier_wait(ready.at[buffer(s)])
          plgpu.wgmma(acc_ref, dy_smem.at[wg_tokens], w_smem.at[buffer(s)])
          if in_flight:
            plgpu.wgmma_wait(1)  # this warpgroup's wgmma of step s - 1
          not_last = s < steps - 1
          if cfg.carry_codes:  # tile s + 1 in registers; read tile s + 2
            _, q_regs, p_regs = carry
            carry = (acc_ref, *read_tile(q_next, plo_next, phi_next))
            codes, plane_params = lambda: q_regs, lambda p: p_regs[p]
          else:
            codes = lambda: q_next[...]
            plane_params = lambda p: mg.load_params((plo_next, phi_next)[p])

          @pl.when(not_last)
          def _next_tile():
            store_half(codes, plane_params, buffer(s + 1))

          if not in_flight:
            plgpu.wgmma_wait(0)

          @pl.when(not_last)
          def _arrive():
            plgpu.barrier_arrive(ready.at[buffer(s + 1)])
          return carry

        get_pipeline(body, compute_context)(
            dy_gmem.at[cta_m, :], q_gmem.at[:, cols], p_gmem.at[lo],
            p_gmem.at[hi], allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  return mg.launch(
      qmatmul_dx_mgpu, (m, k), dtype, num_sms,
      w_smem=plgpu.SMEM((nbuf, bn, 2 * kb), dtype,
                        transforms=mg.swizzled(dtype, 2 * kb)),
      out_smem=plgpu.SMEM((2, EPI_TOKENS, kb), dtype,
                          transforms=mg.swizzled(dtype, kb)),
      ready=plgpu.Barrier(num_arrivals=2, num_barriers=nbuf),
      q0_smem=plgpu.SMEM((2, rows0, kb), jnp.uint8,
                         transforms=mg.swizzled(jnp.uint8, kb)),
      p0_smem=plgpu.SMEM((2, 2, 1, 2, rows0), dtype),
      loaded=plgpu.Barrier(num_arrivals=3, num_barriers=2))(
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
