"""Lion with its momentum stored as int8 with block-wise float32 scales.

Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms",
Alg. 2) keeps one moment `m` per parameter:

    c = b1 * m + (1 - b1) * g
    update = sign(c)
    m <- b2 * m + (1 - b2) * g

Here `m` lives in the optimizer state as int8 codes (same shape as the
parameter, so it shards like the parameter) plus one float32 absmax scale per
block of `block_size` consecutive entries of the flattened leaf (the last
block zero-padded), as in bitsandbytes' 8-bit optimizers (Dettmers et al.,
2022, "8-bit Optimizers via Block-wise Quantization", sec. 2):

    s_b = max_{i in b} |m_i| / 127,   code_i = clip(rnd(m_i / s_b), -127, 127)

Each step dequantizes `m` to float32, applies the update above, and
requantizes; `rnd` is round-to-nearest, or stochastic rounding
`floor(x + u)`, `u ~ U[0, 1)` (unbiased: `E[code] = m / s`), keyed by a PRNG
key in the state folded with the step count. State bytes per parameter:
1 + 4 / block_size.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

INT8_MAX = 127


class ScaleByLionInt8State(NamedTuple):
  """State of `scale_by_lion_int8`.

  Attributes:
    count: int32 `()`, number of updates so far.
    mu: int8 momentum codes, one leaf per parameter, same shapes.
    mu_scale: float32 `(ceil(size / block_size),)` per parameter.
    key: uint32 raw PRNG key data `(2,)` for stochastic rounding.
  """
  count: jax.Array
  mu: Any
  mu_scale: Any
  key: jax.Array


def num_blocks(size: int, block_size: int) -> int:
  return max(1, math.ceil(size / block_size))


def _to_blocks(x: jax.Array, block_size: int) -> jax.Array:
  """Flattens `x` to float32 `(num_blocks, block_size)`, zero-padded."""
  flat = x.reshape(-1).astype(jnp.float32)
  nb = num_blocks(flat.size, block_size)
  return jnp.pad(flat, (0, nb * block_size - flat.size)).reshape(nb, block_size)


def quantize_blockwise(x: jax.Array, block_size: int,
                       key: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 absmax quantization per block of the flattened `x`.

  Args:
    x: float array of any shape.
    block_size: entries per scale.
    key: None for round-to-nearest, or a PRNG key for stochastic rounding.

  Returns:
    int8 codes with the shape of `x`, float32 scales `(num_blocks,)`.
  """
  blocks = _to_blocks(x, block_size)
  scale = jnp.max(jnp.abs(blocks), axis=-1) / INT8_MAX
  y = blocks / jnp.where(scale == 0, 1.0, scale)[:, None]
  if key is None:
    y = jnp.round(y)
  else:
    y = jnp.floor(y + jax.random.uniform(key, y.shape, jnp.float32))
  codes = jnp.clip(y, -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return codes.reshape(-1)[:x.size].reshape(x.shape), scale


def dequantize_blockwise(codes: jax.Array, scale: jax.Array,
                         block_size: int) -> jax.Array:
  """Inverse of `quantize_blockwise`: float32 array of `codes.shape`."""
  blocks = _to_blocks(codes, block_size) * scale[:, None]
  return blocks.reshape(-1)[:codes.size].reshape(codes.shape)


def scale_by_lion_int8(b1: float = 0.9, b2: float = 0.99,
                       block_size: int = 256,
                       stochastic_rounding: bool = False,
                       seed: int = 0) -> optax.GradientTransformation:
  """Lion's sign update with int8 block-quantized momentum.

  Args:
    b1: interpolation between momentum and gradient for the update sign.
    b2: momentum decay.
    block_size: flattened entries per float32 scale (static; pass it in
      `static_args` when wrapping with `optax.inject_hyperparams`).
    stochastic_rounding: requantize with `floor(x + U[0, 1))` instead of
      round-to-nearest.
    seed: seed of the rounding noise (static under `inject_hyperparams`).

  Returns:
    An optax transformation whose updates are `sign(c)` in the gradient dtype
    (scale by `-learning_rate` afterwards).

  Example:
    >>> tx = optax.chain(scale_by_lion_int8(), optax.scale(-1e-4))
  """
  if not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")

  def init_fn(params):
    mu = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.int8), params)
    mu_scale = jax.tree.map(
        lambda p: jnp.zeros((num_blocks(p.size, block_size),), jnp.float32),
        params)
    return ScaleByLionInt8State(
        count=jnp.zeros([], jnp.int32), mu=mu, mu_scale=mu_scale,
        key=jax.random.key_data(jax.random.key(seed)))

  def update_fn(updates, state, params=None):
    del params
    beta1 = jnp.asarray(b1, jnp.float32)
    beta2 = jnp.asarray(b2, jnp.float32)
    leaves, treedef = jax.tree.flatten(updates)
    codes = treedef.flatten_up_to(state.mu)
    scales = treedef.flatten_up_to(state.mu_scale)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key),
                                  state.count)
    new_updates, mu, mu_scale = [], [], []
    for i, (g, code, scale) in enumerate(zip(leaves, codes, scales)):
      m = dequantize_blockwise(code, scale, block_size)
      g32 = g.astype(jnp.float32)
      new_updates.append(
          jnp.sign(beta1 * m + (1.0 - beta1) * g32).astype(g.dtype))
      m = beta2 * m + (1.0 - beta2) * g32
      key = jax.random.fold_in(step_key, i) if stochastic_rounding else None
      code, scale = quantize_blockwise(m, block_size, key)
      mu.append(code)
      mu_scale.append(scale)
    new_updates, mu, mu_scale = (treedef.unflatten(x)
                                 for x in (new_updates, mu, mu_scale))
    return new_updates, ScaleByLionInt8State(
        count=optax.safe_increment(state.count), mu=mu, mu_scale=mu_scale,
        key=state.key)

  return optax.GradientTransformation(init_fn, update_fn)


def lion_int8(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
              b2: float = 0.99, weight_decay: float = 1e-3,
              mask: Any = None, *, block_size: int = 256,
              stochastic_rounding: bool = False,
              seed: int = 0) -> optax.GradientTransformation:
  """`optax.lion` with int8 block-wise momentum (1 + 4/block_size bytes/param).

  `update = -lr * (sign(b1 m + (1 - b1) g) + weight_decay * w)`.

  Args:
    learning_rate: float or optax schedule.
    b1, b2: Lion's interpolation and momentum decay.
    weight_decay: decoupled weight decay strength.
    mask: pytree / callable selecting the leaves that decay (as in optax).
    block_size, stochastic_rounding, seed: see `scale_by_lion_int8`.

  Example:
    >>> tx = lion_int8(1e-4, weight_decay=0.1)
    >>> # inject_hyperparams needs the int knobs static:
    >>> tx = optax.inject_hyperparams(
    ...     lion_int8, static_args=("block_size", "seed"))(learning_rate=1e-4)
  """
  return optax.chain(
      scale_by_lion_int8(b1=b1, b2=b2, block_size=block_size,
                         stochastic_rounding=stochastic_rounding, seed=seed),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
