"""LoRA as a pure transform over the parameter tree (LoRA, QLoRA, ModuLoRA).

Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", sec. 4.1:
a frozen linear `W` `(out, in)` gains a trainable low-rank branch

    y = x W^T + (alpha / r) (x A^T) B^T,   A: (r, in), B: (out, r)

with `A` Kaiming-uniform (PyTorch/PEFT's `kaiming_uniform_(a=sqrt(5))`, i.e.
`U(-1/sqrt(in), 1/sqrt(in))`) and `B = 0`, so training starts from the base
model. `init_lora` adds `lora_a` / `lora_b` beside every targeted `kernel` (the
layout `models/llama.py` reads); `qmatmul.linear` computes the branch in
float32 without ever forming `W + B A`.

The base kernel may be float (LoRA), an NF4 `QArray` (QLoRA, Dettmers et al.,
2023) or any quantizer's `QArray` (ModuLoRA, Yin et al., 2023): the base runs
through `qdot` in frozen mode (dx only), so only the LoRA factors train.
LoRA dropout is not implemented: `LoraSpec.dropout` must be 0 (a clear error
otherwise), as in QLoRA's and ModuLoRA's 7B+ settings.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from qft_jax._src import qarray as qa
from qft_jax._src.optim import masks

LORA_KEYS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Where and how to add LoRA.

  Attributes:
    rank: `r`.
    alpha: the branch is scaled by `alpha / r`.
    dropout: must be 0.0: dropout on the LoRA branch is not implemented.
    targets: regexes searched in the path of each linear module (the path of
      its `kernel` without "/kernel", e.g. `layers/attn/q_proj`); every regex
      must match at least one module.
    dtype: dtype of the LoRA factors (float32 keeps LoRA math exact).
  """
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = (r"attn/(q|v)_proj$",)
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.rank <= 0:
      raise ValueError(f"LoRA rank must be positive, got {self.rank}")
    if self.dropout != 0.0:
      raise ValueError(f"LoRA dropout is not implemented (got {self.dropout}); "
                       "use 0.0")
    if isinstance(self.targets, str) or not self.targets:
      raise ValueError(f"targets must be a non-empty tuple of regexes, got "
                       f"{self.targets!r}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _kernel_shape(kernel: Any) -> tuple[tuple[int, ...], int, int]:
  """`(batch_shape, out, in)` of a float or QArray kernel."""
  if qa.is_qarray(kernel):
    return tuple(kernel.batch_shape), *kernel.shape
  *batch, n, k = jnp.shape(kernel)
  return tuple(batch), n, k


def _modules(params: Any, prefix: str = ""):
  """Yields `(path, module_dict)` for every dict holding a `kernel`."""
  if isinstance(params, dict):
    if "kernel" in params:
      yield prefix, params
    for name, sub in params.items():
      if isinstance(sub, dict):
        yield from _modules(sub, f"{prefix}/{name}" if prefix else str(name))


def _map_modules(params: Any, fn, prefix: str = "") -> Any:
  """Copies the nested dicts, replacing each module dict `m` by `fn(path, m)`."""
  if not isinstance(params, dict):
    return params
  if "kernel" in params:
    return fn(prefix, params)
  return {name: _map_modules(sub, fn, f"{prefix}/{name}" if prefix else
                             str(name)) for name, sub in params.items()}


def init_lora(params: Any, spec: LoraSpec, key: jax.Array) -> Any:
  """Adds `lora_a` `(*batch, r, in)` and `lora_b` `(*batch, out, r)` to targets.

  Stacked kernels keep their leading layer axis. Returns a new tree; `params`
  is not modified.

  Raises:
    ValueError: a target regex matched no linear module, or a target already
      has LoRA factors.
  """
  regexes = [re.compile(t) for t in spec.targets]
  paths = [p for p, _ in _modules(params)]
  unused = [t for t, r in zip(spec.targets, regexes)
            if not any(r.search(p) for p in paths)]
  if unused:
    raise ValueError(f"LoRA targets matched no linear module: {unused}; "
                     f"modules: {paths}")
  selected = [p for p in paths if any(r.search(p) for r in regexes)]
  keys = dict(zip(selected, jax.random.split(key, len(selected))))

  def add(path, module):
    if path not in keys:
      return dict(module)
    if any(k in module for k in LORA_KEYS):
      raise ValueError(f"{path} already has LoRA factors")
    batch, n, k = _kernel_shape(module["kernel"])
    bound = 1.0 / math.sqrt(k)
    a = jax.random.uniform(keys[path], (*batch, spec.rank, k), spec.dtype,
                           -bound, bound)
    return {**module, "lora_a": a,
            "lora_b": jnp.zeros((*batch, n, spec.rank), spec.dtype)}

  return _map_modules(params, add)


def lora_mask(params: Any) -> Any:
  """Boolean mask: True on `lora_a` / `lora_b` leaves only."""
  return masks.trainable_mask(params, [(r"(^|/)lora_[ab]$", True)],
                              default=False)


def split_lora(params: Any) -> tuple[Any, Any]:
  """`(lora, base)` as in `masks.split`; undo with `combine`."""
  return masks.split(params, lora_mask(params))


combine = masks.combine


def merge_lora(params: Any, spec: LoraSpec) -> Any:
  """Float params with every LoRA branch folded in: `W + (alpha/r) B A`.

  Every QArray kernel is dequantized (to its `dtype`), with or without LoRA,
  so the result is a plain float model (for export); the sum is computed in
  float32 and cast to the base dtype.
  """
  def merge(path, module):
    kernel = module["kernel"]
    w = (qa.dequantize(kernel, jnp.float32) if qa.is_qarray(kernel)
         else kernel.astype(jnp.float32))
    dtype = kernel.dtype
    if "lora_a" not in module:
      return {**module, "kernel": w.astype(dtype)}
    a = module["lora_a"].astype(jnp.float32)
    b = module["lora_b"].astype(jnp.float32)
    if a.shape[-2] != spec.rank:
      raise ValueError(f"{path}: lora_a has rank {a.shape[-2]}, spec says "
                       f"{spec.rank}")
    w = w + spec.scale * jnp.einsum("...or,...ri->...oi", b, a,
                                    precision=jax.lax.Precision.HIGHEST)
    rest = {k: v for k, v in module.items() if k not in LORA_KEYS}
    return {**rest, "kernel": w.astype(dtype)}

  return _map_modules(params, merge)
