"""Tile-level unpacking and dequantization shared by the qmatmul kernels.

The kernels see a QArray through free reshapes of its leaves (no copies):

    x / dx  (M, K)            -> (M, P, Kw)    column k = i * Kw + j at [:, i, j]
    qvalue  (N, K * bits / 8) -> (N, B, Kw)    byte t of word j at [:, t, j]
    scale, zero_point (N, G)  unchanged

with P = codes per word, B = bytes per word and Kw = K / P (qarray.py's
planar layout). A tile of `bc` words `[j0, j0 + bc)` of `bn` weight rows is B
loads of `(bn, bc)` bytes; plane i of it holds the codes of the contiguous
input columns `[i * Kw + j0, i * Kw + j0 + bc)`, extracted with one shift and
one mask. Because `bc` divides both Kw and the group size, each (plane, tile)
lies in the single group `(i * Kw + j0) // g`, so its scale and zero point are
one `(bn,)` vector each.

Integer codes become floats without the slow int-to-float conversion unit:

    f32:  bitcast(c | 0x4B000000) = 2**23 + c      (exact for c < 2**23)
    bf16: bitcast(c | 0x4300)     = 128 + c        (exact for c < 128)
    f16:  bitcast(c | 0x6400)     = 1024 + c       (exact for c < 1024)

and the offset is folded into the zero point, so `q - z` comes out exact.

Codebook (NF4) codes become their float32 levels one of two ways
(`TuningConfig.lookup`, same values either way): "gather" loads `levels[c]`
from a `(2**bits,)` float32 operand, one load per weight element; "select"
builds them in registers from the static codebook by a binary select tree
over the code's bits, low bit first,

    v_j^(0) = levels[j]
    v_j^(b+1) = where(bit b of c, v_(2j+1)^(b), v_(2j)^(b)),   c -> v_0^(bits)

`2**bits - 1` selects on constants (15 for NF4), with no codebook operand.

2-, 3-, 4- and 8-bit codes can also be unpacked four bytes at a time in PTX
(`TuningConfig.unpack="ptx"`, the trick of FasterTransformer's and Marlin's
int4 kernels): for a 32-bit register holding bytes b0..b3,

    lo = prmt(r, 0, 0x5140) = [b0, 0, b1, 0]     hi = prmt(r, 0, 0x7362)
    plane i of (b0, b1) = lop3((lo >> i*bits) & mask2 | pattern2)

gives two 16-bit floats `bias + code` per instruction (`mask2`, `pattern2`:
the code mask and the bf16 / f16 pattern above in both 16-bit halves): one
plane's 4 codes cost 4 instructions (6 with the shift) instead of about 6
per code on 32-bit lanes. 3-bit words span three byte planes (one register
each); a plane whose code crosses a byte boundary (planes 2 and 5) is first
paired into 16-bit lanes as `prmt(b_t, b_t+1, 0x5140)`, so the same shift
and lop3 apply. 8-bit codes fit f16's pattern (10 mantissa bits) but not
bf16's (7): in bf16 they come out as `q - 128` instead
(`_unpack8_bf16_ptx`), and `unbias` subtracts `z - 128`. One asm block per
plane (each has one result: Pallas lowers multi-result inline asm wrongly
in jax 0.10). `biased_planes`
holds both forms; the Pallas interpreter, which cannot run PTX, takes the
jnp one (same values).

16-level codebook codes (NF4) have a PTX form too (`level_planes`): the
levels' 16-bit patterns, rounded to the activation dtype, live in eight
constant registers (low bytes of levels 0-3, 4-7, 8-11, 12-15, then the
high bytes), and for one plane's 4 codes c0..c3 of a register

    s    = nibbles (c0 & 7, c1 & 7, c2 & 7, c3 & 7)     (and, shift, or, prmt)
    m    = byte j all ones where c_j >= 8                (prmt, sign mode)
    lo   = select(m, prmt(L_0-7, s), prmt(L_8-15, s))    (2 prmt, 1 lop3)
    hi   = the same for the high bytes
    out  = prmt(lo, hi, 0x5140), prmt(lo, hi, 0x7362)    (interleave)

about 14 instructions per 4 levels instead of about 20 per level for the
select tree, and no conversion: they come out in the activation dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
import numpy as np

from qft_jax._src import qarray as qa


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of a QArray as the kernels read it.

  Attributes:
    n, k: logical weight shape (out, in).
    bits: code width.
    planes: codes per word, P.
    nbytes: bytes per word, B.
    kw: words per plane, Kw = K / P.
    group: effective group size g (K for per-channel).
    has_zero: asymmetric uniform codes with stored zero points.
    codebook: the codebook's levels, or None for uniform codes.
  """
  n: int
  k: int
  bits: int
  planes: int
  nbytes: int
  kw: int
  group: int
  has_zero: bool
  codebook: tuple[float, ...] | None

  @property
  def implicit_zero(self) -> int:
    return qa.implicit_zero_point(self.bits)


def layout_of(w: qa.QArray) -> Layout:
  n, k = w.shape
  p = qa.codes_per_word(w.bits)
  return Layout(
      n=n, k=k, bits=w.bits, planes=p, nbytes=qa.bytes_per_word(w.bits),
      kw=k // p, group=qa.resolve_group_size(w.group_size, k),
      has_zero=w.zero_point is not None,
      codebook=(None if w.codebook is None
                else tuple(float(v) for v in qa.CODEBOOKS[w.codebook])))


def gathers_levels(layout: Layout, lookup: str) -> bool:
  """Whether the kernel reads codebook levels from an operand ("gather")."""
  return layout.codebook is not None and lookup == "gather"


def weight_operands(w: qa.QArray, layout: Layout,
                    lookup: str) -> list[jax.Array]:
  """The kernel's weight inputs: q (N, B, Kw), scale, [zero], [levels].

  Double-quantized scales (QLoRA's nested QArray) are expanded to their
  float32 `(N, G)` matrix first: N * G values, K / g times fewer than the
  weight's, so the weight itself is still never written in float. The
  float32 levels `(2**bits,)` are an operand only for a codebook under
  `lookup="gather"`.
  """
  scale = w.scale if not isinstance(w.scale, qa.QArray) else qa.dense_scale(w)
  ops = [w.qvalue.reshape(layout.n, layout.nbytes, layout.kw), scale]
  if layout.has_zero:
    ops.append(w.zero_point)
  if gathers_levels(layout, lookup):
    ops.append(jnp.asarray(layout.codebook, jnp.float32))
  return ops


def split_weight_refs(refs, layout: Layout, lookup: str):
  """(q_ref, s_ref, z_ref | None, levels_ref | None, rest)."""
  q_ref, s_ref, *rest = refs
  z_ref = rest.pop(0) if layout.has_zero else None
  cb_ref = rest.pop(0) if gathers_levels(layout, lookup) else None
  return q_ref, s_ref, z_ref, cb_ref, rest


def load_bytes(q_ref, rows: pl.Slice, row_mask: jax.Array, j0, bc: int,
               layout: Layout) -> tuple[jax.Array, ...]:
  """The B uint8 `(bn, bc)` byte tiles of words `[j0, j0 + bc)`, as loaded.

  Rows outside the matrix read as 0. Nothing uses the values yet, so the
  loads stay in flight until `assemble_words` (see `TuningConfig.prefetch`).
  """
  mask = jnp.broadcast_to(row_mask[:, None], (rows.size, bc))
  return tuple(plt.load(q_ref.at[rows, static_index(t), pl.ds(j0, bc)],
                        mask=mask, other=0)
               for t in range(layout.nbytes))


def assemble_words(byte_tiles: tuple[jax.Array, ...]) -> jax.Array:
  """int32 words from their byte tiles (byte t is bits `[8t, 8t + 8)`)."""
  words = None
  for t, b in enumerate(byte_tiles):
    b = b.astype(jnp.int32)
    words = b if t == 0 else words | (b << (8 * t))
  return words


def plane_codes(words: jax.Array, i: int, bits: int) -> jax.Array:
  """Codes of plane i: bits `[i * bits, (i + 1) * bits)` of each word."""
  c = words >> (i * bits) if i else words
  return c if bits == 8 else c & ((1 << bits) - 1)


def group_index(i: int, j0, layout: Layout):
  """Group of plane i's word tile starting at j0 (a traced int32 scalar)."""
  return (i * layout.kw + j0) // layout.group


def load_group_raw(s_ref, z_ref, rows: pl.Slice, row_mask: jax.Array, grp
                   ) -> tuple[jax.Array, jax.Array | None]:
  """Scale `(bn,)` and zero point `(bn,)` (or None) of `grp`, as stored.

  Rows outside the matrix read as scale 0, so their weights are exact zeros.
  """
  s = plt.load(s_ref.at[rows, grp], mask=row_mask, other=0)
  z = None
  if z_ref is not None:
    z = plt.load(z_ref.at[rows, grp], mask=row_mask, other=0)
  return s, z


def group_params(s: jax.Array, z: jax.Array | None
                 ) -> tuple[jax.Array, jax.Array | None]:
  """Stored scale / zero point -> float32 scale, int32 zero point."""
  return s.astype(jnp.float32), None if z is None else z.astype(jnp.int32)


def select_levels(c: jax.Array, codebook: tuple[float, ...]) -> jax.Array:
  """float32 `codebook[c]` by a binary select tree over the bits of `c`.

  Round b keeps, of each pair of candidates left by the rounds before it,
  the one bit b of the code names: `len(codebook) / 2**(b + 1)` selects, so
  `len(codebook) - 1` in all (8 + 4 + 2 + 1 for NF4). Round 0 selects among
  the levels as float32 constants, the values the gather's table holds.

  Args:
    c: int32 codes, any shape, each in `[0, len(codebook))`.
    codebook: the levels (a power-of-two count).

  Returns:
    float32 levels, the shape of `c`.
  """
  vals = [jnp.float32(v) for v in codebook]
  bit = 1
  while len(vals) > 1:
    on = (c & bit) != 0
    vals = [jnp.where(on, hi, lo) for lo, hi in zip(vals[::2], vals[1::2])]
    bit <<= 1
  return vals[0]


def _levels(c: jax.Array, cb_ref, layout: Layout, lookup: str) -> jax.Array:
  """float32 codebook levels of codes `c` (see the module docstring)."""
  if lookup == "select":
    return select_levels(c, layout.codebook)
  return plt.load(cb_ref.at[c])


def centered_f32(c: jax.Array, z: jax.Array | None, cb_ref, layout: Layout,
                 lookup: str) -> jax.Array:
  """float32 `q - z` (uniform) or `levels[q]` (codebook), exact.

  `cb_ref` is the levels operand under `lookup="gather"` (else None);
  uniform codes ignore both.
  """
  if layout.codebook is not None:
    return _levels(c, cb_ref, layout, lookup)
  as_f32 = lax.bitcast_convert_type(c | 0x4B000000, jnp.float32)
  if z is None:
    offset = jnp.float32(2.0**23 + layout.implicit_zero)
  else:
    offset = (z | 0x4B000000)
    offset = lax.bitcast_convert_type(offset, jnp.float32)[:, None]
  return as_f32 - offset


# dtype -> (bit pattern, largest exact code width, value of the pattern).
_MAGIC_16 = {jnp.dtype(jnp.bfloat16): (0x4300, 7, 128.0),
             jnp.dtype(jnp.float16): (0x6400, 10, 1024.0)}


def centered_exact(c: jax.Array, z: jax.Array | None, cb_ref, layout: Layout,
                   lookup: str, dtype: Any) -> jax.Array:
  """`q - z` in `dtype` (exact: |q - z| < 256), or `levels[q]` rounded.

  `cb_ref` and `lookup` as in `centered_f32`.
  """
  dtype = jnp.dtype(dtype)
  if layout.codebook is not None:
    return _levels(c, cb_ref, layout, lookup).astype(dtype)
  magic = _MAGIC_16.get(dtype)
  if magic is None or layout.bits > magic[1]:
    return centered_f32(c, z, cb_ref, layout, lookup).astype(dtype)
  return unbias(_biased_16(c, dtype), z, layout)


def _biased_16(c: jax.Array, dtype) -> jax.Array:
  """`bias + c` in a 16-bit float dtype, from the bit pattern (exact)."""
  pattern = _MAGIC_16[jnp.dtype(dtype)][0]
  return lax.bitcast_convert_type((c | pattern).astype(jnp.int16), dtype)


def _bias(bits: int, dtype) -> float:
  """The offset `biased_planes` adds to `bits`-bit codes in a 16-bit float
  dtype: the magic pattern's value, or -128 for 8-bit codes in bf16, whose
  7 mantissa bits cannot hold `128 + q` (they come out as `q - 128`)."""
  dtype = jnp.dtype(dtype)
  if bits > _MAGIC_16[dtype][1]:
    return -128.0
  return _MAGIC_16[dtype][2]


def unbias(v: jax.Array, z: jax.Array | None, layout: Layout) -> jax.Array:
  """`(bias + q) - (bias + z)` = `q - z`, exact, in v's 16-bit dtype.

  v: `(bn, bc)` biased codes; z: `(bn,)` int32 zero points or None (the
  implicit zero point).
  """
  bias = _bias(layout.bits, v.dtype)
  if z is None:
    return v - jnp.asarray(bias + layout.implicit_zero, v.dtype)
  if bias < 0:  # 8-bit in bf16: z - 128 is exact, z | pattern is not
    return v - (z - 128).astype(v.dtype)[:, None]
  return v - _biased_16(z, v.dtype)[:, None]


PTX_UNIFORM_BITS = (2, 3, 4, 8)  # uniform code widths the PTX unpacks


def ptx_unpack_supported(layout: Layout, dtype) -> bool:
  """Whether `unpacked_planes(..., ptx=True)` handles this weight / dtype:
  uniform 2/3/4/8-bit codes or 16-level codebooks, 16-bit activations."""
  if jnp.dtype(dtype) not in _MAGIC_16:
    return False
  if layout.codebook is not None:
    return layout.bits == 4 and len(layout.codebook) == 16
  return layout.bits in PTX_UNIFORM_BITS


def _unpack_ptx(bits: int, pattern: int, plane: int) -> tuple[str, str]:
  """PTX (and its constraints) turning packed bytes into plane `plane`'s
  `bias + code`: four 16-bit floats in two registers.

  2/4-bit: one register of 4 one-byte words ($2). 3-bit: the three byte
  planes of 4 three-byte words ($2, $3, $4: bits 0-7, 8-15, 16-23). Plane
  i's code sits at bit `3i` of the 24-bit word: in one byte (shift within
  it) or, for planes 2 and 5, across two, which the byte permute pairs into
  each 16-bit lane (`{byte t+1, byte t}`) before the shift.
  """
  mask2 = ((1 << bits) - 1) * 0x10001
  pattern2 = pattern * 0x10001
  first_bit = plane * bits
  if bits == 3:
    byte, shift = divmod(first_bit, 8)
    high = f"${byte + 3}" if shift + bits > 8 else "0"
    src, inputs = f"${byte + 2}, {high}", "r,r,r"
  else:
    shift, src, inputs = first_bit, "$2, 0", "r"
  lines = ["{", ".reg .b32 lo, hi;",
           f"prmt.b32 lo, {src}, 0x5140;",
           f"prmt.b32 hi, {src}, 0x7362;"]
  if shift:
    lines += [f"shr.u32 lo, lo, {shift};",
              f"shr.u32 hi, hi, {shift};"]
  lines += [f"lop3.b32 $0, lo, {mask2:#010x}, {pattern2:#010x}, 0xEA;",
            f"lop3.b32 $1, hi, {mask2:#010x}, {pattern2:#010x}, 0xEA;", "}"]
  return "\n".join(lines), "=r,=r," + inputs


def _unpack8_bf16_ptx() -> tuple[str, str]:
  """PTX (and its constraints) turning 4 bytes (8-bit codes) into `q - 128`
  in bf16, two registers: the top bit flipped (`q ^ 0x80`), each byte put
  under a bf16 exponent of 128 (`prmt` with 0x43), the byte's top bit,
  which lands in the exponent's lowest bit, cleared in one copy and kept
  alone in the other, and the two subtracted:
  `(128 + (b & 127)) - (128 or 256)` = `b - 128` for `b = q ^ 0x80`, i.e.
  `q - 128` (exact: Mosaic GPU's int8 conversion, on the flipped byte)."""
  lines = ["{", ".reg .b32 r, lo, hi, a, b, m;",
           "xor.b32 r, $2, 0x80808080;",
           "prmt.b32 lo, r, 0x43, 0x4140;",
           "prmt.b32 hi, r, 0x43, 0x4342;",
           "mov.b32 m, 0xbf80bf80;"]  # -1.0 in both bf16 halves
  for out, half in (("$0", "lo"), ("$1", "hi")):
    lines += [f"and.b32 a, {half}, 0xff7fff7f;",
              f"and.b32 b, {half}, 0xff80ff80;",
              # a - b as a + b * -1: fma.bf16x2 runs on sm_80, sub on sm_90
              f"fma.rn.bf16x2 {out}, b, m, a;"]
  lines.append("}")
  return "\n".join(lines), "=r,=r,r"


def level_patterns(codebook: tuple[float, ...], dtype) -> tuple[int, ...]:
  """The levels rounded to a 16-bit float dtype, as uint16 bit patterns."""
  levels = np.asarray(codebook, np.float32).astype(jnp.dtype(dtype))
  return tuple(int(v) for v in levels.view(np.uint16))


def _word(byte_values) -> int:
  """Four bytes as one little-endian 32-bit immediate."""
  return sum((b & 0xFF) << (8 * i) for i, b in enumerate(byte_values))


def _lookup_ptx(patterns: tuple[int, ...], plane: int) -> tuple[str, str]:
  """PTX (and its constraints) turning 4 packed bytes into plane `plane`'s
  four 16-bit levels `patterns[c]` (16 entries, 4-bit codes): two
  registers, elements 0-1 then 2-3 (see the module docstring)."""
  lo = [p & 0xFF for p in patterns]
  hi = [p >> 8 for p in patterns]
  tables = {name: [_word(v[4 * q:4 * q + 4]) for q in range(4)]
            for name, v in (("lo", lo), ("hi", hi))}
  lines = ["{", ".reg .b32 t, s, m, a, b, ta, lo, hi;"]
  if plane:  # codes in the high nibbles; bit 3 already each byte's msb
    lines += ["shr.u32 t, $2, 4;",
              "and.b32 t, t, 0x07070707;",
              "prmt.b32 m, $2, 0, 0xBA98;"]
  else:  # codes in the low nibbles; shift bit 3 up to each byte's msb
    lines += ["and.b32 t, $2, 0x07070707;",
              "shl.b32 m, $2, 4;",
              "prmt.b32 m, m, 0, 0xBA98;"]
  lines += ["shr.u32 s, t, 4;",
            "or.b32 s, s, t;",  # byte 0: c0 | c1 << 4, byte 2: c2 | c3 << 4
            "prmt.b32 s, s, 0, 0x0020;"]  # byte 1 <- byte 2
  for name in ("lo", "hi"):
    t0, t1, t2, t3 = tables[name]
    lines += [f"mov.b32 ta, {t0:#010x};",
              f"prmt.b32 a, ta, {t1:#010x}, s;",
              f"mov.b32 ta, {t2:#010x};",
              f"prmt.b32 b, ta, {t3:#010x}, s;",
              # (a & ~m) | (b & m): the upper half of the table where c >= 8
              f"lop3.b32 {name}, a, b, m, 0xD8;"]
  lines += ["prmt.b32 $0, lo, hi, 0x5140;",
            "prmt.b32 $1, lo, hi, 0x7362;", "}"]
  return "\n".join(lines), "=r,=r,r"


def ptx_flag(unpack: str, layout: Layout, dtype, interpret: bool
             ) -> bool | None:
  """The kernels' `ptx` argument: None for `unpack="jnp"`; else whether to
  run the PTX (False in the interpreter: the jnp form, same values).

  Raises:
    ValueError: `unpack="ptx"` for a weight or dtype it does not handle.
  """
  if unpack == "jnp":
    return None
  if not ptx_unpack_supported(layout, dtype):
    raise ValueError(
        f"unpack='ptx' takes uniform 2-, 3-, 4- or 8-bit codes or 16-level 4-bit "
        f"codebooks, and bf16 / f16 activations, got {layout.bits}-bit"
        f"{' codebook' if layout.codebook else ''} codes and {dtype}")
  return not interpret


def biased_planes(byte_tiles: tuple[jax.Array, ...], layout: Layout, dtype,
                  ptx: bool) -> list[jax.Array]:
  """The P planes' `bias + code` tiles, in `dtype`.

  byte_tiles: the B `(bn, bc)` uint8 byte tiles of a word tile (2/4/8-bit
  codes: B = 1; 3-bit: B = 3, `load_bytes`). Returns P `(bn, bc)` tiles of
  a 16-bit float dtype (8-bit codes in bf16: `q - 128`, see `_bias`);
  `unbias` centres them. `ptx`: the packed PTX of the
  module docstring (GPU only), else jnp on int32 lanes, with the same
  values.
  """
  negative_bias = _bias(layout.bits, dtype) < 0  # 8-bit codes in bf16
  if ptx:
    pattern = _MAGIC_16[jnp.dtype(dtype)][0]
    out = jax.ShapeDtypeStruct(byte_tiles[0].shape, dtype)
    planes = []
    for i in range(layout.planes):
      asm, constraints = (_unpack8_bf16_ptx() if negative_bias
                          else _unpack_ptx(layout.bits, pattern, i))
      planes += plt.elementwise_inline_asm(
          asm, args=list(byte_tiles), constraints=constraints, pack=4,
          result_shape_dtypes=[out])
    return planes
  words = assemble_words(byte_tiles)
  if negative_bias:
    return [(words - 128).astype(dtype)]
  return [_biased_16(plane_codes(words, i, layout.bits), dtype)
          for i in range(layout.planes)]


def level_planes(byte_tile: jax.Array, layout: Layout, dtype,
                 ptx: bool) -> list[jax.Array]:
  """The 2 planes' codebook levels `(bn, bc)` in a 16-bit float dtype, from
  4-bit codebook bytes (one byte tile): by PTX lookup (GPU only) or its jnp
  form (the select tree, then rounding; the same values)."""
  if ptx:
    patterns = level_patterns(layout.codebook, dtype)
    out = jax.ShapeDtypeStruct(byte_tile.shape, dtype)
    planes = []
    for i in range(layout.planes):
      asm, constraints = _lookup_ptx(patterns, i)
      planes += plt.elementwise_inline_asm(
          asm, args=[byte_tile], constraints=constraints, pack=4,
          result_shape_dtypes=[out])
    return planes
  words = byte_tile.astype(jnp.int32)
  return [select_levels(plane_codes(words, i, layout.bits),
                        layout.codebook).astype(dtype)
          for i in range(layout.planes)]


def unpacked_planes(byte_tiles: tuple[jax.Array, ...], layout: Layout,
                    dtype, ptx: bool) -> list[jax.Array]:
  """`unpack="ptx"`'s planes from a word tile's byte tiles: biased codes
  (uniform) or levels (codebook)."""
  if layout.codebook is not None:
    return level_planes(byte_tiles[0], layout, dtype, ptx)
  return biased_planes(byte_tiles, layout, dtype, ptx)


def ptx_weight_tile(plane: jax.Array, z: jax.Array | None,
                    layout: Layout) -> jax.Array:
  """The matrix operand of an `unpacked_planes` plane: `q - z` or levels."""
  return plane if layout.codebook is not None else unbias(plane, z, layout)


def prefetched_loop(start, stop, depth: int, load_step, compute_step, init):
  """`acc = compute_step(load_step(t), acc)` for t in `[start, stop)`, with
  the loads of the next `depth` steps in flight (`TuningConfig.prefetch`).

  Step t issues step t + depth's loads before its own arithmetic; past the
  last step they are re-reads of it, never used. Requires start < stop.
  """
  def body(t, carry):
    acc, queue = carry
    ahead = load_step(jnp.minimum(t + depth, stop - 1))
    return compute_step(queue[0], acc), (*queue[1:], ahead)

  queue = tuple(load_step(jnp.minimum(start + d, stop - 1))
                for d in range(depth))
  return lax.fori_loop(start, stop, body, (init, queue))[0]


def launch_outputs(final_shape: tuple[int, ...], dtype, split: int,
                   reduce_in_kernel: bool, num_tiles: int,
                   out_init: jax.Array | None, num_operands: int):
  """Outputs of a qmatmul launch and the operands / aliases they need.

  split == 1: the result `final_shape` in `dtype`. split > 1: the float32
  partial sums `(split, *final_shape)`, which XLA then sums (`finish`), or,
  with `reduce_in_kernel`, also the result and one int32 arrival counter per
  output tile, an aliased zero operand (`store_split_result`). `out_init`
  (tests: NaNs) fills the buffer the result is read from.

  Returns:
    (out_shape list, extra operands, input_output_aliases).
  """
  result = jax.ShapeDtypeStruct(final_shape, dtype)
  if split == 1:
    outs, init_index = [result], 0
  else:
    partial = jax.ShapeDtypeStruct((split, *final_shape), jnp.float32)
    outs, init_index = [partial], 0
    if reduce_in_kernel:
      outs += [result, jax.ShapeDtypeStruct((num_tiles,), jnp.int32)]
      init_index = 1
  extra, aliases = [], {}
  if out_init is not None:
    init = outs[init_index]
    aliases[num_operands] = init_index
    extra.append(jnp.broadcast_to(
        out_init.reshape(final_shape).astype(init.dtype), init.shape))
  if len(outs) == 3:
    aliases[num_operands + len(extra)] = 2
    extra.append(jnp.zeros((num_tiles,), jnp.int32))
  return outs, extra, aliases


def finish(outs, split: int, reduce_in_kernel: bool, dtype) -> jax.Array:
  """The result from `launch_outputs`' buffers after the launch."""
  if split == 1:
    return outs[0]
  if reduce_in_kernel:
    return outs[1]
  return outs[0].sum(axis=0).astype(dtype)


def store_split_result(partial_ref, result_ref, count_ref, tile, part,
                       split: int, pieces, interpret: bool) -> None:
  """Split contraction reduced in the kernel ("last arrival sums").

  Each of the `split` programs of output tile `tile` stores its float32
  partials, `partial_ref[part, *idx] = acc` for `(idx, acc, mask)` in
  `pieces`, then atomically counts itself in `count_ref[tile]`
  (acquire-release, after a barrier so every thread's stores precede the
  release). The program that arrives last, seeing `split - 1`, sums the
  partials in the fixed order 0..split-1 and stores the result: the same
  sum whichever program arrives last, and no second kernel launch. The
  interpreter runs programs one after another and has no barrier.
  """
  for idx, acc, mask in pieces:
    plt.store(partial_ref.at[(part, *idx)], acc, mask=mask)
  if not interpret:
    plt.debug_barrier()
  arrived = plt.atomic_add(count_ref, tile, jnp.ones((), jnp.int32))

  @pl.when(arrived == split - 1)
  def _():
    for idx, _, mask in pieces:
      # volatile: read through to L2, where the other programs' stores are.
      parts = [plt.load(partial_ref.at[(static_index(p), *idx)], mask=mask,
                        other=0, volatile=True) for p in range(split)]
      total = parts[0]
      for later in parts[1:]:
        total += later
      plt.store(result_ref.at[idx], total.astype(result_ref.dtype),
                mask=mask)


def split_range(part, parts: int, trips: int):
  """Loop bounds `[part*trips//parts, (part+1)*trips//parts)` of one split."""
  if parts == 1:
    return 0, trips
  return (part * trips) // parts, ((part + 1) * trips) // parts


def static_index(i: int) -> jax.Array:
  """A Python int index as an int32 scalar (the interpreter wants a shape)."""
  return jnp.int32(i)


def row_ids(start, size: int) -> jax.Array:
  """int32 `start + arange(size)`."""
  return start + lax.broadcasted_iota(jnp.int32, (size,), 0)
