"""QFT: fine-tuning int8 weights in place, without a float master copy.

A `QFTWeight` stores a matrix `W` `(..., N, K)` as

    W = deq(D) + S,    D: int8 codes, one symmetric scale s_n per row n,
                       S: the top `ceil(f N K)` entries of |W| kept in float,

with `D` zero where `S` is set (Li et al., 2023, "QFT: Quantized Full-parameter
Tuning of LLMs with Affordable Resources", sec. 3; outliers as in SpQR). The
outlier count is fixed per matrix, so every leaf has a static shape.

An update `u` (e.g. `-lr * sign(...)` from `lion_int8` applied to dL/dW) is
applied in code space with the row scale kept fixed:

    x = (q - 128) + u / s_n,      q' = clip(floor(x + U[0, 1)), -128, 127) + 128

(`rounding="nearest"`: `round(x)`). Stochastic rounding is unbiased,
`E[deq(q')] = deq(q) + u` inside the range, so updates far below half a
quantization step still move the weight on average; round-to-nearest drops
every `|u| < s_n / 2` (Lion moves weights by `lr ~ 1e-5`, far below `s_n / 2`),
which is why QFT stalls without it. Outlier entries take their updates in
float. Scales are kept, not re-derived, between `reselect_outliers` calls:
re-deriving them every step would re-round whole rows whenever a row's absmax
moves. `reselect_outliers` re-fits scales and outliers from the current
weight (one requantization, nearest or stochastic).

Forward: `qmatmul.linear(x, w)` accepts a `QFTWeight`, or during training a
`QFTWithProbe(w, probe)` (`with_probes(params, qft_probes(params))` inside the
jitted step), whose probe cotangent is the dense dL/dW; both call
`apply_linear`, `y = qdot(x, D, sparse=S)`: the outliers are added into the
transient dequantized weight, so one matmul serves both parts.
A QFT step: probe grads -> `lion_int8` (int8 momentum, shape (..., N, K)) ->
`qft_apply_updates` (weight decay needs `params`: pass the layer's transient
`qft_dequantize`, or use `scale_by_lion_int8` + `scale_by_learning_rate`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from qft_jax._src import qarray as qa
from qft_jax._src import qmatmul

DENSE_CONFIG = qa.QuantConfig(bits=8, group_size=-1, symmetric=True)
ROUNDINGS = ("stochastic", "nearest")
_ZERO = qa.implicit_zero_point(8)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QFTWeight:
  """int8 dense part plus fixed-count float outliers of a `(..., N, K)` matrix.

  Attributes:
    dense: 8-bit symmetric per-row `QArray`; its codes are 128 (zero) at
      outlier positions.
    outlier_index: int32 `(..., n)`, flat indices `row * K + col`.
    outlier_value: float32 `(..., n)`, the weights at those indices.
  """
  dense: qa.QArray
  outlier_index: jax.Array
  outlier_value: jax.Array

  @property
  def shape(self) -> tuple[int, int]:
    return self.dense.shape

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return self.dense.batch_shape

  def apply_linear(self, x: jax.Array, implementation=None) -> jax.Array:
    """`x @ W^T` for one matrix (no batch axes); dx only (frozen)."""
    return qmatmul.qdot(x, self.dense, implementation=implementation,
                        sparse=(self.outlier_index, self.outlier_value))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QFTWithProbe:
  """A `QFTWeight` whose dense gradient dL/dW `(..., N, K)` is wanted.

  `probe` is a float placeholder (its value is ignored); its cotangent is
  dL/dW at every position, outlier positions included.
  """
  weight: QFTWeight
  probe: jax.Array

  def apply_linear(self, x: jax.Array, implementation=None) -> jax.Array:
    w = jax.lax.stop_gradient(self.weight)
    return qmatmul.qdot(x, w.dense, trainable="weight",
                        implementation=implementation, weight_probe=self.probe,
                        sparse=(w.outlier_index, w.outlier_value))


def is_qft_weight(x: Any) -> bool:
  return isinstance(x, QFTWeight)


def num_outliers(shape: tuple[int, int], outlier_fraction: float) -> int:
  """`ceil(fraction * N * K)`, the static outlier count of one matrix."""
  if not 0.0 <= outlier_fraction < 1.0:
    raise ValueError(f"outlier_fraction must be in [0, 1), got "
                     f"{outlier_fraction}")
  return math.ceil(outlier_fraction * shape[0] * shape[1])


def _flat(x: jax.Array) -> jax.Array:
  """(..., N, K) -> (B, N * K)."""
  return x.reshape(-1, x.shape[-2] * x.shape[-1])


def _scatter(flat: jax.Array, index: jax.Array, values) -> jax.Array:
  """`flat[b, index[b, j]] = values[b, j]` for `(B, M)` / `(B, n)` inputs."""
  b = jnp.arange(flat.shape[0])[:, None]
  return flat.at[b, index].set(values)


def _decompose(w: jax.Array, n_out: int, key: jax.Array | None,
               dtype) -> QFTWeight:
  """Top-|w| outliers + per-row int8 RTN (or stochastic) of the rest."""
  batch = w.shape[:-2]
  flat = _flat(w.astype(jnp.float32))
  _, index = jax.lax.top_k(jnp.abs(flat), n_out)
  values = jnp.take_along_axis(flat, index, axis=-1)
  dense = _scatter(flat, index, 0.0).reshape(w.shape)
  scale, _ = qa.uniform_params(dense, DENSE_CONFIG)
  noise = None if key is None else jax.random.uniform(key, w.shape)
  q = qa.quantize_with_params(dense, scale, None, DENSE_CONFIG, noise=noise)
  return QFTWeight(dense=dataclasses.replace(q, dtype=jnp.dtype(dtype)),
                   outlier_index=index.astype(jnp.int32).reshape(*batch, n_out),
                   outlier_value=values.reshape(*batch, n_out))


def qft_quantize(w: jax.Array, outlier_fraction: float = 0.01) -> QFTWeight:
  """Splits a float matrix `(..., N, K)` into int8 rows + float outliers.

  Args:
    w: float weights (leading batch axes, e.g. stacked layers, allowed).
    outlier_fraction: share of entries (largest |w| per matrix) kept in float.

  Returns:
    A `QFTWeight` with `ceil(outlier_fraction * N * K)` outliers per matrix;
    `|qft_dequantize(q) - w| <= s_n / 2` off the outliers, exact on them.

  Example:
    >>> w = qft_quantize(kernel, outlier_fraction=0.01)
  """
  if w.ndim < 2 or not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"qft_quantize expects a float matrix (..., N, K), got "
                     f"{w.dtype} {tuple(w.shape)}")
  return _decompose(w, num_outliers(w.shape[-2:], outlier_fraction), None,
                    w.dtype)


def _flat_index(w: QFTWeight) -> jax.Array:
  """(..., n) -> (B, n); explicit B so that n = 0 works."""
  return w.outlier_index.reshape(math.prod(w.batch_shape),
                                 w.outlier_index.shape[-1])


def qft_dequantize(w: QFTWeight, dtype=None) -> jax.Array:
  """The float matrix `(..., N, K)` represented by `w` (transient use only)."""
  dtype = w.dense.dtype if dtype is None else dtype
  dense = _flat(qa.dequantize(w.dense, jnp.float32))
  values = w.outlier_value.reshape(_flat_index(w).shape)
  out = _scatter(dense, _flat_index(w), values)
  return out.reshape(*w.batch_shape, *w.shape).astype(dtype)


def reselect_outliers(params: Any, key: jax.Array | None = None) -> Any:
  """Re-fits row scales and re-picks the outliers of every `QFTWeight`.

  Keeps each weight's outlier count (static shapes). Call it on a schedule
  (e.g. every few hundred steps): weights drift, and entries pushed past
  `127 * s_n` are clipped until their row scale is re-fitted here.

  Args:
    params: a `QFTWeight` or a pytree containing some.
    key: None for round-to-nearest requantization, or a PRNG key for
      stochastic rounding.
  """
  leaves, treedef = jax.tree.flatten(params, is_leaf=is_qft_weight)
  out = []
  for i, leaf in enumerate(leaves):
    if is_qft_weight(leaf):
      k = None if key is None else jax.random.fold_in(key, i)
      leaf = _decompose(qft_dequantize(leaf, jnp.float32),
                        leaf.outlier_index.shape[-1], k, leaf.dense.dtype)
    out.append(leaf)
  return treedef.unflatten(out)


def reselect_on_schedule(params: Any, step: jax.Array, every: int,
                         key: jax.Array | None = None) -> Any:
  """`reselect_outliers(params, key)` when `step > 0 and step % every == 0`.

  Usable inside a jitted train step (`lax.cond`: shapes never change, and
  the re-fit only runs on scheduled steps).
  """
  if every <= 0:
    raise ValueError(f"reselection interval must be positive, got {every}")
  due = (step > 0) & (step % every == 0)
  return jax.lax.cond(due, lambda p: reselect_outliers(p, key), lambda p: p,
                      params)


def _apply_one(w: QFTWeight, u: jax.Array, key: jax.Array | None
               ) -> tuple[QFTWeight, jax.Array]:
  """Requantizing update of one weight; returns it and #changed codes."""
  if u.shape != (*w.batch_shape, *w.shape):
    raise ValueError(f"QFT update has shape {u.shape}, expected "
                     f"{(*w.batch_shape, *w.shape)}")
  index = _flat_index(w)
  u_flat = _flat(u.astype(jnp.float32))
  on_outlier = _scatter(jnp.zeros(u_flat.shape, bool), index, True)
  u_dense = jnp.where(on_outlier, 0.0, u_flat).reshape(u.shape)
  old = qa.codes(w.dense)
  x = old.astype(jnp.float32) - _ZERO + u_dense / w.dense.scale
  if key is None:
    x = jnp.round(x)
  else:
    x = jnp.floor(x + jax.random.uniform(key, x.shape))
  new = (jnp.clip(x, -_ZERO, _ZERO - 1) + _ZERO).astype(jnp.uint8)
  values = w.outlier_value + jnp.take_along_axis(
      u_flat, index, axis=-1).reshape(w.outlier_value.shape)
  dense = dataclasses.replace(w.dense, qvalue=qa.pack(new, 8))
  changed = jnp.sum(new != old, dtype=jnp.int32)
  return QFTWeight(dense, w.outlier_index, values), changed


def qft_apply_updates(params: Any, updates: Any, key: jax.Array, *,
                      rounding: str = "stochastic") -> tuple[Any, jax.Array]:
  """`params + updates` with requantization of every `QFTWeight`.

  Args:
    params: pytree mixing `QFTWeight` and float leaves.
    updates: same structure, with a float `(..., N, K)` update in place of
      each `QFTWeight` (e.g. from an optax transform applied to the probe
      gradients); `None` leaves are left unchanged.
    key: PRNG key of this step (fold the step number in), used for
      stochastic rounding.
    rounding: "stochastic" (unbiased, the default) or "nearest".

  Returns:
    `(new_params, changed)`: `changed` is the float32 fraction of int8 codes
    that moved this step (log it: near 0 means the updates are lost).
  """
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
  p_leaves, treedef = jax.tree.flatten(params, is_leaf=is_qft_weight)
  u_leaves = treedef.flatten_up_to(updates)
  out, changed, total = [], jnp.zeros([], jnp.int32), 0
  for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
    if u is None:
      out.append(p)
    elif is_qft_weight(p):
      k = jax.random.fold_in(key, i) if rounding == "stochastic" else None
      p, c = _apply_one(p, u, k)
      out.append(p)
      changed += c
      total += p.dense.qvalue.size
    else:
      out.append((p + u).astype(p.dtype))
  return treedef.unflatten(out), changed.astype(jnp.float32) / max(total, 1)


def qft_probes(params: Any, dtype=jnp.float32) -> Any:
  """Zero probes `(..., N, K)` for every `QFTWeight`, None elsewhere.

  Build them inside the jitted step and differentiate the loss with respect
  to them (see `with_probes`): their gradients are the dense dL/dW.
  """
  return jax.tree.map(
      lambda p: jnp.zeros((*p.batch_shape, *p.shape), dtype)
      if is_qft_weight(p) else None, params, is_leaf=is_qft_weight)


def with_probes(params: Any, probes: Any) -> Any:
  """Replaces each `QFTWeight` by `QFTWithProbe(weight, probe)`."""
  return jax.tree.map(
      lambda p, pr: QFTWithProbe(p, pr) if is_qft_weight(p) else p,
      params, probes, is_leaf=is_qft_weight)
