"""The quantized matmul: `y = x @ dequantize(W)^T` with a memory-lean VJP.

`qdot` is the one place where a `QArray` meets activations. Its custom VJP
saves only `x` and the integer pytree (never the dequantized weight) and, in
the backward pass, re-materializes `deq(W)` for the input gradient

    dx = dy @ deq(W)                                    (..., N) -> (..., K)

and, depending on what trains,

    "none":   nothing else (frozen base: LoRA, QLoRA, ModuLoRA, ApiQ);
    "scale":  d scale[n, j] = sum_{k in group j} (dy^T x)[n, k] * c[n, k],
              with c = q - z (uniform) or codebook[q]   (PEQA);
    "weight": dW = dy^T x, delivered as the cotangent of `weight_probe`, a
              float (N, K) array whose value is ignored    (QFT).

Integer leaves and frozen scales get zero cotangents (`None`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from qft_jax._src import qarray as qa
from qft_jax._src import sharding

TRAINABLE_MODES = ("none", "scale", "weight")
IMPLEMENTATIONS = (None, "xla", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class QDotConfig:
  """Static knobs of `qdot` (hashable: one compiled VJP per config)."""
  trainable: str = "none"
  implementation: str | None = None

  def __post_init__(self):
    if self.trainable not in TRAINABLE_MODES:
      raise ValueError(f"trainable must be one of {TRAINABLE_MODES}, got "
                       f"{self.trainable!r}")
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, "
                       f"got {self.implementation!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WeightWithProbe:
  """A QArray whose dense weight gradient is wanted (QFT).

  `probe` is a float `(..., N, K)` placeholder; its value is ignored by the
  forward pass and its cotangent is `dL/dW`. Build it inside the jitted step
  (`jnp.zeros`) so it is never materialized as an input buffer.
  """
  q: qa.QArray
  probe: jax.Array


# With `implementation=None` the Pallas kernels are used only where they were
# measured faster than XLA's dequantize-then-matmul: decode-sized M (H100,
# experiments/results/kernels_h100_2026-11-27.json), and at training shapes
# where the Mosaic GPU kernels apply (4-bit uniform codes on Hopper,
# `kernels.can_use_mosaic` / `can_use_mosaic_dx`): the forward on the H100
# (mgpu_train_h100_2026-11-28.json), the input gradient on an H200
# (mgpu_train_dx_h200_2026-11-28_s13.json against kernels_h200_2026-11-28_
# run12.json's dequantize-then-matmul rows; in kernels_h200_2026-11-28_
# run14.json 7-12 % ahead of it at all three shapes, and the whole LoRA step
# 8 % faster, pallas_training_int4_h200_2026-11-28_s15.json). Else,
# at M > AUTO_PALLAS_MAX_M and for the 3-bit input gradient, XLA wins.
AUTO_PALLAS_MAX_M = 16


def _use_pallas(x2d: jax.Array, w: qa.QArray, implementation,
                gate: str = "can_use") -> bool:
  if implementation == "xla":
    return False
  forced = implementation in ("pallas", "pallas_interpret")
  try:
    from pallas_kernels import qmatmul as kernels  # pylint: disable=g-import-not-at-top
  except ImportError:
    if forced:
      raise
    return False
  if implementation is None and x2d.shape[0] > AUTO_PALLAS_MAX_M:
    # Under a device mesh XLA would replicate a custom call's operands
    # (activations included); the XLA path shards.
    mosaic = (kernels.can_use_mosaic if gate == "can_use"
              else kernels.can_use_mosaic_dx)
    return sharding.compute_mesh_size() == 1 and mosaic(x2d, w)[0]
  if implementation is None and gate == "can_use_dx" and w.bits == 3:
    return False
  ok, reason = getattr(kernels, gate)(
      x2d, w, interpret=implementation == "pallas_interpret")
  if forced and not ok:
    raise ValueError(f"the Pallas qmatmul kernel cannot run here: {reason}")
  return ok


def _dense_weight(w: qa.QArray, sparse, dtype) -> jax.Array:
  """The transient float weight `deq(W) + S` (S: sparse float outliers)."""
  # Sharded (FSDP): all-gather the codes, not the dequantized floats.
  w, sparse = sharding.gather_for_compute((w, sparse))
  if sparse is None:
    return qa.dequantize(w, dtype)
  index, values = sparse
  wd = qa.dequantize(w, jnp.float32).reshape(-1).at[index].add(values)
  return wd.reshape(w.shape).astype(dtype)


def _forward(x2d: jax.Array, w: qa.QArray, sparse, implementation
             ) -> jax.Array:
  if sparse is None and _use_pallas(x2d, w, implementation):
    from pallas_kernels import qmatmul as kernels  # pylint: disable=g-import-not-at-top
    return kernels.fwd(x2d, w, interpret=implementation == "pallas_interpret")
  wd = _dense_weight(w, sparse, x2d.dtype)
  return jnp.dot(x2d, wd.T, preferred_element_type=jnp.float32
                 ).astype(x2d.dtype)


def _input_grad(dy2d: jax.Array, w: qa.QArray, sparse, implementation
                ) -> jax.Array:
  if sparse is None and _use_pallas(dy2d, w, implementation,
                                    gate="can_use_dx"):
    from pallas_kernels import qmatmul as kernels  # pylint: disable=g-import-not-at-top
    return kernels.dx(dy2d, w, interpret=implementation == "pallas_interpret")
  wd = _dense_weight(w, sparse, dy2d.dtype)
  return jnp.dot(dy2d, wd, preferred_element_type=jnp.float32
                 ).astype(dy2d.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qdot2d(config: QDotConfig, x2d, w, probe, sparse):
  del probe
  return _forward(x2d, w, sparse, config.implementation)


def _qdot2d_fwd(config, x2d, w, probe, sparse):
  # A size-0 array remembers the probe's dtype (its gradient's dtype).
  probe_dtype = None if probe is None else jnp.zeros((0,), probe.dtype)
  return (_forward(x2d, w, sparse, config.implementation),
          (x2d, w, sparse, probe_dtype))


def _qdot2d_bwd(config, residuals, dy):
  x2d, w, sparse, probe_dtype = residuals
  # The barrier makes the backward's dequantization a computation of its
  # own, ordered after `dy` exists: without it XLA merges it with the
  # forward's (CSE) and keeps every dequantized weight of a recomputed layer
  # alive from forward to backward (0.4 GB a LLaMA-7B layer in bf16).
  w, sparse, dy = jax.lax.optimization_barrier((w, sparse, dy))
  dx = _input_grad(dy, w, sparse, config.implementation).astype(x2d.dtype)
  dw = None
  dprobe = None
  if config.trainable != "none":
    if config.trainable == "weight":  # dense dL/dW (N, K), probe's dtype
      dprobe = jnp.dot(dy.T, x2d, preferred_element_type=probe_dtype.dtype)
    else:
      grad_w = jnp.dot(dy.T, x2d, preferred_element_type=jnp.float32)
      per_code = grad_w * qa.centered_codes(w)
      dscale = per_code.reshape(*per_code.shape[:-1], w.num_groups,
                                w.group_size).sum(-1)
      dw = dataclasses.replace(
          w, qvalue=None, scale=dscale.astype(w.scale.dtype),
          zero_point=None)
  # Outliers are frozen here: QFT reads their gradient off the probe.
  return dx, dw, dprobe, None


_qdot2d.defvjp(_qdot2d_fwd, _qdot2d_bwd)


def qdot(x: jax.Array, w: qa.QArray, *, trainable: str = "none",
         implementation: str | None = None,
         weight_probe: jax.Array | None = None,
         sparse: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """`x @ (dequantize(w) + S).T` with gradients routed through dequantization.

  Args:
    x: activations `(..., K)`, float (bf16/f16/f32).
    w: a QArray of logical shape `(N, K)` and no batch axes.
    trainable: "none" (dx only), "scale" (dx and d scale) or "weight" (dx and
      dW through `weight_probe`).
    implementation: None (Pallas kernels on GPU when their gate passes, else
      XLA), "xla", "pallas" (raises if the kernels cannot run) or
      "pallas_interpret" (the kernels in the Pallas interpreter, any backend:
      slow, for checking a model's Pallas path on a CPU).
    weight_probe: float `(N, K)`, required iff trainable == "weight"; its
      value is ignored and its cotangent is dL/dW.
    sparse: optional float outliers `S` as `(flat_index int32 (n,), values
      (n,))` with `flat_index = row * K + col`, added to the transient
      dequantized weight (one matmul; QFT). They get no gradient here.

  Returns:
    `(..., N)` in `x.dtype`, accumulated in float32.
  """
  if not isinstance(w, qa.QArray):
    raise ValueError(f"qdot expects a QArray weight, got {type(w).__name__}")
  if w.batch_shape:
    raise ValueError(
        f"qdot expects one matrix; got a QArray with batch axes "
        f"{w.batch_shape} (slice stacked layers first, e.g. inside lax.scan)")
  n, k = w.shape
  if x.shape[-1] != k:
    raise ValueError(f"qdot shape mismatch: x has last dimension "
                     f"{x.shape[-1]} but the weight is {n}x{k} (out x in)")
  config = QDotConfig(trainable=trainable, implementation=implementation)
  if (trainable == "weight") != (weight_probe is not None):
    raise ValueError("weight_probe must be given exactly when "
                     "trainable == 'weight'")
  if weight_probe is not None and weight_probe.shape != (n, k):
    raise ValueError(f"weight_probe has shape {weight_probe.shape}, "
                     f"expected {(n, k)}")
  x2d = x.reshape(-1, k)
  y = _qdot2d(config, x2d, w, weight_probe, sparse)
  return y.reshape(*x.shape[:-1], n)


def linear(x: jax.Array, kernel: Any, *, lora: dict | None = None,
           lora_scale: float = 1.0, trainable: str = "none",
           implementation: str | None = None) -> jax.Array:
  """A bias-free linear layer over a float, quantized or probed kernel.

  `y = x @ W^T + lora_scale * (x @ A^T) @ B^T`, the LoRA branch in float32 and
  never folded into `W`.

  Args:
    x: `(..., K)`.
    kernel: float `(N, K)`, a `QArray` `(N, K)`, `WeightWithProbe`, or an
      object with `apply_linear(x, implementation=...)` (`optim.qft`'s
      `QFTWeight` / `QFTWithProbe`).
    lora: None or `{"a": (r, K), "b": (N, r)}`.
    lora_scale: LoRA's `alpha / r`.
    trainable: passed to `qdot` for a QArray kernel ("none" or "scale").
    implementation: passed to `qdot`.

  Returns:
    `(..., N)` in `x.dtype`.
  """
  if hasattr(kernel, "apply_linear"):  # composite kernels, e.g. QFT weights
    y = kernel.apply_linear(x, implementation=implementation)
  elif isinstance(kernel, WeightWithProbe):
    y = qdot(x, kernel.q, trainable="weight", implementation=implementation,
             weight_probe=kernel.probe)
  elif isinstance(kernel, qa.QArray):
    y = qdot(x, kernel, trainable=trainable, implementation=implementation)
  else:
    if kernel.ndim != 2 or kernel.shape[-1] != x.shape[-1]:
      raise ValueError(f"linear shape mismatch: x {x.shape} vs kernel "
                       f"{kernel.shape} (out x in)")
    # Output in x.dtype (the GPU accumulates bf16 products in float32
    # anyway): a float32 output would make the backward multiply a float32
    # cotangent by the bf16 kernel, i.e. convert the whole kernel to float32
    # (0.5 GB for a 32k x 4096 head) and run the matmul in float32.
    y = jnp.dot(x, kernel.astype(x.dtype).T)
  if lora is not None:
    a, b = lora["a"], lora["b"]
    h = jnp.dot(x.astype(jnp.float32), a.astype(jnp.float32).T)
    y = (y.astype(jnp.float32)
         + lora_scale * jnp.dot(h, b.astype(jnp.float32).T)).astype(x.dtype)
  return y
