"""Pure-jnp float32 references for the qmatmul kernels.

They dequantize the whole weight in float32 (what the kernels never do) and
multiply at HIGHEST precision, so they serve as the ground truth in tests and
benchmarks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qft_jax._src import qarray as qa


def reference(x2d: jax.Array, w: qa.QArray) -> jax.Array:
  """float32 `x2d (M, K) @ dequantize(w)^T -> (M, N)`."""
  wd = qa.dequantize(w, jnp.float32)
  return jnp.dot(x2d.astype(jnp.float32), wd.T,
                 precision=jax.lax.Precision.HIGHEST)


def reference_dx(dy2d: jax.Array, w: qa.QArray) -> jax.Array:
  """float32 `dy2d (M, N) @ dequantize(w) -> (M, K)`."""
  wd = qa.dequantize(w, jnp.float32)
  return jnp.dot(dy2d.astype(jnp.float32), wd,
                 precision=jax.lax.Precision.HIGHEST)
