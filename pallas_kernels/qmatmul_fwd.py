"""Fused forward kernel: `y = x @ dequantize(W)^T` from packed codes.

Each program owns an output tile `y[m0:m0+bm, n0:n0+bn]` and walks K one word
tile at a time: it loads the packed bytes of `bn` weight rows once, and for
each of the P code planes in them multiplies the matching `bc` columns of x:

    acc(bn, bm) += deq(W_tile[plane i]) @ x[m-tile, i*Kw + j0 : +bc]^T

The dequantized tile exists only in registers / shared memory; the weight is
never written to device memory in float. The accumulator is float32 and held
transposed (weight rows first) so the dequantized tile is the left operand of
the matrix instruction and stays in registers; it is transposed once at the
end. Rows past M or N are masked on load and store; K needs no mask (see
tuning.effective_block_k).

Cost model (bytes): N*K*bits/8 packed + N*G*(scale bytes + zero byte) + M*K
and M*N activations (2 bytes each), once each when the grid covers M in one
tile row (decode); the weight is re-read once per M tile otherwise.

Vector contraction (`TuningConfig(contraction="fma", block_m=1)`, a decode
candidate): each program owns one activation row and keeps a float32
accumulator the size of a weight tile, `acc(bn, bc) += deq(W_tile) * x[k-tile]`
(elementwise multiply-adds: no matrix instruction, so the dequantized tile
needs no operand layout and M is not padded to 16 rows), reduced over its
columns once, after the loop: `y[n] = sum_j acc[n, j]`. (Reducing every step
instead, as a first version did, costs a cross-lane reduction per plane and
word tile: 20.5 us vs 11.0 for the matrix path at 4096^2 4-bit, M = 1, in
kernels_probe_h100_2026-11-27.json.)

Prefetch (`TuningConfig(prefetch=D)`, D >= 1). The loop carries the loads
of the next D steps (the packed bytes, the x tile of every plane, every
plane's scale and zero point); step t issues step t + D's loads before its
own arithmetic, so their latency overlaps D steps of it.
Triton's own pipelining (`num_stages`) covers loads that feed the matrix
instruction directly, not these (bytes go through shifts and masks first,
scales through the ALU): run 1 found `num_stages` 3 and 5 equally fast.

Codebook codes (NF4) become their levels by a gather from a 16-entry
operand or by a select tree on constants (`TuningConfig(lookup=...)`, see
tiles); the outputs are bitwise equal.

Unpacking (`TuningConfig(unpack="ptx")`, uniform 2/3/4/8-bit or NF4,
"activations" scale mode): the planes' exact codes (or levels) come from
inline PTX working on four bytes per register (tiles.py) instead of one
code per 32-bit lane.

Split contraction (decode). With `split_k = S > 1`, S programs share each
output tile, program s walking word tiles `[s*T/S, (s+1)*T/S)` of the T in a
plane, and write float32 partials `(S, M, N)` that XLA sums and casts: S times
the programs for the 4*S*M*N partial bytes, small next to the weight when M is
small. With `split_reduce="kernel"` the last of a tile's S programs to finish
sums the partials instead (tiles.store_split_result), saving that launch.
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


def _program_tile(pid, num_m: int, num_n: int, group_m: int):
  """Grouped ordering: `group_m` M-tiles share a weight tile in L2."""
  group = group_m * num_n
  first_m = (pid // group) * group_m
  size_m = jnp.minimum(num_m - first_m, group_m)
  pid_m = first_m + (pid % group) % size_m
  pid_n = (pid % group) // size_m
  return pid_m, pid_n


def _fwd_kernel(x_ref, *refs, m: int, layout: tiles.Layout, bm: int, bn: int,
                bc: int, scale_mode: str, group_m: int, split: int,
                fma: bool, prefetch: int, lookup: str, ptx: bool | None,
                reduce_in_kernel: bool, interpret: bool):
  q_ref, s_ref, z_ref, cb_ref, rest = tiles.split_weight_refs(refs, layout,
                                                              lookup)
  o_ref = rest[-1]  # the outputs follow any aliased inputs in `rest`
  num_m, num_n = pl.cdiv(m, bm), pl.cdiv(layout.n, bn)
  pid = pl.program_id(0)
  pid_m, pid_n = _program_tile(pid // split, num_m, num_n, group_m)
  n_rows = tiles.row_ids(pid_n * bn, bn)
  n_mask = n_rows < layout.n
  m_rows = tiles.row_ids(pid_m * bm, bm)
  m_mask = m_rows < m
  n_slice = pl.ds(pid_n * bn, bn)
  m_slice = pl.ds(pid_m * bm, bm)
  x_mask = jnp.broadcast_to(m_mask[:, None], (bm, bc))
  dtype = x_ref.dtype

  start, stop = tiles.split_range(pid % split, split, layout.kw // bc)

  def plane_inputs(t, i):
    """x tile `(bm, bc)` and stored scale / zero point of plane i, step t."""
    j0 = pl.multiple_of(t * bc, bc)
    x = plt.load(x_ref.at[m_slice, tiles.static_index(i), pl.ds(j0, bc)],
                 mask=x_mask, other=0)
    return x, tiles.load_group_raw(s_ref, z_ref, n_slice, n_mask,
                                   tiles.group_index(i, j0, layout))

  def step_bytes(t):
    j0 = pl.multiple_of(t * bc, bc)
    return tiles.load_bytes(q_ref, n_slice, n_mask, j0, bc, layout)

  def compute_step(byte_tiles, inputs_of_plane, acc):
    if ptx is None:
      codes = tiles.assemble_words(byte_tiles)
    else:  # unpack="ptx": every plane's `bias + q` (or levels) tile at once
      codes = tiles.unpacked_planes(byte_tiles, layout, dtype, ptx)
    for i in range(layout.planes):
      x, raw = inputs_of_plane(i)
      s, z = tiles.group_params(*raw)
      c = tiles.plane_codes(codes, i, layout.bits) if ptx is None else None
      if fma:  # bm == 1: acc (bn, bc) += deq(W_tile) * x (1, bc)
        w = tiles.centered_f32(c, z, cb_ref, layout, lookup) * s[:, None]
        acc += w * x.astype(jnp.float32)
      elif scale_mode == "weights":
        w = (tiles.centered_f32(c, z, cb_ref, layout, lookup)
             * s[:, None]).astype(dtype)
        acc += lax.dot_general(w, x, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
      else:
        w = (tiles.centered_exact(c, z, cb_ref, layout, lookup, dtype)
             if ptx is None else tiles.ptx_weight_tile(codes[i], z, layout))
        part = lax.dot_general(w, x, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
        acc += s[:, None] * part
    return acc

  def load_step(t):
    """Every load of step t, issued before any of them is used."""
    return step_bytes(t), tuple(plane_inputs(t, i)
                                for i in range(layout.planes))

  acc = jnp.zeros((bn, bc if fma else bm), jnp.float32)
  if prefetch:  # step t computes while steps t+1 .. t+prefetch load
    acc = tiles.prefetched_loop(
        start, stop, prefetch, load_step,
        lambda loaded, acc: compute_step(loaded[0], loaded[1].__getitem__,
                                         acc), acc)
  else:  # each plane's loads just before its arithmetic
    acc = lax.fori_loop(
        start, stop, lambda t, acc: compute_step(
            step_bytes(t), lambda i: plane_inputs(t, i), acc), acc)
  if fma:  # the one cross-lane reduction, after the whole loop
    acc = jnp.sum(acc, axis=1, keepdims=True)
  mask = m_mask[:, None] & n_mask[None, :]
  if split == 1:
    plt.store(o_ref.at[m_slice, n_slice], acc.T.astype(o_ref.dtype),
              mask=mask)
  elif reduce_in_kernel:
    partial_ref, result_ref, count_ref = rest[-3:]
    tiles.store_split_result(partial_ref, result_ref, count_ref, pid // split,
                             pid % split, split,
                             [((m_slice, n_slice), acc.T, mask)], interpret)
  else:
    plt.store(o_ref.at[pid % split, m_slice, n_slice], acc.T, mask=mask)


def fwd(x2d: jax.Array, w: qa.QArray, *, interpret: bool = False,
        tuning: tuning_lib.TuningConfig | None = None,
        out_init: jax.Array | None = None) -> jax.Array:
  """`x2d (M, K) @ dequantize(w)^T -> (M, N)` in x2d.dtype, f32 accumulate.

  Callers check `qmatmul.can_use` first; this function assumes its checks.
  `out_init`, an `(M, N)` array, fills the kernel's output buffer (every
  split's partial sums when the contraction is split) before it runs; tests
  pass NaNs so a tile the kernel fails to write shows up.
  """
  layout = tiles.layout_of(w)
  m = x2d.shape[0]
  cfg = tuning or tuning_lib.choose(
      "fwd", m, layout.n, layout.k, layout.bits,
      codebook=layout.codebook is not None, dtype=x2d.dtype)
  bc = tuning_lib.effective_block_k(cfg.block_k, layout.kw, layout.group)
  split = tuning_lib.effective_split(cfg.split_k, layout.kw // bc)
  bm, bn = cfg.block_m, cfg.block_n
  in_kernel = cfg.split_reduce == "kernel"
  kernel = functools.partial(
      _fwd_kernel, m=m, layout=layout, bm=bm, bn=bn, bc=bc,
      scale_mode=cfg.scale_mode, group_m=cfg.group_m, split=split,
      fma=cfg.contraction == "fma", prefetch=cfg.prefetch, lookup=cfg.lookup,
      ptx=tiles.ptx_flag(cfg.unpack, layout, x2d.dtype, interpret),
      reduce_in_kernel=in_kernel, interpret=interpret)
  x3 = x2d.reshape(m, layout.planes, layout.kw)
  num_tiles = pl.cdiv(m, bm) * pl.cdiv(layout.n, bn)
  grid = (num_tiles * split,)
  operands = [x3, *tiles.weight_operands(w, layout, cfg.lookup)]
  # split > 1: float32 partial sums per contraction slice, summed by XLA
  # or by the last program of each tile (`split_reduce`).
  out_shape, extra, aliases = tiles.launch_outputs(
      (m, layout.n), x2d.dtype, split, in_kernel, num_tiles, out_init,
      len(operands))
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps,
                                         num_stages=cfg.num_stages),
      input_output_aliases=aliases,
      interpret=interpret,
      name=f"qmatmul_fwd_{layout.bits}b",
  )(*operands, *extra)
  return tiles.finish(out, split, in_kernel, x2d.dtype)
