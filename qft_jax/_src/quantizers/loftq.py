"""LoftQ: LoRA-fine-tuning-aware initialization by alternating quantization
and low-rank approximation.

Starting from `A = B = 0`, for `t = 1 .. T`:

    Q_t          = quantize(W - s * B A)
    U S V^T      = SVD(W - dequantize(Q_t))
    B, A         = U_r S_r^(1/2) / s,  S_r^(1/2) V_r^T

so `dequantize(Q_T) + s B A` is the rank-`r` correction of the quantized
weight closest (in Frobenius norm, given Q) to `W`. The top-`r` singular
triplets come from an exact SVD (`svd="exact"`) or, by default, from a
randomized range finder with power iterations (Halko et al., 2011,
algorithm 4.4: `r + 16` probes, 4 power iterations), which needs only
matrix products with `W - Q` and a small SVD and is exact to float32
round-off for the leading subspace in practice. `s = alpha / r` is the
LoRA scale; dividing B by `s` (as PEFT's `loftq_init` does) makes the
product exact under the model's scaling. The objective ignores activations
(no calibration), which is what ApiQ improves on.

References: Li et al., LoftQ (arXiv 2310.08659), algorithm 1; PEFT
`utils/loftq_utils.py`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qft_jax._src import qarray as qa
from qft_jax._src.quantizers import protocol


@dataclasses.dataclass(frozen=True)
class LoftQConfig:
  """LoftQ settings.

  Attributes:
    quant: RTN config of the base weight (any calibration-free quantizer can
      be passed to `loftq` instead).
    rank, alpha: LoRA rank and alpha (scale `alpha / rank`).
    iters: alternating steps T (the paper uses 5 for its 2-bit results).
    svd: "randomized" (default) or "exact".
    seed: randomized-SVD probe seed.
  """
  quant: qa.QuantConfig = qa.QuantConfig(bits=2, group_size=64)
  rank: int = 64
  alpha: float = 16.0
  iters: int = 5
  svd: str = "randomized"
  seed: int = 0

  def __post_init__(self):
    if self.rank <= 0 or self.iters <= 0:
      raise ValueError(f"LoftQ rank and iters must be positive, got "
                       f"{self.rank} and {self.iters}")
    if self.svd not in ("randomized", "exact"):
      raise ValueError(f"svd must be 'randomized' or 'exact', got "
                       f"{self.svd!r}")


def top_svd(m: jax.Array, rank: int, key: jax.Array | None = None,
            oversample: int = 16, power_iters: int = 4):
  """Leading `rank` singular triplets `(u (N, r), s (r,), vt (r, K))`.

  Exact (`jnp.linalg.svd`) when `key` is None, else randomized: an
  orthonormal basis `Q` of `m @ Omega` refined by power iterations, then
  the SVD of the small `Q^T m`.
  """
  if key is None:
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    return u[:, :rank], s[:rank], vt[:rank]
  probes = min(rank + oversample, *m.shape)
  hp = jax.lax.Precision.HIGHEST
  omega = jax.random.normal(key, (m.shape[1], probes), jnp.float32)
  q, _ = jnp.linalg.qr(jnp.dot(m, omega, precision=hp))
  for _ in range(power_iters):
    z, _ = jnp.linalg.qr(jnp.dot(m.T, q, precision=hp))
    q, _ = jnp.linalg.qr(jnp.dot(m, z, precision=hp))
  ub, s, vt = jnp.linalg.svd(jnp.dot(q.T, m, precision=hp),
                             full_matrices=False)
  return jnp.dot(q, ub[:, :rank], precision=hp), s[:rank], vt[:rank]


def loftq(w: jax.Array, config: LoftQConfig = LoftQConfig(),
          quantizer: protocol.Quantizer | None = None
          ) -> tuple[qa.QArray, dict]:
  """LoftQ initialization of one linear.

  Args:
    w: float weight `(N, K)`.
    config: rank, alpha, iterations, and the RTN config used when
      `quantizer` is None.
    quantizer: optional calibration-free `Quantizer` (e.g. NF4).

  Returns:
    (QArray, {"lora_a": (r, K), "lora_b": (N, r)}) with
    `dequantize(q) + (alpha / r) * lora_b @ lora_a ~= w`.
  """
  if quantizer is None:
    quantizer = protocol.RTN(config.quant)
  if quantizer.needs_calibration:
    raise ValueError("LoftQ takes a calibration-free quantizer")
  w = jnp.asarray(w, jnp.float32)
  n, k = w.shape
  r = min(config.rank, n, k)
  scale = config.alpha / config.rank
  low_rank = jnp.zeros_like(w)
  key = jax.random.key(config.seed)
  for _ in range(config.iters):
    q = quantizer(w - low_rank)
    key, sub = jax.random.split(key)
    u, s, vt = top_svd(w - qa.dequantize(q, jnp.float32), r,
                       None if config.svd == "exact" else sub)
    root = jnp.sqrt(s)
    b = u * root
    a = root[:, None] * vt
    low_rank = b @ a
  lora_a = jnp.zeros((config.rank, k), jnp.float32).at[:r].set(a)
  lora_b = jnp.zeros((n, config.rank), jnp.float32).at[:, :r].set(b / scale)
  return q, {"lora_a": lora_a, "lora_b": lora_b}


@dataclasses.dataclass(frozen=True)
class LoftQ:
  """LoftQ as a `Quantizer`; `quantize_with_lora` also returns the LoRA."""
  config: LoftQConfig = LoftQConfig()
  needs_calibration: bool = dataclasses.field(default=False, init=False)

  def quantize_with_lora(self, w, stats=None):
    protocol.check_call(self, w, stats)
    return loftq(w, self.config)

  def __call__(self, w, stats=None):
    return self.quantize_with_lora(w, stats)[0]
