r"""Training-shape forward on Hopper through Mosaic GPU (4-bit uniform codes).

    y (M, N) = x (M, K) @ deq(W)^T,   deq(W)[n, k] = (q[n, k] - z[n, g]) s[n, g]

computed transposed, `y^T (N, M) = deq(W) (N, K) @ x^T (K, M)`, so the
dequantized weight tile is wgmma's register (A) operand and x's tile, as TMA
brought it, its shared-memory (B) operand read transposed. The layout is
jax's int8 x bf16 example's (`hopper_mixed_type_matmul_mgpu`): a persistent
grid of one CTA per SM walking the output tiles, two compute warpgroups of
`rows` weight rows each sharing one x tile, and a memory warpgroup feeding a
`stages`-deep TMA pipeline over the contraction.

Codes are `qft_jax`'s planar 4-bit bytes: byte j of row n holds column j in
its low nibble and column K/2 + j in its high nibble. One pipeline step
takes `block_kb` bytes of `2 * rows` weight rows and two x tiles (columns
`j..j+block_kb` and `K/2 + j..`), and per warpgroup issues

    acc += ((128 + lo) - (128 + z_lo)) s_lo @ x_lo^T
         + ((128 + 8 hi) - (128 + 8 z_hi)) (s_hi / 8) @ x_hi^T

with `128 + lo` and `128 + 8 hi` made from the bytes by bit operations
alone (`biased_codes`: the nibble placed under bf16's exponent for 128;
three PTX instructions per pair of codes, `biased_codes_ptx`, where Mosaic
GPU's own int8 -> bf16 conversion spends about eight). Each bracket is exact
in bf16 (integers below 256), so every weight is rounded once, as in the
XLA path. `block_kb` divides the group size and K/2 is a multiple of it,
so each plane of a step lies in one group: the step's group parameters are
one `(s, z)` pair of vectors per plane, broadcast along the row
(`group_params` lays them out as `(G, 2, N)` with one transpose; the
brackets' `128 + f z` and `s / f` are made in registers).

Each CTA runs one pipeline per output tile; the tiles' pipelines are
chained (`tile_state`), so the memory warpgroup loads the next tile's
first steps while the compute warpgroups run the epilogue.

The epilogue stores each warpgroup's `(rows, tokens)` accumulator into a
transposed shared-memory view and TMA copies `y`'s `(tokens, rows)` tiles
out, so no transpose runs outside the kernel. `qmatmul.fwd` takes this
kernel for 4-bit uniform weights at training shapes on Hopper (`can_use`;
`fwd` on a QArray); everywhere else the Triton kernels run.

Hopper only (wgmma, TMA), jax >= 0.11 (`MIN_JAX`). There is no interpreter
for a register-operand wgmma, so the CPU tests check `dequantize_plane` (the
function the kernel body calls) bit for bit against `qa.dequantize` and
lower the kernel for CUDA; the GPU tests compare it with the float32
`pallas_kernels.reference`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

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

BITS = 4
MIN_M = 1024  # measured at M = 4096 (experiments/bench_mgpu_train.py)
DTYPES = (jnp.dtype(jnp.bfloat16),)
# jax 0.10's Mosaic GPU cannot infer the layouts of the transposed epilogue
# store ("Failed to infer a possible set of layouts"); 0.11 lowers it.
MIN_JAX = (0, 11)


def jax_supports() -> bool:
  """Whether this jax lowers the kernel (see MIN_JAX)."""
  return tuple(int(p) for p in jax.__version__.split(".")[:2]) >= MIN_JAX


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
  """Tile geometry. The defaults won experiments/bench_mgpu_train.py's run 2
  at all three training shapes (mgpu_train_h100_2026-11-28.json).

  rows: weight rows per compute warpgroup (wgmma M, a multiple of 64); a
    CTA covers `2 * rows`.
  tokens: activation rows per CTA (wgmma N, a multiple of 8, <= 256).
  block_kb: packed bytes (columns per plane) per pipeline step.
  stages: pipeline steps in flight.
  grid_tile_width: output tiles per stripe of the persistent walk
    (`plgpu.planar_snake`), for L2 reuse.
  epi_rows: weight rows per epilogue store (a multiple of 64 dividing
    `rows`; two stores in flight when `rows` holds two).
  """
  rows: int = 64
  tokens: int = 256
  block_kb: int = 64
  stages: int = 2
  grid_tile_width: int = 4
  epi_rows: int = 64


def group_params(scale: jax.Array, zero_point: jax.Array | None,
                 dtype=jnp.bfloat16) -> jax.Array:
  """`(N, G)` scales and zero points -> `(G, 2, N)`: s, z in `dtype`.

  One 2-D transpose of the stacked `(2 N, G)` pair (XLA's tiled transpose
  kernel). Symmetric codes (`zero_point` None) take the implicit zero
  point 8."""
  n, g = scale.shape
  z = jnp.full((n, g), 8, dtype) if zero_point is None else zero_point
  pair = jnp.stack([scale.astype(dtype), z.astype(dtype)])  # (2, N, G)
  return pair.reshape(2 * n, g).T.reshape(g, 2, n)


# bf16 bits 0x4300 | m (m < 128) are the number 128 + m: a code placed in
# the low mantissa bits under this exponent is converted by bit operations.
BF16_128 = 0x4300
PLANE_FACTOR = (1, 8)  # plane 1's nibble lands 8x (bits 3-6 of the mantissa)
# Each plane's nibble in both 16-bit lanes, after plane 1's shift by one.
NIBBLE_MASKS = (0x000F000F, 0x00780078)


def biased_codes(q: jax.Array, plane: int) -> jax.Array:
  """`(R, C)` bf16 `128 + PLANE_FACTOR[plane] * nibble` of uint8 planar
  bytes `q` (low nibble: plane 0, high: plane 1), made by bit operations:
  `0x4300 | (q & 0x0F)` and `0x4300 | ((q >> 1) & 0x78)` on 16-bit lanes.
  Plain jnp (any backend); the kernels run `biased_codes_ptx`, the same
  bits in three PTX instructions per pair of codes."""
  wide = q.astype(jnp.uint16)
  nibble = wide & 0x0F if plane == 0 else (wide >> 1) & 0x78
  return lax.bitcast_convert_type(nibble | BF16_128, jnp.bfloat16)


# PTX per register (two codes: bytes 0, 1 of $1): spread the bytes into the
# low bytes of two 16-bit lanes (prmt), keep the nibble and set the
# exponent bits ((a & b) | c, lop3's table 0xEA). Plane 1 first shifts the
# pair right by one bit, so its nibble sits in bits 3-6.
_SPREAD = "prmt.b32 t, {src}, 0, 0x4140;"
_MASK = "lop3.b32 $0, t, {mask:#010x}, " + f"{BF16_128 * 0x10001:#010x}, 0xEA;"
_PTX = (
    "{ .reg .b32 t; " + _SPREAD.format(src="$1") + " "
    + _MASK.format(mask=NIBBLE_MASKS[0]) + " }",
    "{ .reg .b32 t; shr.b32 t, $1, 1; " + _SPREAD.format(src="t") + " "
    + _MASK.format(mask=NIBBLE_MASKS[1]) + " }",
)


def biased_codes_ptx(q: jax.Array, plane: int) -> jax.Array:
  """`biased_codes` inside a Mosaic GPU kernel: uint8 `q` in the WGMMA
  layout (two adjacent codes per register) to bf16 in the same layout."""
  layout = plgpu.Layout.WGMMA

  @plgpu.inline_mgpu(arg_types=(layout,), return_type=plgpu.ShapeDtypeStruct(
      q.shape, jnp.bfloat16, layout=layout))
  def convert(_, codes):
    i16, i32 = (ir.IntegerType.get_signless(b) for b in (16, 32))
    pair = ir.VectorType.get((2,), ir.BF16Type.get())
    out = np.empty_like(codes.registers)
    for idx, reg in np.ndenumerate(codes.registers):
      word = arith.extui(i32, mgpu_utils.bitcast(reg, i16))
      bits = llvm.inline_asm(i32, [word], _PTX[plane], "=r,r")
      out[idx] = mgpu_utils.bitcast(bits, pair)
    return mgpu.FragmentedArray(_registers=out, _layout=codes.layout,
                                _is_signed=None)

  return convert(q)


def dequantize_plane(q: jax.Array, plane: int, s: jax.Array, z: jax.Array,
                     codes=biased_codes_ptx) -> jax.Array:
  """One plane's bf16 weights from a byte tile, as the kernels compute them.

  Args:
    q: uint8 `(R, C)` planar bytes (low nibble: plane 0, high: plane 1).
    plane: 0 or 1 (static).
    s, z: the plane's group scale and zero point, bf16 row vectors `(R,)`
      (its rows of `group_params`).
    codes: `biased_codes_ptx` (in a kernel) or `biased_codes` (anywhere).

  Returns:
    `(R, C)` weights `(q - z) s`, each rounded once to bf16: with `f` =
    PLANE_FACTOR[plane], `(128 + f q) - (128 + f z)` is exact in bf16
    (integers below 256) and the product with `s / f` rounds once.
  """
  f = PLANE_FACTOR[plane]
  full = lambda v: lax.broadcast_in_dim(v, q.shape, (0,))
  return (codes(q, plane) - full(z * f + 128)) * full(s * (1 / f))


def check_shapes(m: int, n: int, k: int, group_size: int,
                 cfg: MgpuConfig) -> None:
  """Raises ValueError naming the first shape rule (M, N, K, g) broken."""
  half = k // 2
  rules = (
      (k % 2 == 0, f"K={k} must be even (two 4-bit planes)"),
      (n % (2 * cfg.rows) == 0,
       f"N={n} must be a multiple of 2 * rows = {2 * cfg.rows}"),
      (m % cfg.tokens == 0, f"M={m} must be a multiple of tokens="
       f"{cfg.tokens}"),
      (group_size % cfg.block_kb == 0,
       f"group size {group_size} must be a multiple of block_kb="
       f"{cfg.block_kb}"),
      (half % group_size == 0,
       f"K/2={half} must be a multiple of the group size {group_size}"),
      (cfg.rows % 64 == 0 and cfg.epi_rows % 64 == 0
       and cfg.rows % cfg.epi_rows == 0,
       f"rows={cfg.rows} must be a multiple of 64 and of epi_rows="
       f"{cfg.epi_rows}"),
  )
  raise_first_broken(rules)


def raise_first_broken(rules) -> None:
  """Raises ValueError with the message of the first `(ok, message)` rule
  that does not hold."""
  for ok, message in rules:
    if not ok:
      raise ValueError(message)


def check_operands(codes: jax.Array, params: jax.Array, n: int, k: int,
                   group_size: int) -> None:
  """Raises ValueError unless codes are uint8 `(N, K/2)` and params
  `(G, 2, N)`, G = K / group_size."""
  if codes.shape != (n, k // 2) or codes.dtype != jnp.uint8:
    raise ValueError(f"codes must be uint8 ({n}, {k // 2}), got "
                     f"{codes.dtype} {codes.shape}")
  if params.shape != (k // group_size, 2, n):
    raise ValueError(f"params must be {(k // group_size, 2, n)}, got "
                     f"{params.shape}")


def _transposed(ref):
  """`ref` read as its transpose (jax 0.11's `ref.transpose`, older
  `plgpu.transpose_ref`)."""
  if hasattr(ref, "transpose"):
    return ref.transpose((1, 0))
  return plgpu.transpose_ref(ref, (1, 0))


def load_whole(ref, layout):
  """`plgpu.load` of the whole ref (jax 0.10 takes an index argument)."""
  idx = inspect.signature(plgpu.load).parameters["idx"]
  if idx.default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def swizzled(dtype, minor: int):
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)),
          plgpu.SwizzleTransform(swizzle))


def fused_fwd(x: jax.Array, codes: jax.Array, params: jax.Array, *,
              group_size: int, cfg: MgpuConfig = MgpuConfig(),
              num_sms: int = 132) -> jax.Array:
  """`y (M, N)` from x `(M, K)` bf16, the planar codes `(N, K/2)` uint8
  and `group_params` `(G, 2, N)`."""
  m, k = x.shape
  n = codes.shape[0]
  check_operands(codes, params, n, k, group_size)
  check_shapes(m, n, k, group_size, cfg)
  rows, tokens, kb = cfg.rows, cfg.tokens, cfg.block_kb
  cta_rows = 2 * rows
  steps = (k // 2) // kb
  half_groups = (k // 2) // group_size
  steps_per_group = group_size // kb
  n_iters, m_iters = n // cta_rows, m // tokens
  dtype = x.dtype
  epi = cfg.epi_rows
  slots = min(2, rows // epi)  # epilogue buffers per warpgroup

  def qmatmul_fwd_mgpu(q_gmem, x_gmem, p_gmem, out_gmem, out_smem):
    get_pipeline = pipeline_maker([
        plgpu.BlockSpec((cta_rows, kb), lambda s: (0, s),
                        transforms=swizzled(jnp.uint8, kb)),
        plgpu.BlockSpec((tokens, kb), lambda s: (0, s),
                        transforms=swizzled(dtype, kb)),
        plgpu.BlockSpec((tokens, kb), lambda s: (0, steps + s),
                        transforms=swizzled(dtype, kb)),
        plgpu.BlockSpec((1, 2, cta_rows),
                        lambda s: (s // steps_per_group, 0, 0)),
        plgpu.BlockSpec((1, 2, cta_rows),
                        lambda s: (half_groups + s // steps_per_group, 0, 0)),
    ], steps, cfg.stages)

    @allocated(get_pipeline, (q_gmem, x_gmem, x_gmem, p_gmem, p_gmem))
    def _scope(allocs):
      wg = lax.axis_index("wg")
      wg_rows = pl.ds(wg * rows, rows)

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
      def _tiles(info):
        (lin,) = info.index
        n_idx, m_idx = plgpu.planar_snake(lin, (n_iters, m_iters), 1,
                                          cfg.grid_tile_width)
        cta_n = pl.ds(n_idx * cta_rows, cta_rows)
        cta_m = pl.ds(m_idx * tokens, tokens)

        def compute_context(run_pipeline):
          @functools.partial(
              pl.run_scoped, acc_ref=plgpu.ACC((rows, tokens), jnp.float32))
          def _acc(acc_ref):
            run_pipeline(acc_ref)
            acc = acc_ref[...].astype(dtype)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for e in range(rows // epi):
              slot = e % slots
              plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
              _transposed(out_smem.at[wg, slot])[...] = (
                  acc[e * epi:(e + 1) * epi])
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(
                  out_smem.at[wg, slot],
                  out_gmem.at[cta_m, cta_n].at[:, wg_rows].at[
                      :, pl.ds(e * epi, epi)])

        def body(_, q_smem, xlo_smem, xhi_smem, plo_smem, phi_smem,
                 acc_ref):
          q = q_smem[wg_rows]
          w_lo = dequantize_plane(q, 0, *load_params(plo_smem, wg_rows))
          w_hi = dequantize_plane(q, 1, *load_params(phi_smem, wg_rows))
          plgpu.wgmma(acc_ref, w_lo, _transposed(xlo_smem))
          plgpu.wgmma(acc_ref, w_hi, _transposed(xhi_smem))
          plgpu.wgmma_wait(0)
          return acc_ref

        get_pipeline(body, compute_context, tile_state(info, steps,
                                                       cfg.stages))(
            q_gmem.at[cta_n, :], x_gmem.at[cta_m, :], x_gmem.at[cta_m, :],
            p_gmem.at[:, :, cta_n], p_gmem.at[:, :, cta_n],
            allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  return launch(qmatmul_fwd_mgpu, (m, n), dtype, num_sms, out_smem=plgpu.SMEM(
      (2, slots, tokens, epi), dtype, transforms=swizzled(dtype, epi)))(
          codes, x, params)


def pipeline_maker(in_specs, steps: int, stages: int):
  """`(body, compute_context, state=None) -> pipeline`: a warp-specialized
  TMA pipeline of `steps` over `in_specs`, two compute warpgroups, `stages`
  in flight; `state` chains it to the previous tile's (`tile_state`)."""

  def make(body, compute_context, state=None):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=40, in_specs=in_specs,
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages,
        compute_context=compute_context, pipeline_state=state)
  return make


def tile_state(info, steps: int, stages: int):
  """The pipeline state of a persistent loop's tile (`plgpu.nd_loop` info):
  START on a CTA's first tile, STOP on its last, STEADY between, so the
  memory warpgroup runs on into the next tile's loads instead of draining
  the pipeline. None (a pipeline per tile) unless `stages` divides `steps`,
  as chaining needs. A CTA's only tile is START: its last arrivals are
  left unawaited at the kernel's end, which is harmless."""
  if steps % stages:
    return None
  chain = plgpu.PipelinePipeline
  last = info.num_local_steps - 1
  return jnp.where(info.local_index == 0, int(chain.START),
                   jnp.where(info.local_index == last, int(chain.STOP),
                             int(chain.STEADY)))


def load_params(p_smem, rows=slice(None)):
  """A plane's `(s, z)` row vectors, WGMMA row layout, from its `(1, 2, R)`
  `group_params` block (`rows` of it)."""
  row_vec = plgpu.Layout.WGMMA.reduce(1)
  return (load_whole(p_smem.at[0, 0, rows], row_vec),
          load_whole(p_smem.at[0, 1, rows], row_vec))


def allocated(get_pipeline, gmem_refs):
  """Decorator: runs `fn(allocs)` with the pipeline's shared buffers
  allocated once for all the persistent loop's tiles (by all warpgroups)."""
  ignore = lambda *_, **__: None
  allocs = get_pipeline(ignore, ignore).get_allocations(*gmem_refs)
  return functools.partial(pl.run_scoped, allocs=allocs, collective_axes="wg")


def launch(kernel, out_shape, dtype, num_sms: int, **scratch):
  """`kernel` as a persistent warp-specialized Mosaic GPU kernel: one CTA
  per SM (grid axis "sm"), two compute warpgroups and a memory warpgroup
  (axis "wg"), Warpgroup lowering semantics."""
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct(out_shape, dtype),
      grid=(num_sms,),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      scratch_types=scratch)


def qmatmul_fwd(x: jax.Array, qvalue: jax.Array, scale: jax.Array,
                zero_point: jax.Array | None, *, group_size: int,
                cfg: MgpuConfig = MgpuConfig(), num_sms: int = 132
                ) -> jax.Array:
  """`y (M, N) = x @ deq(W)^T` for a 4-bit QArray's leaves (qvalue
  `(N, K/2)` uint8, dense scale and optional zero point `(N, G)`)."""
  params = group_params(scale, zero_point, x.dtype)
  return fused_fwd(x, qvalue, params, group_size=group_size,
                   cfg=cfg, num_sms=num_sms)


def gate_reason(a2d: jax.Array, w, cols: int, name: str) -> str | None:
  """None when the device, jax, the weight and `a2d`'s dtype and size suit
  the Mosaic kernels (`cols`: the columns `a2d` must have), else why."""
  from qft_jax._src import qarray as qa  # pylint: disable=g-import-not-at-top
  if not jax_supports():
    return f"jax {jax.__version__} < {MIN_JAX} cannot lower it"
  if jax.default_backend() != "gpu":
    return f"the default backend is {jax.default_backend()!r}"
  cc = getattr(jax.devices()[0], "compute_capability", None)
  if cc is None or not str(cc).startswith("9."):
    return f"compute capability {cc} is not Hopper's 9.x"
  if not isinstance(w, qa.QArray) or w.batch_shape:
    return "the weight is not a QArray without batch axes"
  if w.bits != BITS or w.codebook is not None:
    return f"{w.bits}-bit codes (codebook {w.codebook}) are not 4-bit uniform"
  if w.zero_point is not None and w.zero_point.dtype != jnp.uint8:
    return f"zero points must be uint8, got {w.zero_point.dtype}"
  if a2d.ndim != 2 or jnp.dtype(a2d.dtype) not in DTYPES:
    return f"{name} must be 2-D bf16, got {a2d.dtype} {tuple(a2d.shape)}"
  if a2d.shape[1] != cols:
    return f"{name} has {a2d.shape[1]} columns, the weight needs {cols}"
  if a2d.shape[0] < MIN_M:
    return f"M={a2d.shape[0]} < {MIN_M} (decode and prefill: Triton)"
  return None


def gate(a2d: jax.Array, w, op: str, shape_rules, cfg) -> tuple[bool, str]:
  """`gate_reason` for `op` ("fwd": a2d is x `(M, K)`; "dx": dy `(M, N)`),
  then `shape_rules(M, N, K, g, cfg)`: (ok, the first reason or "ok")."""
  from qft_jax._src import qarray as qa  # pylint: disable=g-import-not-at-top
  axis, name = (1, "x") if op == "fwd" else (0, "dy")
  reason = gate_reason(a2d, w, w.shape[axis] if hasattr(w, "shape") else -1,
                       name)
  if reason is None:
    n, k = w.shape
    try:
      shape_rules(a2d.shape[0], n, k, qa.resolve_group_size(w.group_size, k),
                  cfg)
    except ValueError as e:
      reason = str(e)
  return reason is None, reason or "ok"


def can_use(x2d: jax.Array, w, cfg: MgpuConfig = MgpuConfig()
            ) -> tuple[bool, str]:
  """Whether `fwd(x2d, w)` can run, and if not, why (a sentence): a Hopper
  GPU (compute capability 9.x), jax >= MIN_JAX, a 4-bit uniform QArray
  without batch axes, bf16 x `(M, K)` with M >= MIN_M and the shapes
  `check_shapes` accepts."""
  return gate(x2d, w, "fwd", check_shapes, cfg)


def fwd(x2d: jax.Array, w, cfg: MgpuConfig = MgpuConfig()) -> jax.Array:
  """`x2d (M, K) @ dequantize(w)^T -> (M, N)` for a QArray `can_use`
  accepts (double-quantized scales are expanded first)."""
  from qft_jax._src import qarray as qa  # pylint: disable=g-import-not-at-top
  ok, reason = can_use(x2d, w, cfg)
  if not ok:
    raise ValueError(f"qmatmul_mgpu.fwd cannot run: {reason}")
  return qmatmul_fwd(x2d, w.qvalue, qa.dense_scale(w), w.zero_point,
                     group_size=qa.resolve_group_size(w.group_size, w.shape[1]),
                     cfg=cfg, num_sms=jax.devices()[0].core_count)
