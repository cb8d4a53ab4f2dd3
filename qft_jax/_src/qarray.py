"""Quantized arrays: integer codes packed densely, with scales and zero points.

A `QArray` stands for a float matrix `W` of logical shape `(N, K)` (out, in),
the layout of a PyTorch / HF linear weight. Each row is split into groups of
`group_size` consecutive input columns (`group_size == -1`: one group per row,
i.e. per-channel); every (row, group) has a float scale and, for asymmetric
quantization, an integer zero point:

    W[n, k] ~= (q[n, k] - z[n, k // g]) * s[n, k // g]          (uniform)
    W[n, k] ~= codebook[q[n, k]] * s[n, k // g]                  (codebook, NF4)

Leaves may carry leading batch axes (e.g. the layer axis of stacked decoder
layers under `nn.scan`); the static `shape` is always the trailing matrix shape,
so slicing a stacked QArray with `lax.scan`/`vmap` yields a valid QArray.

Packing layout ("planar words"). Codes are unsigned `bits`-bit integers packed
along K into words; a word holds `codes_per_word` codes and is stored as
`bytes_per_word` uint8 planes:

    bits 2, 4, 8: one byte per word, 8 // bits codes per word;
    bits 3:       three bytes per word (24 bits), 8 codes per word (no waste).

With `Kw = K // codes_per_word`, the code of column `k = i * Kw + j` sits in
bits `[i * bits, (i + 1) * bits)` of word `j`, and byte `t` of word `j` is
stored at packed column `t * Kw + j`. So `qvalue` has shape `(N, K * bits / 8)`
and the codes of one plane `i` are the contiguous columns `[i*Kw, (i+1)*Kw)`:
a kernel unpacks a tile with shifts and masks only, never an interleave.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)

# QLoRA's NormalFloat-4 levels (Dettmers et al., 2023, appendix E).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
CODEBOOKS = {"nf4": NF4_LEVELS}


def codes_per_word(bits: int) -> int:
  """Codes stored in one packed word (8 for 3-bit, else 8 // bits)."""
  return 8 if bits == 3 else 8 // bits


def bytes_per_word(bits: int) -> int:
  """Bytes in one packed word (3 for 3-bit, else 1)."""
  return 3 if bits == 3 else 1


def _check_bits(bits: int) -> None:
  if bits not in SUPPORTED_BITS:
    raise ValueError(
        f"unsupported bit width {bits!r}: choose one of {SUPPORTED_BITS}")


def _check_packable(k: int, bits: int) -> None:
  cpw = codes_per_word(bits)
  if k % cpw:
    raise ValueError(
        f"input dimension {k} is not a multiple of {cpw}, the number of "
        f"{bits}-bit codes packed in one word")


def resolve_group_size(group_size: int, k: int) -> int:
  """Returns the effective group size (`k` for per-channel), validated."""
  if group_size == -1:
    return k
  if group_size <= 0:
    raise ValueError(f"group size must be positive or -1, got {group_size}")
  if k % group_size:
    raise ValueError(
        f"group size {group_size} does not divide the input dimension {k}")
  return group_size


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs unsigned codes `(..., K)` into uint8 `(..., K * bits // 8)`."""
  _check_bits(bits)
  k = codes.shape[-1]
  _check_packable(k, bits)
  if bits == 8:
    return codes.astype(jnp.uint8)
  cpw, bpw = codes_per_word(bits), bytes_per_word(bits)
  kw = k // cpw
  planes = codes.astype(jnp.uint32).reshape(*codes.shape[:-1], cpw, kw)
  shifts = (jnp.arange(cpw, dtype=jnp.uint32) * bits)[:, None]
  words = jnp.sum(planes << shifts, axis=-2, dtype=jnp.uint32)
  byte_planes = [((words >> (8 * t)) & 0xFF).astype(jnp.uint8)
                 for t in range(bpw)]
  return jnp.concatenate(byte_planes, axis=-1)


def unpack(packed: jax.Array, bits: int, k: int) -> jax.Array:
  """Inverse of `pack`: uint8 `(..., K * bits // 8)` -> uint8 codes `(..., K)`."""
  _check_bits(bits)
  _check_packable(k, bits)
  if bits == 8:
    return packed.astype(jnp.uint8)
  cpw, bpw = codes_per_word(bits), bytes_per_word(bits)
  kw = k // cpw
  if packed.shape[-1] != kw * bpw:
    raise ValueError(
        f"packed last dimension {packed.shape[-1]} does not match "
        f"{k} {bits}-bit codes (expected {kw * bpw})")
  words = jnp.zeros(packed.shape[:-1] + (kw,), jnp.uint32)
  for t in range(bpw):
    words = words | (packed[..., t * kw:(t + 1) * kw].astype(jnp.uint32)
                     << (8 * t))
  shifts = (jnp.arange(cpw, dtype=jnp.uint32) * bits)[:, None]
  codes = (words[..., None, :] >> shifts) & ((1 << bits) - 1)
  return codes.reshape(*packed.shape[:-1], k).astype(jnp.uint8)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized matrix: packed integer codes with group-wise scales.

  Attributes:
    qvalue: uint8 `(..., N, K * bits // 8)`, codes packed as described in the
      module docstring.
    scale: float `(..., N, K // group_size)`, or a nested QArray of those
      scales (double quantization, see `dense_scale`).
    zero_point: uint8 `(..., N, K // group_size)` for asymmetric uniform
      quantization, or None (symmetric: implicit zero point `2**(bits-1)`;
      codebook: no zero point).
    bits: code width, one of 2, 3, 4, 8 (static).
    group_size: input columns per scale; equals K for per-channel (static).
    shape: logical matrix shape `(N, K)` (static).
    dtype: dtype `dequantize` returns by default (static).
    codebook: None for uniform codes, or a name in `CODEBOOKS` (static).
  """
  qvalue: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  bits: int = dataclasses.field(metadata=dict(static=True))
  group_size: int = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))
  codebook: str | None = dataclasses.field(
      default=None, metadata=dict(static=True))

  @property
  def num_groups(self) -> int:
    return self.shape[1] // self.group_size

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.qvalue.shape[:-2])

  @property
  def nbytes(self) -> int:
    """Bytes held on device by all leaves."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


def is_qarray(x: Any) -> bool:
  return isinstance(x, QArray)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How to quantize a weight with round-to-nearest (RTN).

  Attributes:
    bits: 2, 3, 4 or 8.
    group_size: input columns per scale, -1 for per output channel.
    symmetric: absmax scaling with implicit zero point instead of min-max.
    codebook: None (uniform) or "nf4" (requires bits=4, symmetric absmax).
    scale_dtype: dtype of the stored scales.
  """
  bits: int = 4
  group_size: int = 64
  symmetric: bool = False
  codebook: str | None = None
  scale_dtype: Any = jnp.float32

  def __post_init__(self):
    _check_bits(self.bits)
    if self.group_size != -1 and self.group_size <= 0:
      raise ValueError(
          f"group size must be positive or -1, got {self.group_size}")
    if self.codebook is not None:
      if self.codebook not in CODEBOOKS:
        raise ValueError(f"unknown codebook {self.codebook!r}; known: "
                         f"{sorted(CODEBOOKS)}")
      if 2**self.bits != len(CODEBOOKS[self.codebook]):
        raise ValueError(
            f"codebook {self.codebook!r} has {len(CODEBOOKS[self.codebook])} "
            f"levels, which does not match bits={self.bits}")


def _grouped(w: jax.Array, g: int) -> jax.Array:
  """(..., N, K) -> (..., N, K // g, g)."""
  return w.reshape(*w.shape[:-1], w.shape[-1] // g, g)


def _check_matrix(w: jax.Array) -> None:
  if w.ndim < 2:
    raise ValueError(
        f"quantize expects a matrix (..., out, in) of rank >= 2, got shape "
        f"{tuple(w.shape)}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"quantize expects a float array, got {w.dtype}")


def uniform_params(w: jax.Array, config: QuantConfig
                   ) -> tuple[jax.Array, jax.Array | None]:
  """Scales and integer zero points of RTN for `w` `(..., N, K)`.

  Asymmetric: the range `[min(w_grp, 0), max(w_grp, 0)]` of each (row, group)
  maps onto `0 .. 2**bits - 1`: `s = (max - min) / (2**bits - 1)`,
  `z = round(-min / s)`. Symmetric: `s = absmax / (2**(bits - 1) - 1)`.
  A group of zeros gets scale 1 so it dequantizes to exact zeros.

  Returns:
    scale `(..., N, K // g)` float32 and zero point (uint8, or None).
  """
  g = resolve_group_size(config.group_size, w.shape[-1])
  wg = _grouped(w.astype(jnp.float32), g)
  if config.symmetric:
    absmax = jnp.max(jnp.abs(wg), axis=-1)
    scale = absmax / (2**(config.bits - 1) - 1)
    return jnp.where(scale == 0, 1.0, scale), None
  lo = jnp.minimum(jnp.min(wg, axis=-1), 0.0)
  hi = jnp.maximum(jnp.max(wg, axis=-1), 0.0)
  scale = (hi - lo) / (2**config.bits - 1)
  scale = jnp.where(scale == 0, 1.0, scale)
  zero = jnp.clip(jnp.round(-lo / scale), 0, 2**config.bits - 1)
  return scale, zero.astype(jnp.uint8)


def implicit_zero_point(bits: int) -> int:
  """Offset that makes symmetric codes unsigned: `2**(bits - 1)`."""
  return 2**(bits - 1)


def quantize_with_params(w: jax.Array, scale: jax.Array,
                         zero_point: jax.Array | None, config: QuantConfig,
                         *, noise: jax.Array | None = None) -> QArray:
  """RTN codes of `w` for given scales / zero points, packed into a QArray.

  `noise`, if given, is added before flooring instead of rounding to nearest:
  with `noise ~ U[0, 1)` this is unbiased stochastic rounding,
  `E[dequantize(q)] = w` inside the representable range.
  """
  _check_matrix(w)
  g = resolve_group_size(config.group_size, w.shape[-1])
  _check_packable(w.shape[-1], config.bits)
  wg = _grouped(w.astype(jnp.float32), g)
  s = scale.astype(jnp.float32)[..., None]
  qmax = 2**config.bits - 1
  if config.codebook is not None:
    levels = jnp.asarray(CODEBOOKS[config.codebook], jnp.float32)
    x = wg / s
    codes = jnp.argmin(jnp.abs(x[..., None] - levels), axis=-1)
  else:
    z = (implicit_zero_point(config.bits) if zero_point is None
         else zero_point.astype(jnp.float32)[..., None])
    x = wg / s
    x = jnp.round(x) if noise is None else jnp.floor(x + _grouped(noise, g))
    codes = jnp.clip(x + z, 0, qmax)
  codes = codes.reshape(w.shape).astype(jnp.uint8)
  return QArray(
      qvalue=pack(codes, config.bits),
      scale=scale.astype(config.scale_dtype),
      zero_point=zero_point,
      bits=config.bits,
      group_size=g,
      shape=tuple(w.shape[-2:]),
      dtype=jnp.dtype(w.dtype),
      codebook=config.codebook,
  )


def quantize(w: jax.Array, config: QuantConfig) -> QArray:
  """Round-to-nearest quantization of a float matrix `(..., N, K)`.

  Args:
    w: float weights, out x in (leading batch axes allowed).
    config: bits, group size, symmetric / asymmetric, codebook.

  Returns:
    A QArray; `|w - dequantize(quantize(w))| <= scale / 2` for values inside
    the quantization range (asymmetric ranges include 0, so the integer zero
    point can clip the range ends by at most another `scale / 2`).

  Example:
    >>> q = quantize(w, QuantConfig(bits=4, group_size=64))
    >>> w_hat = dequantize(q)
  """
  _check_matrix(w)
  if config.codebook is not None:
    g = resolve_group_size(config.group_size, w.shape[-1])
    absmax = jnp.max(jnp.abs(_grouped(w.astype(jnp.float32), g)), axis=-1)
    scale = jnp.where(absmax == 0, 1.0, absmax)
    return quantize_with_params(w, scale, None, config)
  scale, zero = uniform_params(w, config)
  return quantize_with_params(w, scale, zero, config)


def codes(q: QArray) -> jax.Array:
  """Unpacked uint8 codes `(..., N, K)`."""
  return unpack(q.qvalue, q.bits, q.shape[1])


def centered_codes(q: QArray, dtype=jnp.float32) -> jax.Array:
  """`q - z` (uniform) or `codebook[q]` as floats, `(..., N, K)`."""
  c = codes(q)
  if q.codebook is not None:
    return jnp.asarray(CODEBOOKS[q.codebook], dtype)[c]
  g = q.group_size
  if q.zero_point is None:
    z = jnp.asarray(implicit_zero_point(q.bits), dtype)
  else:
    z = jnp.repeat(q.zero_point.astype(dtype), g, axis=-1)
  return c.astype(dtype) - z


def dense_scale(q: QArray) -> jax.Array:
  """Float32 scales `(..., N, K // g)` of `q`.

  `q.scale` is either a float array or, under double quantization (QLoRA), a
  nested QArray holding the scales row-major flattened per matrix and
  zero-padded to its own logical shape `(M, B)`, `M * B >= N * K // g`.
  """
  if not isinstance(q.scale, QArray):
    return q.scale.astype(jnp.float32)
  n, ng = q.shape[0], q.num_groups
  flat = dequantize(q.scale, jnp.float32).reshape(*q.batch_shape, -1)
  return flat[..., :n * ng].reshape(*q.batch_shape, n, ng)


def dequantize(q: QArray, dtype=None) -> jax.Array:
  """Float matrix `(..., N, K)` represented by `q` (in `q.dtype` by default).

  The arithmetic is float32; the result is cast to `dtype` at the end.
  """
  dtype = q.dtype if dtype is None else dtype
  w = centered_codes(q) * jnp.repeat(dense_scale(q), q.group_size, axis=-1)
  return w.astype(dtype)


def validate(q: QArray) -> None:
  """Checks that the leaves of `q` agree with its static fields.

  Raises:
    ValueError naming the first inconsistency.
  """
  if not isinstance(q, QArray):
    raise ValueError(f"expected a QArray, got {type(q).__name__}")
  _check_bits(q.bits)
  if len(q.shape) != 2:
    raise ValueError(f"QArray.shape must be (out, in), got {q.shape}")
  n, k = q.shape
  _check_packable(k, q.bits)
  g = resolve_group_size(q.group_size, k)
  batch = q.qvalue.shape[:-2]
  want = batch + (n, k * q.bits // 8)
  if tuple(q.qvalue.shape) != want:
    raise ValueError(f"qvalue has shape {tuple(q.qvalue.shape)}, expected "
                     f"{want} for {q.bits}-bit codes of a {n}x{k} matrix")
  if q.qvalue.dtype != jnp.uint8:
    raise ValueError(f"qvalue must be uint8, got {q.qvalue.dtype}")
  want_s = batch + (n, k // g)
  if isinstance(q.scale, QArray):
    validate(q.scale)
    if q.scale.batch_shape != batch or math.prod(q.scale.shape) < n * (k // g):
      raise ValueError(
          f"nested scale QArray {q.scale.batch_shape + q.scale.shape} cannot "
          f"hold the {want_s} scales")
  elif tuple(q.scale.shape) != want_s:
    raise ValueError(f"scale has shape {tuple(q.scale.shape)}, expected "
                     f"{want_s} (group size {g})")
  elif not jnp.issubdtype(q.scale.dtype, jnp.floating):
    raise ValueError(f"scale must be float, got {q.scale.dtype}")
  if q.zero_point is not None:
    if q.codebook is not None:
      raise ValueError("a codebook QArray takes no zero point")
    if tuple(q.zero_point.shape) != want_s:
      raise ValueError(f"zero_point has shape {tuple(q.zero_point.shape)}, "
                       f"expected {want_s}")
    if q.zero_point.dtype != jnp.uint8:
      raise ValueError(f"zero_point must be uint8, got {q.zero_point.dtype}")
  if q.codebook is not None and q.codebook not in CODEBOOKS:
    raise ValueError(f"unknown codebook {q.codebook!r}")


def bits_per_weight(q: QArray) -> float:
  """Storage cost in bits per logical weight, scales included."""
  n, k = q.shape
  return 8.0 * q.nbytes / (n * k * max(1, math.prod(q.batch_shape)))


def abstract_qarray(shape: tuple[int, ...], config: QuantConfig,
                    dtype=jnp.bfloat16) -> QArray:
  """A QArray of `jax.ShapeDtypeStruct` leaves for a float `shape` (no data).

  Useful with `jax.eval_shape` / memory planning without allocating weights.
  """
  *batch, n, k = shape
  g = resolve_group_size(config.group_size, k)
  _check_packable(k, config.bits)
  sds = jax.ShapeDtypeStruct
  uses_zero = config.codebook is None and not config.symmetric
  return QArray(
      qvalue=sds((*batch, n, k * config.bits // 8), jnp.uint8),
      scale=sds((*batch, n, k // g), config.scale_dtype),
      zero_point=sds((*batch, n, k // g), jnp.uint8) if uses_zero else None,
      bits=config.bits, group_size=g, shape=(n, k), dtype=jnp.dtype(dtype),
      codebook=config.codebook)


def random_qarray(key: jax.Array, shape: tuple[int, ...], config: QuantConfig,
                  dtype=jnp.bfloat16, scale: float = 0.02) -> QArray:
  """A QArray with uniformly random codes and positive random scales.

  Builds benchmark-sized quantized weights directly on the device, without
  ever materializing the float matrix.
  """
  spec = abstract_qarray(shape, config, dtype)
  kq, ks, kz = jax.random.split(key, 3)
  qvalue = jax.random.bits(kq, spec.qvalue.shape, jnp.uint8)
  levels = 2**config.bits - 1 if config.codebook is None else 1
  s = (scale / max(levels, 1)) * jax.random.uniform(
      ks, spec.scale.shape, jnp.float32, 0.5, 1.5)
  zp = None
  if spec.zero_point is not None:
    zp = jax.random.randint(kz, spec.zero_point.shape, 0, 2**config.bits,
                            jnp.int32).astype(jnp.uint8)
  return dataclasses.replace(spec, qvalue=qvalue,
                             scale=s.astype(config.scale_dtype), zero_point=zp)


def as_numpy_codes(q: QArray) -> np.ndarray:
  """Host copy of the unpacked codes (for inspection and tests)."""
  return np.asarray(codes(q))
