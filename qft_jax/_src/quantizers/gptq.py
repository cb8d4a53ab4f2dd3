"""GPTQ / OPTQ: column-by-column quantization with second-order error feedback.

For one linear layer with weight `W` `(N, K)` and input Hessian
`H = 2 X^T X / n` `(K, K)`, GPTQ minimizes `tr((W_hat - W) H (W_hat - W)^T)`
greedily: columns are quantized one at a time and each column's error is
pushed onto the columns not yet quantized, weighted by the inverse Hessian.
With `U` the upper Cholesky factor of `H^-1` (`H^-1 = U^T U`):

    for j in order:
      q_j   = RTN(w_j; scale/zero of j's group)
      e_j   = (w_j - q_j) / U[j, j]
      w_k  -= e_j * U[j, k]          for all later k            (error feedback)

Updates are applied lazily in blocks of `block_size` (128) columns: inside a
block rank-1 updates touch only the block, and the block's errors reach the
remaining columns in one matrix product `W[:, later] -= E @ U[block, later]`.

Details (the reference implementation is IST-DASLab/gptq, `gptq.py`):
- dead inputs (`H[k, k] == 0`) get `H[k, k] = 1` and `W[:, k] = 0`;
- damping `H += damp * mean(diag H) * I` (`damp = 0.01`). If a Cholesky
  factorization still fails (H not positive definite, e.g. from float32
  round-off on rank-deficient inputs), the damping is multiplied by 10 and the
  factorization retried, up to `max_damp`; past that a ValueError is raised.
  The damping actually used is logged when it had to be raised;
- act-order (`act_order=True`) visits columns by decreasing `diag(H)`. Groups
  always stay groups of `group_size` consecutive *original* columns, and the
  result is un-permuted, so the QArray has exactly the RTN layout;
- a group's scale and zero point are computed (min-max, like RTN) when the
  first of its columns is quantized, from that group's current,
  error-compensated weights. Without act-order this is GPTQ's "parameters
  computed when a group starts"; the reference reads the group from the
  not-yet-updated global matrix when a group starts mid-block, this version
  uses the up-to-date values.

References: Frantar et al., GPTQ (arXiv 2210.17323), algorithm 1.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from qft_jax._src import qarray as qa
from qft_jax._src.quantizers import protocol

_HP = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
  """GPTQ settings.

  Attributes:
    bits: 2, 3, 4 or 8.
    group_size: input columns per scale (-1: per output channel).
    symmetric: absmax scales with implicit zero point instead of min-max.
    act_order: quantize columns by decreasing Hessian diagonal.
    static_groups: take every group's scale and zero point from the original
      weights up front (RTN's grid; AutoGPTQ's `static_groups`) instead of
      from the error-compensated weights when the group starts.
    block_size: columns per lazy update block (128).
    damp: relative damping, `H += damp * mean(diag H) * I` (0.01).
    max_damp: largest relative damping the non-PD fallback may reach.
    scale_dtype: dtype of the stored scales.
  """
  bits: int = 4
  group_size: int = 64
  symmetric: bool = False
  act_order: bool = False
  static_groups: bool = False
  block_size: int = 128
  damp: float = 0.01
  max_damp: float = 10.0
  scale_dtype: object = jnp.float32

  def __post_init__(self):
    qa.QuantConfig(bits=self.bits, group_size=self.group_size)
    if self.block_size <= 0:
      raise ValueError(f"block_size must be positive, got {self.block_size}")
    if not 0 <= self.damp <= self.max_damp:
      raise ValueError(f"need 0 <= damp <= max_damp, got damp={self.damp}, "
                       f"max_damp={self.max_damp}")

  @property
  def quant_config(self) -> qa.QuantConfig:
    return qa.QuantConfig(bits=self.bits, group_size=self.group_size,
                          symmetric=self.symmetric,
                          scale_dtype=self.scale_dtype)


def _inverse_cholesky(h: jax.Array, damp: float) -> jax.Array:
  """Upper `U` with `(H + damp * mean(diag H) I)^-1 = U^T U` (NaN if not PD)."""
  k = h.shape[0]
  eye = jnp.eye(k, dtype=jnp.float32)
  h = h + damp * jnp.mean(jnp.diag(h)) * eye
  low = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((low, True), eye)
  hinv = (hinv + hinv.T) / 2
  return jnp.linalg.cholesky(hinv).T


_inverse_cholesky_jit = jax.jit(_inverse_cholesky)


def prepare_hessian(w: jax.Array, h: jax.Array, config: GPTQConfig):
  """Dead-input handling, act-order permutation and the damped factor.

  Returns:
    (w_perm, u, perm, damp_used): the zeroed and permuted weight, the upper
    Cholesky factor of the damped inverse Hessian in permuted order, the
    permutation (`w_perm[:, p] = w[:, perm[p]]`) and the relative damping.

  Raises:
    ValueError: non-finite Hessian, or no damping up to `max_damp` makes it
      positive definite.
  """
  h = jnp.asarray(h, jnp.float32)
  w = jnp.asarray(w, jnp.float32)
  if not bool(jnp.all(jnp.isfinite(h))):
    raise ValueError("the Hessian has non-finite entries (NaN/inf in the "
                     "calibration inputs?)")
  if not bool(jnp.all(jnp.isfinite(w))):
    raise ValueError("the weight to quantize has non-finite entries")
  diag = jnp.diag(h)
  dead = diag == 0
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
  w = jnp.where(dead[None, :], 0.0, w)
  if config.act_order:
    perm = jnp.argsort(-jnp.diag(h), stable=True)
  else:
    perm = jnp.arange(h.shape[0])
  h = h[perm][:, perm]
  w = w[:, perm]
  if not float(jnp.mean(jnp.diag(h))) > 0:
    raise ValueError("the Hessian is not positive definite: its diagonal "
                     "has a non-positive mean")
  damp = config.damp
  while True:
    u = _inverse_cholesky_jit(h, damp)
    if bool(jnp.all(jnp.isfinite(u))):
      break
    if damp >= config.max_damp:
      raise ValueError(
          f"the Hessian is not positive definite even with relative damping "
          f"{damp:g} (max_damp={config.max_damp:g}); check the calibration "
          "inputs")
    damp = min(config.max_damp, max(damp, 1e-6) * 10)
  if damp != config.damp:
    logging.warning("GPTQ: Hessian not positive definite with damping %g; "
                    "used %g", config.damp, damp)
  return w, u, perm, damp


def _group_params(wg: jax.Array, qcfg: qa.QuantConfig):
  """Scale `(N,)` and float zero point `(N,)` of one group `(N, g)`."""
  s, z = qa.uniform_params(wg, dataclasses.replace(qcfg, group_size=-1))
  z = (jnp.full_like(s, qa.implicit_zero_point(qcfg.bits)) if z is None
       else z.astype(jnp.float32))
  return s[:, 0], z[:, 0]


@functools.partial(jax.jit, static_argnames=("qcfg", "block"))
def _gptq_loop(w, u, group_of_pos, group_pos, scales, zeros, started,
               qcfg: qa.QuantConfig, block: int):
  """Column loop in permuted, padded coordinates.

  Args:
    w: float32 `(N, Kp)`; u: `(Kp, Kp)` upper factor; group_of_pos: int
      `(Kp,)` group of each position (`G` for padding); group_pos: int
      `(G, g)` positions of each group's columns; scales, zeros: float
      `(N, G + 1)` group parameters, used as given where `started` `(G + 1,)`
      is true and computed when the group starts otherwise.

  Returns:
    codes uint8 `(N, Kp)` (permuted), scales `(N, G)`, zeros `(N, G)` float.
  """
  n, kp = w.shape
  num_groups = group_pos.shape[0]
  qmax = 2**qcfg.bits - 1
  codes = jnp.zeros((n, kp), jnp.uint8)

  def block_body(b, carry):
    w, codes, scales, zeros, started = carry
    i1 = b * block
    rows = jax.lax.dynamic_slice_in_dim(u, i1, block, axis=0)      # (B, Kp)
    u1 = jax.lax.dynamic_slice_in_dim(rows, i1, block, axis=1)     # (B, B)
    w1 = jax.lax.dynamic_slice_in_dim(w, i1, block, axis=1)        # (N, B)

    def col_body(i, inner):
      w1, err1, codes1, scales, zeros, started = inner
      gid = group_of_pos[i1 + i]

      def start_group(args):
        scales, zeros, started = args
        cols = group_pos[gid]                                       # (g,)
        in_block = (cols >= i1) & (cols < i1 + block)
        from_block = w1[:, jnp.clip(cols - i1, 0, block - 1)]
        later = w[:, cols] - jnp.dot(err1, rows[:, cols], precision=_HP)
        s, z = _group_params(jnp.where(in_block, from_block, later), qcfg)
        return (scales.at[:, gid].set(s), zeros.at[:, gid].set(z),
                started.at[gid].set(True))

      scales, zeros, started = jax.lax.cond(
          started[gid], lambda a: a, start_group, (scales, zeros, started))
      s, z = scales[:, gid], zeros[:, gid]
      col = w1[:, i]
      code = jnp.clip(jnp.round(col / s) + z, 0, qmax)
      err = (col - (code - z) * s) / u1[i, i]
      w1 = w1 - err[:, None] * u1[i][None, :]
      return (w1, err1.at[:, i].set(err),
              codes1.at[:, i].set(code.astype(jnp.uint8)), scales, zeros,
              started)

    err1 = jnp.zeros((n, block), jnp.float32)
    codes1 = jnp.zeros((n, block), jnp.uint8)
    _, err1, codes1, scales, zeros, started = jax.lax.fori_loop(
        0, block, col_body, (w1, err1, codes1, scales, zeros, started))
    w = w - jnp.dot(err1, rows, precision=_HP)
    codes = jax.lax.dynamic_update_slice_in_dim(codes, codes1, i1, axis=1)
    return w, codes, scales, zeros, started

  _, codes, scales, zeros, _ = jax.lax.fori_loop(
      0, kp // block, block_body, (w, codes, scales, zeros, started))
  return codes, scales[:, :num_groups], zeros[:, :num_groups]


def gptq_quantize(w: jax.Array, hessian: jax.Array,
                  config: GPTQConfig = GPTQConfig(), *,
                  grid: tuple[jax.Array, jax.Array | None] | None = None
                  ) -> qa.QArray:
  """GPTQ-quantizes one weight `(N, K)` given its input Hessian `(K, K)`.

  Args:
    w: float weight (out, in).
    hessian: `2 X^T X / n` of the layer's calibration inputs.
    config: bits, group size, act-order, block size, damping.
    grid: optional fixed `(scale, zero_point)` `(N, K // g)` (zero point
      uint8, or None when symmetric); by default each group's min-max
      parameters are computed when the group starts (or up front with
      `config.static_groups`).

  Returns:
    A QArray with exactly the layout of `qarray.quantize` (asymmetric uint8
    zero points, or symmetric with implicit zero point), dtype of `w`.

  Example:
    >>> stats = layer_stats(x)                       # x: (tokens, K)
    >>> q = gptq_quantize(w, stats.hessian, GPTQConfig(bits=3))
  """
  if np.ndim(w) != 2:
    raise ValueError(f"gptq_quantize takes one matrix (out, in), got shape "
                     f"{np.shape(w)}")
  n, k = np.shape(w)
  if np.shape(hessian) != (k, k):
    raise ValueError(f"hessian has shape {np.shape(hessian)}, expected "
                     f"{(k, k)} for a weight with {k} input columns")
  qcfg = config.quant_config
  g = qa.resolve_group_size(config.group_size, k)
  if k % qa.codes_per_word(config.bits):
    raise ValueError(f"input dimension {k} is not a multiple of "
                     f"{qa.codes_per_word(config.bits)}, the number of "
                     f"{config.bits}-bit codes packed in one word")
  if grid is None and config.static_groups:
    grid = qa.uniform_params(jnp.asarray(w, jnp.float32), qcfg)
  w_perm, u, perm, _ = prepare_hessian(w, hessian, config)
  block = min(config.block_size, k)
  kp = math.ceil(k / block) * block
  pad = kp - k
  w_perm = jnp.pad(w_perm, ((0, 0), (0, pad)))
  u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(
      jnp.concatenate([jnp.zeros(k), jnp.ones(pad)]))
  perm_np = np.asarray(perm)
  inv = np.argsort(perm_np)
  num_groups = k // g
  group_of_pos = np.concatenate([perm_np // g, np.full(pad, num_groups)])
  group_pos = inv.reshape(num_groups, g)
  scales = jnp.ones((n, num_groups + 1), jnp.float32)
  zeros = jnp.zeros((n, num_groups + 1), jnp.float32)
  started = np.zeros(num_groups + 1, bool)
  started[num_groups] = True
  if grid is not None:
    g_scale, g_zero = grid
    if np.shape(g_scale) != (n, num_groups):
      raise ValueError(f"grid scale has shape {np.shape(g_scale)}, expected "
                       f"{(n, num_groups)}")
    if (g_zero is None) != config.symmetric:
      raise ValueError("grid zero point must be None exactly when symmetric")
    g_zero = (jnp.full((n, num_groups), qa.implicit_zero_point(config.bits))
              if g_zero is None else g_zero)
    scales = scales.at[:, :num_groups].set(jnp.asarray(g_scale, jnp.float32))
    zeros = zeros.at[:, :num_groups].set(jnp.asarray(g_zero, jnp.float32))
    started[:] = True
  codes, scales, zeros = _gptq_loop(
      w_perm, u, jnp.asarray(group_of_pos, jnp.int32),
      jnp.asarray(group_pos, jnp.int32), scales, zeros, jnp.asarray(started),
      qcfg, block)
  codes = codes[:, :k][:, jnp.asarray(inv)]
  zero_point = None if config.symmetric else zeros.astype(jnp.uint8)
  return qa.QArray(
      qvalue=qa.pack(codes, config.bits),
      scale=scales.astype(config.scale_dtype),
      zero_point=zero_point, bits=config.bits, group_size=g, shape=(n, k),
      dtype=jnp.dtype(jnp.asarray(w).dtype))


@dataclasses.dataclass(frozen=True)
class GPTQ:
  """GPTQ as a `Quantizer` (needs `LayerStats.hessian`)."""
  config: GPTQConfig = GPTQConfig()
  needs_calibration: bool = dataclasses.field(default=True, init=False)

  def __call__(self, w, stats=None):
    protocol.check_call(self, w, stats)
    return gptq_quantize(jnp.asarray(w), stats.hessian, self.config)
