"""Fused input-gradient kernel: `dx = dy @ dequantize(W)` from packed codes.

Each program owns the output columns of one word tile `[j0, j0 + bc)` in every
plane, i.e. the P column stripes `i * Kw + [j0, j0 + bc)` of
`dx[m0:m0+bm, :]`, and walks N (the contraction) `bn` weight rows at a time:

    acc_i(bm, bc) += dy[m-tile, n-tile] @ deq(W[n-tile, plane i, j0:j0+bc])

so each packed byte is read once per M tile. With `scale_mode="activations"`
the group scale multiplies the `(bm, bn)` dy tile instead of the `(bn, bc)`
weight tile: `(dy * s^T) @ (q - z)`, the weight tile holding exact integers.
Rows of dy past M and weight rows past N are masked (read as 0). With
`split_k = S > 1` (decode), S programs share each output tile, each walking
one slice of N, and XLA sums their float32 partials `(S, M, K)` (or, with
`split_reduce="kernel"`, the last program of each tile does). With
`prefetch = D` the loop carries the next D steps' loads, `lookup` picks
how codebook levels are formed and `unpack` how uniform codes are unpacked
(see qmatmul_fwd and tiles).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import tiles
from pallas_kernels import tuning as tuning_lib
from qft_jax._src import qarray as qa


def _dx_kernel(dy_ref, *refs, m: int, layout: tiles.Layout, bm: int, bn: int,
               bc: int, scale_mode: str, split: int, prefetch: int,
               lookup: str, ptx: bool | None, reduce_in_kernel: bool,
               interpret: bool):
  q_ref, s_ref, z_ref, cb_ref, rest = tiles.split_weight_refs(refs, layout,
                                                              lookup)
  o_ref = rest[-1]  # the outputs follow any aliased inputs in `rest`
  num_k = layout.kw // bc
  pid = pl.program_id(0) // split
  pid_m, pid_k = pid // num_k, pid % num_k
  j0 = pl.multiple_of(pid_k * bc, bc)
  m_rows = tiles.row_ids(pid_m * bm, bm)
  m_mask = m_rows < m
  m_slice = pl.ds(pid_m * bm, bm)
  dtype = dy_ref.dtype
  groups = [tiles.group_index(i, j0, layout) for i in range(layout.planes)]

  def rows_of(t):
    n0 = pl.multiple_of(t * bn, bn)
    return pl.ds(n0, bn), tiles.row_ids(n0, bn) < layout.n

  def step_tiles(t):
    """Packed bytes `(bn, bc)` and dy tile `(bm, bn)` of step t."""
    n_slice, n_mask = rows_of(t)
    byte_tiles = tiles.load_bytes(q_ref, n_slice, n_mask, j0, bc, layout)
    dy = plt.load(dy_ref.at[m_slice, n_slice],
                  mask=m_mask[:, None] & n_mask[None, :], other=0)
    return byte_tiles, dy

  def plane_params(t, i):
    n_slice, n_mask = rows_of(t)
    return tiles.load_group_raw(s_ref, z_ref, n_slice, n_mask, groups[i])

  def compute_step(byte_tiles, dy, params_of_plane, accs):
    if ptx is None:
      codes = tiles.assemble_words(byte_tiles)
    else:  # unpack="ptx": every plane's `bias + q` (or levels) tile at once
      codes = tiles.unpacked_planes(byte_tiles, layout, dtype, ptx)
    new = []
    for i, acc in enumerate(accs):
      s, z = tiles.group_params(*params_of_plane(i))
      c = tiles.plane_codes(codes, i, layout.bits) if ptx is None else None
      if scale_mode == "weights":
        w = (tiles.centered_f32(c, z, cb_ref, layout, lookup)
             * s[:, None]).astype(dtype)
        lhs = dy
      else:
        w = (tiles.centered_exact(c, z, cb_ref, layout, lookup, dtype)
             if ptx is None else tiles.ptx_weight_tile(codes[i], z, layout))
        lhs = (dy.astype(jnp.float32) * s[None, :]).astype(dtype)
      new.append(acc + jnp.dot(lhs, w, preferred_element_type=jnp.float32))
    return tuple(new)

  def load_step(t):
    """Every load of step t, issued before any of them is used."""
    return (*step_tiles(t),
            tuple(plane_params(t, i) for i in range(layout.planes)))

  zeros = tuple(jnp.zeros((bm, bc), jnp.float32)
                for _ in range(layout.planes))
  part = pl.program_id(0) % split
  start, stop = tiles.split_range(part, split, pl.cdiv(layout.n, bn))
  if prefetch:  # step t computes while steps t+1 .. t+prefetch load
    accs = tiles.prefetched_loop(
        start, stop, prefetch, load_step,
        lambda loaded, accs: compute_step(loaded[0], loaded[1],
                                          loaded[2].__getitem__, accs), zeros)
  else:  # each plane's scales just before its arithmetic
    accs = lax.fori_loop(
        start, stop, lambda t, accs: compute_step(
            *step_tiles(t), lambda i: plane_params(t, i), accs), zeros)
  mask = jnp.broadcast_to(m_mask[:, None], (bm, bc))
  pieces = [((m_slice, tiles.static_index(i), pl.ds(j0, bc)), acc, mask)
            for i, acc in enumerate(accs)]
  if split > 1 and reduce_in_kernel:
    tiles.store_split_result(*rest[-3:], pid, part, split, pieces, interpret)
    return
  for idx, acc, piece_mask in pieces:
    idx = (part, *idx) if split > 1 else idx
    plt.store(o_ref.at[idx], acc.astype(o_ref.dtype), mask=piece_mask)


def dx(dy2d: jax.Array, w: qa.QArray, *, interpret: bool = False,
       tuning: tuning_lib.TuningConfig | None = None,
       out_init: jax.Array | None = None) -> jax.Array:
  """`dy2d (M, N) @ dequantize(w) -> (M, K)` in dy2d.dtype, f32 accumulate.

  Callers check `qmatmul.can_use_dx` first; this function assumes its checks.
  `out_init`, an `(M, K)` array, fills the output buffer(s) first (see
  qmatmul_fwd).
  """
  layout = tiles.layout_of(w)
  m = dy2d.shape[0]
  cfg = tuning or tuning_lib.choose(
      "dx", m, layout.n, layout.k, layout.bits,
      codebook=layout.codebook is not None, dtype=dy2d.dtype)
  if cfg.contraction != "mma":
    raise ValueError(f"the dx kernel has only the 'mma' contraction, got "
                     f"{cfg.contraction!r}")
  bc = tuning_lib.effective_block_k(cfg.block_k, layout.kw, layout.group)
  bm, bn = cfg.block_m, cfg.block_n
  split = tuning_lib.effective_split(cfg.split_k, pl.cdiv(layout.n, bn))
  in_kernel = cfg.split_reduce == "kernel"
  kernel = functools.partial(_dx_kernel, m=m, layout=layout, bm=bm, bn=bn,
                             bc=bc, scale_mode=cfg.scale_mode, split=split,
                             prefetch=cfg.prefetch, lookup=cfg.lookup,
                             ptx=tiles.ptx_flag(cfg.unpack, layout,
                                                dy2d.dtype, interpret),
                             reduce_in_kernel=in_kernel, interpret=interpret)
  num_tiles = pl.cdiv(m, bm) * (layout.kw // bc)
  grid = (num_tiles * split,)
  operands = [dy2d, *tiles.weight_operands(w, layout, cfg.lookup)]
  # split > 1: float32 partial sums per slice of N, summed by XLA or by the
  # last program of each tile (`split_reduce`).
  out_shape, extra, aliases = tiles.launch_outputs(
      (m, layout.planes, layout.kw), dy2d.dtype, split, in_kernel, num_tiles,
      out_init, len(operands))
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps,
                                         num_stages=cfg.num_stages),
      input_output_aliases=aliases,
      interpret=interpret,
      name=f"qmatmul_dx_{layout.bits}b",
  )(*operands, *extra)
  return tiles.finish(out, split, in_kernel, dy2d.dtype).reshape(m, layout.k)
