"""NF4 (QLoRA) with block-wise absmax and optional double quantization.

Each block of `block_size` consecutive input columns of a row (QLoRA's 64
consecutive elements of the row-major weight) is scaled by its absmax and
every weight is mapped to the nearest of the 16 NormalFloat levels:

    s_b = max_{k in b} |w_k|,      q_k = argmin_j |w_k / s_b - NF4[j]|,
    w_hat_k = NF4[q_k] * s_b.

Double quantization (QLoRA section 3) stores the float32 block scales
themselves in 8 bits, in blocks of `dq_block_size` (256) consecutive scales
of the row-major flattened `(N, K // block_size)` scale matrix. QLoRA
subtracts the mean of the scales and quantizes them with a signed 8-bit code;
here the second level is the library's asymmetric 8-bit RTN (min-max range
widened to include 0, integer zero point), whose step for the positive scales
is `max_b(s) / 255` -- the same resolution as a signed code over the centered
range -- and which needs no stored mean. The result is a `QArray` whose
`scale` is itself a QArray (see `qarray.dense_scale`), padded with zeros to a
whole number of second-level blocks. Memory: `4 + 8 / 64 + 40 / (64 * 256)`
~= 4.127 bits per weight instead of `4 + 32 / 64` = 4.5.

Error bound: `|w - w_hat| <= s_b * gap / 2 + |s_b - s_hat_b|` where `gap` is
the widest spacing between adjacent NF4 levels, and
`|s_b - s_hat_b| <= step_2 / 2` for the second-level step.

References: Dettmers et al., QLoRA (arXiv 2305.14314), sections 2-3.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qft_jax._src import qarray as qa
from qft_jax._src.quantizers import protocol


@dataclasses.dataclass(frozen=True)
class NF4Config:
  """NF4 settings (QLoRA defaults).

  Attributes:
    block_size: input columns per absmax scale (64).
    double_quant: store the scales in 8 bits (QLoRA's double quantization).
    dq_block_size: scales per second-level block (256).
    dq_bits: bits of the second-level codes (8).
    scale_dtype: dtype of first-level scales (or of the second-level ones).
  """
  block_size: int = 64
  double_quant: bool = False
  dq_block_size: int = 256
  dq_bits: int = 8
  scale_dtype: object = jnp.float32

  def __post_init__(self):
    if self.block_size <= 0 and self.block_size != -1:
      raise ValueError(f"block_size must be positive or -1, got "
                       f"{self.block_size}")
    if self.dq_block_size <= 0:
      raise ValueError(f"dq_block_size must be positive, got "
                       f"{self.dq_block_size}")
    if self.dq_bits not in qa.SUPPORTED_BITS:
      raise ValueError(f"dq_bits must be one of {qa.SUPPORTED_BITS}, got "
                       f"{self.dq_bits}")
    if self.dq_block_size % qa.codes_per_word(self.dq_bits):
      raise ValueError(f"dq_block_size {self.dq_block_size} must be a "
                       f"multiple of {qa.codes_per_word(self.dq_bits)} for "
                       f"{self.dq_bits}-bit packing")


def double_quantize(scale: jax.Array, block_size: int = 256, bits: int = 8,
                    scale_dtype=jnp.float32) -> qa.QArray:
  """Quantizes a float scale matrix `(..., N, G)` into a nested QArray.

  The scales of each matrix are flattened row-major, zero-padded to a
  multiple of `block_size`, reshaped to `(M, block_size)` and RTN-quantized
  (asymmetric, one group per row of `block_size` scales).

  Returns:
    A QArray of logical shape `(M, block_size)`, batch axes as `scale`'s.
  """
  *batch, n, g = scale.shape
  total = n * g
  m = math.ceil(total / block_size)
  flat = scale.astype(jnp.float32).reshape(*batch, total)
  flat = jnp.pad(flat, [(0, 0)] * len(batch) + [(0, m * block_size - total)])
  cfg = qa.QuantConfig(bits=bits, group_size=-1, scale_dtype=scale_dtype)
  return qa.quantize(flat.reshape(*batch, m, block_size), cfg)


def quantize_nf4(w: jax.Array, config: NF4Config = NF4Config()) -> qa.QArray:
  """NF4 block-wise absmax quantization of `w` `(..., N, K)`.

  Args:
    w: float weights (out, in), leading batch axes allowed.
    config: block size and double quantization.

  Returns:
    A 4-bit codebook QArray; with double quantization its `scale` is a nested
    8-bit QArray.
  """
  cfg = qa.QuantConfig(bits=4, group_size=config.block_size, codebook="nf4",
                       scale_dtype=jnp.float32)
  q = qa.quantize(jnp.asarray(w), cfg)
  if not config.double_quant:
    return dataclasses.replace(q, scale=q.scale.astype(config.scale_dtype))
  nested = double_quantize(q.scale, config.dq_block_size, config.dq_bits,
                           config.scale_dtype)
  return dataclasses.replace(q, scale=nested)


@dataclasses.dataclass(frozen=True)
class NF4:
  """NF4 (optionally double-quantized) as a `Quantizer`."""
  config: NF4Config = NF4Config()
  needs_calibration: bool = dataclasses.field(default=False, init=False)

  def __call__(self, w, stats=None):
    protocol.check_call(self, w, stats)
    return quantize_nf4(jnp.asarray(w), self.config)
