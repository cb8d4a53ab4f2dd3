"""PEQA: fine-tune only the quantization scales of a quantized model.

Kim et al., 2023, "Memory-Efficient Fine-Tuning of Compressed Large Language
Models via sub-4-bit Integer Quantization" (arXiv 2305.14152, sec. 3.1): the
tuned weight is

    W = (s0 + ds) * (q0 - z0)        (per row, or per group of columns)

with the integer codes `q0` and zero points `z0` frozen. Only the `scale`
leaves of each `QArray` train, so the result is still a valid quantized model
(nothing to merge). The model must call `qdot` with `trainable="scale"`
(`LlamaConfig(matmul_trainable="scale")`), which returns d(scale).

Example:
  >>> scales, frozen = peqa_split(params)
  >>> grads = jax.grad(lambda s: loss(masks.combine(s, frozen)))(scales)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from qft_jax._src import qarray as qa
from qft_jax._src.optim import masks


def peqa_mask(params: Any) -> Any:
  """Boolean mask with the structure of `params`: True on QArray scales only.

  Norm scales and other float leaves are False; matching by type rather than
  by the path suffix `scale` keeps RMSNorm's `scale` frozen.

  Raises:
    ValueError: `params` holds no QArray.
  """
  found = []

  def leaf_mask(x):
    if qa.is_qarray(x):
      found.append(x)
      return dataclasses.replace(
          x, qvalue=False, scale=True,
          zero_point=None if x.zero_point is None else False)
    return jax.tree.map(lambda _: False, x)

  mask = jax.tree.map(leaf_mask, params, is_leaf=qa.is_qarray)
  if not found:
    raise ValueError("PEQA needs quantized kernels: the parameters hold no "
                     "QArray (quantize the model first)")
  return mask


def peqa_split(params: Any) -> tuple[Any, Any]:
  """`(scales, frozen)`: the QArray scales, and everything else (codes,
  zero points, norms, embeddings), split as in `masks.split`."""
  return masks.split(params, peqa_mask(params))
