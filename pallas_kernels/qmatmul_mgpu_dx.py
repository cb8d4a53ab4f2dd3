r"""Training-shape input gradient on Hopper through Mosaic GPU (4-bit).

    dx (M, K) = dy (M, N) @ deq(W) (N, K)

computed transposed, `dx^T (K, M) = deq(W)^T (K, N) @ dy^T (N, M)`, so the
dequantized weight is wgmma's register (A) operand and dy's TMA'd tile its
shared-memory (B) operand read transposed: the forward's design
(`qmatmul_mgpu`). The design it replaced stored each dequantized tile to
shared memory as wgmma's B operand and read dy as A, about 150 KB of shared
-memory traffic per 1024 tensor-core cycles against 128 bytes a cycle; this
one moves about two thirds of that (WORKSPACE.md section 4, session 13).
Warpgroup p of a CTA computes plane p's 64 output columns `K/2 p + j0 + j`
(j < 64) for `tokens` rows of dy; both share the step's code tile
`(block_n, 64)` bytes and dy tile `(tokens, block_n)`.

The A fragment is read without any exchange between threads by permuting
the accumulator's rows: WGMMA's register layout gives thread (warp w, lane
4 q + r) rows `16 w + q` and `16 w + q + 8` and column pairs `(n, n + 1)`;
here row `16 w + 8 h + q` stands for byte column `j = 16 w + 2 q + h`, so
the thread's two rows are two adjacent bytes of the code tile, and the
16-bit pairs `(row n: bytes j, j + 1)`, `(row n + 1: bytes j, j + 1)` it
needs are exactly what `ldmatrix .trans` hands a thread from an 8x8 block
of 16-bit elements: one instruction loads four column pairs. Per register a
shift by `8 h + p` and the forward's `lop3` (`biased_codes`) turn byte h of
rows n and n + 1 into `128 + f q`. The group parameters vary along the
contraction here (columns of A): `((128 + f q) - (128 + f z[n])) (s[n] /
f)`, every weight bitwise `qa.dequantize`'s.

The epilogue undoes the permutation in registers: the thread's two rows are
the adjacent output columns `j, j + 1`, so a `prmt` pairs them per token
and each 32-bit word is stored to the `(tokens, 64)` output tile at its
swizzled address (conflict-free), which TMA copies to dx.

Everything else is the forward's: a persistent grid, a memory warpgroup
running a `stages`-deep TMA pipeline over N in `block_n` rows, chained
across a CTA's tiles (`qmatmul_mgpu.tile_state`). Each thread's column
pair needs four numbers per step, `128 + f z` and `s / f` at n and n + 1;
`transposed_params` lays them out (one XLA transpose) so that two column
pairs' are one 16-byte shared load. `qmatmul.dx` takes this kernel where
`can_use` passes, and so does qdot's default input gradient at training
shapes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith
from jaxlib.mlir.dialects import llvm
from jaxlib.mlir.dialects import nvvm

from pallas_kernels import qmatmul_mgpu as mg

COLS = 64  # byte columns per CTA: each warpgroup's wgmma M (one plane)
ROW_BYTES = COLS  # one code-tile row in shared memory
OUT_ROW_BYTES = 2 * COLS  # one bf16 output-tile row


@dataclasses.dataclass(frozen=True)
class DxConfig:
  """The defaults won experiments/bench_mgpu_train.py's session-13 probes
  at all three training shapes (H200; mgpu_train_dx_h200_2026-11-28_s13c/d).

  tokens: dy rows per CTA (wgmma N, a multiple of 8, <= 256); block_n:
  contraction rows per step; stages: steps in flight; grid_tile_width:
  output tiles per stripe of the persistent walk; code_swizzle: the code
  tile's shared-memory swizzle in bytes (64: conflict-free loads; 0:
  none)."""
  tokens: int = 256
  block_n: int = 64
  stages: int = 4
  grid_tile_width: int = 4
  code_swizzle: int = 64


def check_shapes(m: int, n: int, k: int, group_size: int,
                 cfg: DxConfig) -> None:
  """Raises ValueError naming the first shape rule (M, N, K, g) broken."""
  half = k // 2
  rules = (
      (k % 2 == 0, f"K={k} must be even (two 4-bit planes)"),
      (cfg.tokens % 8 == 0 and cfg.tokens <= 256,
       f"tokens={cfg.tokens} must be a multiple of 8, at most 256 (wgmma N)"),
      (m % cfg.tokens == 0, f"M={m} must be a multiple of tokens="
       f"{cfg.tokens}"),
      (n % cfg.block_n == 0 and cfg.block_n % 32 == 0,
       f"N={n} must be a multiple of block_n={cfg.block_n} (itself a "
       "multiple of 32: one `ldmatrix.x4` reads 32 rows)"),
      (group_size % COLS == 0, f"group size {group_size} must be a multiple "
       f"of {COLS}"),
      (half % group_size == 0,
       f"K/2={half} must be a multiple of the group size {group_size}"),
      (cfg.code_swizzle in (0, 64),
       f"code_swizzle={cfg.code_swizzle} must be 0 or 64"),
  )
  mg.raise_first_broken(rules)


def _code_transforms(swizzle: int):
  """The code tile's shared-memory layout: 8-row tiles of 64-byte rows,
  swizzled unless `swizzle` is 0."""
  if swizzle == 0:
    return (plgpu.TilingTransform((8, COLS)),)
  return (plgpu.TilingTransform((8, COLS)), plgpu.SwizzleTransform(swizzle))


def _i32(value) -> ir.Value:
  return mgpu_utils.c(value, ir.IntegerType.get_signless(32))


def _swizzled(addr: ir.Value, swizzle: int) -> ir.Value:
  """Hopper's shared-memory swizzle of byte offset `addr` (from a buffer
  aligned to the swizzle's 8-row atom): the 16-byte chunk index XORed with
  the row of the atom, `addr ^ (((addr >> 7) & (swizzle / 16 - 1)) << 4)`."""
  if swizzle == 0:
    return addr
  chunk = arith.andi(arith.shrui(addr, _i32(7)), _i32(swizzle // 16 - 1))
  return arith.xori(addr, arith.shli(chunk, _i32(4)))


def _thread_coords():
  """(warp in warpgroup, lane // 4, lane % 4, warpgroup) as i32 values."""
  tid = mgpu_utils.thread_idx()
  lane = arith.andi(tid, _i32(31))
  warp = arith.andi(arith.shrui(tid, _i32(5)), _i32(3))
  return (warp, arith.shrui(lane, _i32(2)), arith.andi(lane, _i32(3)),
          arith.andi(arith.shrui(tid, _i32(7)), _i32(1)))


def _pair_loads(base, first_row: ir.Value, col: int,
                swizzle: int) -> list[ir.Value]:
  """Four 8x8 16-bit blocks of the code tile read transposed (`ldmatrix
  .x4 .trans`): block i covers rows `first_row + 8 i + (0..7)` and
  byte columns `col + (0..15)`; lane L gives the address of row
  `first_row + L` and receives, per block, bytes `2 q, 2 q + 1` of rows
  `8 i + 2 r` and `8 i + 2 r + 1` (L = 4 q + r) in one 32-bit register."""
  i8, i32 = (ir.IntegerType.get_signless(b) for b in (8, 32))
  addr = arith.addi(arith.muli(first_row, _i32(ROW_BYTES)), col)
  ptr = mgpu_utils.getelementptr(base, [_swizzled(addr, swizzle)], i8)
  loaded = nvvm.ldmatrix(
      ptr, num=4, layout=nvvm.MMALayout.col,
      shape=ir.Attribute.parse("#nvvm.ld_st_matrix_shape<m=8, n=8>"),
      elt_type=nvvm.LdStMatrixEltType.B16)
  return [llvm.extractvalue(i32, loaded, [i]) for i in range(4)]


# One register of a row pair's bytes ($1 = [row n: byte j, j + 1 | row n + 1:
# byte j, j + 1]) -> the nibbles of byte j + h of both rows in the low bits
# of the pair's 16-bit lanes: shifted right by 8 h + p ($2; plane 1's nibble
# lands in bits 3-6), masked and given bf16's exponent for 128 ($3 the
# plane's mask; (t & $3) | 0x43004300).
_PAIR_PTX = ("{ .reg .b32 t; shr.b32 t, $1, $2; "
             "lop3.b32 $0, t, $3, 0x43004300, 0xEA; }")


def transposed_params(scale: jax.Array, zero_point: jax.Array | None,
                      dtype=jnp.bfloat16) -> jax.Array:
  """`(N, G)` scales and zero points -> `(2, G/2, 2 N)`: for plane p and its
  group g, row pair m = 8 a + 4 b + r's `[zb[2m], zb[2m+1], sb[2m],
  sb[2m+1]]` at `4 (8 a + 2 r + b)`, with `zb = 128 + f z`, `sb = s / f`,
  f = PLANE_FACTOR[p] (exact in `dtype`): a thread (lane 4 q + r) finds its
  column pairs of two consecutive 8-row chunks (b = 0, 1) in one 16-byte
  load, and the warp's four r in one 64-byte line. Symmetric codes
  (`zero_point` None) take the implicit zero point 8. N must be a multiple
  of 16."""
  n, g = scale.shape
  z = jnp.full((n, g), 8, dtype) if zero_point is None else zero_point
  f = jnp.repeat(jnp.asarray(mg.PLANE_FACTOR, dtype), g // 2)
  pair = jnp.stack([z.astype(dtype) * f + 128, scale.astype(dtype) * (1 / f)])
  # [which, a, b, r, parity, g] -> [g, a, r, b, which, parity]: one transpose.
  quad = pair.reshape(2, n // 16, 2, 4, 2, g).transpose(5, 1, 3, 2, 0, 4)
  return quad.reshape(2, g // 2, 2 * n)


def transposed_weights(q_ref, p_ref, block_n: int, swizzle: int
                       ) -> jax.Array:
  """`(64, block_n)` bf16 A operand of this warpgroup's plane p: row
  `16 w + 8 h + q` (see the module docstring) and column n hold
  `((128 + f q_p[n, j]) - zb[n]) sb[n]`, `j = 16 w + 2 q + h`, from the
  `(block_n, 64)` uint8 code tile `q_ref` and the `(2, 1, 2 block_n)`
  `transposed_params` block `p_ref`, both in shared memory. Per step a
  thread issues block_n / 32 `ldmatrix` (codes) and block_n / 16 16-byte
  loads (parameters), and per pair of weights `shr`, `lop3`, `HSUB2`,
  `HMUL2`."""
  layout = plgpu.Layout.WGMMA
  regs_shape = mgpu.WGMMA_LAYOUT.registers_shape((COLS, block_n))

  @plgpu.inline_mgpu(
      arg_types=(plgpu.RefType(_code_transforms(swizzle)), plgpu.RefType()),
      return_type=plgpu.ShapeDtypeStruct((COLS, block_n), jnp.bfloat16,
                                         layout=layout))
  def build(_, q_ref, p_ref):
    i8, i32 = (ir.IntegerType.get_signless(b) for b in (8, 32))
    pair = ir.VectorType.get((2,), ir.BF16Type.get())
    quad = ir.VectorType.get((4,), i32)
    warp, _, r, plane = _thread_coords()
    lane = arith.andi(mgpu_utils.thread_idx(), _i32(31))
    col = arith.muli(warp, _i32(16))
    mask = arith.addi(_i32(mg.NIBBLE_MASKS[0]), arith.muli(
        plane, _i32(mg.NIBBLE_MASKS[1] - mg.NIBBLE_MASKS[0])))
    shifts = (plane, arith.addi(plane, _i32(8)))
    codes, params = mgpu_utils.memref_ptr(q_ref), mgpu_utils.memref_ptr(p_ref)
    param_base = arith.addi(arith.muli(plane, _i32(block_n * 4)),
                            arith.muli(r, _i32(16)))
    pairs = []
    for first_row in range(0, block_n, 32):
      pairs += _pair_loads(codes, arith.addi(lane, _i32(first_row)), col,
                           swizzle)
    regs = np.empty(regs_shape, dtype=object)
    for a in range(block_n // 16):
      both = llvm.load(quad, mgpu_utils.getelementptr(
          params, [arith.addi(param_base, _i32(64 * a))], i8), alignment=16)
      for b in (0, 1):
        cj = 2 * a + b
        zb, sb = (mgpu_utils.bitcast(
            llvm.extractelement(both, mgpu_utils.c(2 * b + i, i32)), pair)
                  for i in (0, 1))
        for h in (0, 1):
          bits = llvm.inline_asm(i32, [pairs[cj], shifts[h], mask],
                                 _PAIR_PTX, "=r,r,r,r")
          idx = [0] * len(regs_shape)
          idx[1], idx[4] = cj, h
          regs[tuple(idx)] = arith.mulf(
              arith.subf(mgpu_utils.bitcast(bits, pair), zb), sb)
    return mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT,
                                _is_signed=None)

  return build(q_ref, p_ref)


def store_untransposed(acc: jax.Array, out_ref, tokens: int) -> None:
  """Stores the `(64, tokens)` bf16 accumulator of permuted rows (WGMMA
  layout) as the `(tokens, 64)` tile `out_ref` (128-byte swizzle): the
  thread's rows h = 0, 1 are output columns `j, j + 1` (`j = 16 w + 2 q`),
  paired per token by one `prmt` into a 32-bit word."""
  regs_shape = mgpu.WGMMA_LAYOUT.registers_shape((COLS, tokens))

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA,
                 plgpu.RefType(mg.swizzled(jnp.bfloat16, COLS))))
  def store(_, acc, ref):
    i8, i32 = (ir.IntegerType.get_signless(b) for b in (8, 32))
    warp, q, r, _ = _thread_coords()
    col_bytes = arith.addi(arith.muli(warp, _i32(32)), arith.muli(q, _i32(4)))
    base = mgpu_utils.memref_ptr(ref)
    first_token = arith.muli(r, _i32(2))
    for ct in range(tokens // 8):
      idx = [0] * len(regs_shape)
      idx[1] = ct
      words = []
      for h in (0, 1):
        idx[4] = h
        words.append(mgpu_utils.bitcast(acc.registers[tuple(idx)], i32))
      for u, sel in ((0, 0x5410), (1, 0x7632)):
        word = llvm.inline_asm(
            i32, words, f"prmt.b32 $0, $1, $2, {sel:#06x};", "=r,r,r")
        token = arith.addi(first_token, _i32(8 * ct + u))
        addr = arith.addi(arith.muli(token, _i32(OUT_ROW_BYTES)), col_bytes)
        llvm.store(word, mgpu_utils.getelementptr(
            base, [_swizzled(addr, 128)], i8))
    return ()

  store(acc, out_ref)


def fused_dx(dy: jax.Array, codes: jax.Array, params: jax.Array, *,
             group_size: int, cfg: DxConfig = DxConfig(),
             num_sms: int = 132) -> jax.Array:
  """`dx (M, K)` from dy `(M, N)` bf16, planar codes `(N, K/2)` uint8 and
  `transposed_params` `(2, G/2, 2 N)`."""
  m, n = dy.shape
  half = codes.shape[1]
  k = 2 * half
  check_shapes(m, n, k, group_size, cfg)
  groups = k // group_size
  if codes.shape != (n, half) or codes.dtype != jnp.uint8:
    raise ValueError(f"codes must be uint8 ({n}, {half}), got "
                     f"{codes.dtype} {codes.shape}")
  if params.shape != (2, groups // 2, 2 * n):
    raise ValueError(f"params must be {(2, groups // 2, 2 * n)}, got "
                     f"{params.shape}")
  tokens, bn = cfg.tokens, cfg.block_n
  steps = n // bn
  m_iters, c_iters = m // tokens, half // COLS
  dtype = dy.dtype

  def qmatmul_dx_mgpu(dy_gmem, q_gmem, p_gmem, out_gmem, out_smem):
    get_pipeline = mg.pipeline_maker([
        plgpu.BlockSpec((tokens, bn), lambda s: (0, s),
                        transforms=mg.swizzled(dtype, bn)),
        plgpu.BlockSpec((bn, COLS), lambda s: (s, 0),
                        transforms=_code_transforms(cfg.code_swizzle)),
        plgpu.BlockSpec((2, 1, 2 * bn), lambda s: (0, 0, s)),
    ], steps, cfg.stages)

    @mg.allocated(get_pipeline, (dy_gmem, q_gmem, p_gmem))
    def _scope(allocs):
      wg = lax.axis_index("wg")

      @plgpu.nd_loop((m_iters * c_iters,), collective_axes="sm")
      def _tiles(info):
        (lin,) = info.index
        c_idx, m_idx = plgpu.planar_snake(lin, (c_iters, m_iters), 1,
                                          cfg.grid_tile_width)
        cta_m = pl.ds(m_idx * tokens, tokens)
        g_lo = (c_idx * COLS) // group_size

        def compute_context(run_pipeline):
          @functools.partial(
              pl.run_scoped, acc_ref=plgpu.ACC((COLS, tokens), jnp.float32))
          def _acc(acc_ref):
            run_pipeline(acc_ref)
            acc = acc_ref[...].astype(dtype)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            store_untransposed(acc, out_smem.at[wg], tokens)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                out_smem.at[wg],
                out_gmem.at[cta_m, pl.ds(wg * half + c_idx * COLS, COLS)])

        def body(_, dy_smem, q_smem, p_smem, acc_ref):
          w_t = transposed_weights(q_smem, p_smem, bn, cfg.code_swizzle)
          plgpu.wgmma(acc_ref, w_t, mg._transposed(dy_smem))  # pylint: disable=protected-access
          plgpu.wgmma_wait(0)
          return acc_ref

        get_pipeline(body, compute_context, mg.tile_state(
            info, steps, cfg.stages))(
            dy_gmem.at[cta_m, :], q_gmem.at[:, pl.ds(c_idx * COLS, COLS)],
            p_gmem.at[:, pl.ds(g_lo, 1)], allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  return mg.launch(
      qmatmul_dx_mgpu, (m, k), dtype, num_sms,
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
  accepts (double-quantized scales are expanded first)."""
  from qft_jax._src import qarray as qa  # pylint: disable=g-import-not-at-top
  ok, reason = can_use(dy2d, w, cfg)
  if not ok:
    raise ValueError(f"qmatmul_mgpu_dx.dx cannot run: {reason}")
  params = transposed_params(qa.dense_scale(w), w.zero_point, dy2d.dtype)
  return fused_dx(dy2d, w.qvalue, params,
                  group_size=qa.resolve_group_size(w.group_size, w.shape[1]),
                  cfg=cfg, num_sms=jax.devices()[0].core_count)
