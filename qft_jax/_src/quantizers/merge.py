"""Quantization-preserving LoRA merge: fold `s * B A` into a quantized base.

After LoRA fine-tuning on a quantized base `Q`, the effective weight is

    W_m = dequantize(Q) + s * B A,        s = alpha / r,

which is no longer on the quantization grid. The naive merge re-quantizes
`W_m` with round-to-nearest ("dequantize-add-RTN"): a fresh min-max grid
(which discards a learned clipping such as ApiQ's) and the update `s B A`,
mostly smaller than half a step, rounded away or turned into noise. Here,
at the same bits, group size and symmetry as `Q`, on calibration inputs
`H = 2 X^T X / n` of the layer, the objective `tr((deq(Q') - W_m) H (.)^T)`
is reduced in two steps:

  1. codes: GPTQ on the grid of `Q` (its scales and zero points), so each
     column's rounding error is compensated on the others;
  2. scales: with the codes fixed the objective is quadratic in the scales,
     solved exactly per row (`refit_scales`) -- a PEQA-style update that
     absorbs the part of `s B A` that rounding cannot express.

When `s B A` is below half a step nearly everywhere, step 1 returns the codes
of `Q` (nearest rounding with small error feedback flips no code) and the
gain comes from step 2.

Per-layer output error reported: `tr((W_hat - W_m) H (W_hat - W_m)^T)`
(= `(2 / n) ||X (W_hat - W_m)^T||^2`) for both merges, on the same inputs.

`merge_model` walks the decoder like GPTQ: the inputs of layer `l` come from
the model whose layers `< l` are already merged and re-quantized.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from qft_jax._src import qarray as qa
from qft_jax._src.models import llama
from qft_jax._src.quantizers import calibration as cal
from qft_jax._src.quantizers import gptq as gptq_lib
from qft_jax._src.quantizers import protocol

METHODS = ("gptq", "rtn")


def merged_weight(q: qa.QArray, lora_a: jax.Array, lora_b: jax.Array,
                  lora_scale: float) -> jax.Array:
  """`dequantize(q) + lora_scale * lora_b @ lora_a` in float32 `(N, K)`."""
  return qa.dequantize(q, jnp.float32) + lora_scale * jnp.dot(
      lora_b.astype(jnp.float32), lora_a.astype(jnp.float32),
      precision=jax.lax.Precision.HIGHEST)


def _same_format(q: qa.QArray) -> qa.QuantConfig:
  return qa.QuantConfig(bits=q.bits, group_size=q.group_size,
                        symmetric=q.zero_point is None and q.codebook is None,
                        codebook=q.codebook, scale_dtype=jnp.float32)


def refit_scales(q: qa.QArray, w: jax.Array, hessian: jax.Array,
                 ridge: float = 1e-6, chunk: int = 64) -> qa.QArray:
  """Least-squares scales for fixed codes: `min_s tr((W_hat - W) H (.)^T)`.

  With codes fixed, row `n` of `W_hat` is linear in its group scales,
  `W_hat[n] = sum_a s[n, a] P_a c[n]` (`c` the centered codes, `P_a` the
  columns of group `a`), so the optimal scales solve, per row, the `G x G`
  system

      (A_n + l I) s_n = b_n + l s_n^old,
      A_n[a, b] = c_a^T H_ab c_b,   b_n[a] = c_a^T (H w_n)_a,

  with a small Tikhonov pull `l = ridge * mean(diag A_n)` towards the old
  scales (groups whose codes all equal the zero point keep their scale).
  Zero points and codes are unchanged; a non-positive solution keeps the
  old scale.
  """
  n, k = q.shape
  g, num_groups = q.group_size, q.num_groups
  c = qa.centered_codes(q).reshape(n, num_groups, g)
  w = jnp.asarray(w, jnp.float32).reshape(n, num_groups, g)
  h = jnp.asarray(hessian, jnp.float32).reshape(num_groups, g, num_groups, g)
  old = qa.dense_scale(q)
  rows = -(-n // chunk) * chunk
  pad = lambda a: jnp.pad(a, [(0, rows - n)] + [(0, 0)] * (a.ndim - 1))
  hp = jax.lax.Precision.HIGHEST

  def solve(args):
    cr, wr, sr = args                                   # (R, G, g), (R, G)
    t = jnp.einsum("aibj,rbj->raib", h, cr, precision=hp)
    a = jnp.einsum("rai,raib->rab", cr, t, precision=hp)
    hw = jnp.einsum("aibj,rbj->rai", h, wr, precision=hp)
    b = jnp.einsum("rai,rai->ra", cr, hw, precision=hp)
    lam = ridge * jnp.mean(jnp.diagonal(a, axis1=1, axis2=2), -1) + 1e-30
    eye = jnp.eye(num_groups, dtype=jnp.float32)
    s = jnp.linalg.solve(a + lam[:, None, None] * eye,
                         (b + lam[:, None] * sr)[..., None])[..., 0]
    return jnp.where(s > 0, s, sr)

  split = lambda a: pad(a).reshape(rows // chunk, chunk, *a.shape[1:])
  new = jax.lax.map(solve, (split(c), split(w), split(old)))
  new = new.reshape(rows, num_groups)[:n]
  return dataclasses.replace(q, scale=new.astype(q.scale.dtype))


def requantize(w: jax.Array, like: qa.QArray, method: str,
               hessian: jax.Array | None = None, damp: float = 0.01,
               act_order: bool = True) -> qa.QArray:
  """Quantizes `w` in the format (bits, group, symmetry) of `like`.

  "rtn": round-to-nearest with fresh min-max parameters (the baseline).
  "gptq": GPTQ on the grid of `like` (its scales and zero points, so a
  learned clipping such as ApiQ's is kept), then `refit_scales`.

  Args:
    w: float `(N, K)` to quantize.
    like: a QArray whose format (and, for "gptq", grid) to keep.
    method: "gptq" (needs `hessian`) or "rtn".
    hessian: `2 X^T X / n` of the layer's inputs.
    damp: GPTQ relative damping.
    act_order: GPTQ act-order (on SmolLM2 it halves the merge's output error
      on held-out text).
  """
  if method not in METHODS:
    raise ValueError(f"merge method must be one of {METHODS}, got {method!r}")
  if isinstance(like.scale, qa.QArray):
    raise ValueError("merging into a double-quantized base is not supported")
  fmt = _same_format(like)
  if method == "rtn":
    q = qa.quantize(w, fmt)
  else:
    if like.codebook is not None:
      raise ValueError(f"GPTQ merge supports uniform codes, not codebook "
                       f"{like.codebook!r}; use method='rtn'")
    if hessian is None:
      raise ValueError("the GPTQ merge needs the layer's input Hessian")
    q = gptq_lib.gptq_quantize(
        w, hessian, gptq_lib.GPTQConfig(
            bits=like.bits, group_size=like.group_size,
            symmetric=fmt.symmetric, damp=damp, act_order=act_order),
        grid=(like.scale, like.zero_point))
    q = refit_scales(q, w, hessian)
  return dataclasses.replace(q, dtype=like.dtype,
                             scale=q.scale.astype(like.scale.dtype))


def merge_linear(q: qa.QArray, lora_a: jax.Array, lora_b: jax.Array,
                 lora_scale: float, method: str = "gptq",
                 hessian: jax.Array | None = None,
                 act_order: bool = True) -> qa.QArray:
  """Re-quantized merge of one LoRA linear (see the module docstring)."""
  return requantize(merged_weight(q, lora_a, lora_b, lora_scale), q, method,
                    hessian, act_order=act_order)


def merge_model(config: llama.LlamaConfig, layer_source: Callable[[int], dict],
                x0: jax.Array, method: str = "gptq", *, batch_size: int = 8,
                act_order: bool = True,
                log: Callable[[str], None] | None = None
                ) -> tuple[dict, list[dict]]:
  """Merges every decoder linear's LoRA into its quantized kernel.

  Args:
    config: model config (`lora_alpha / r` is the LoRA scale).
    layer_source: `l -> layer l` with QArray kernels and `lora_a`/`lora_b`.
    x0: embeddings of the calibration segments `(S, T, D)`.
    method: "gptq" (calibrated, sequential) or "rtn".
    batch_size: segments per forward pass.
    act_order: GPTQ act-order for the "gptq" merge.
    log: optional progress printer.

  Returns:
    (stacked layers with merged QArray kernels and no LoRA, per-layer reports
    `{linear: {"err_gptq"?, "err_rtn"}}` of output errors against `W_m` on the
    inputs the merged model sees).
  """
  if method not in METHODS:
    raise ValueError(f"merge method must be one of {METHODS}, got {method!r}")

  def quantize_layer(index, layer_lora, x_q, x_fp):
    del index, x_fp
    layer = layer_lora
    report = {}
    for group in cal.LINEAR_GROUPS:
      stats = cal.linear_stats(config, layer, x_q, group, batch_size)
      for name in group:
        lin = cal.get_linear(layer_lora, name)
        if "lora_a" not in lin:
          raise ValueError(f"linear {name} has no LoRA factors to merge")
        scale = config.lora_alpha / lin["lora_a"].shape[0]
        w_m = merged_weight(lin["kernel"], lin["lora_a"], lin["lora_b"],
                            scale)
        h = stats[name].hessian
        rtn = requantize(w_m, lin["kernel"], "rtn")
        entry = {"err_rtn": float(protocol.proxy_loss(
            w_m, qa.dequantize(rtn, jnp.float32), h))}
        new = rtn
        if method == "gptq":
          new = requantize(w_m, lin["kernel"], "gptq", h,
                           act_order=act_order)
          entry["err_gptq"] = float(protocol.proxy_loss(
              w_m, qa.dequantize(new, jnp.float32), h))
        report[name] = entry
        block, proj = name.split("/")
        layer = dict(layer)
        layer[block] = dict(layer[block])
        layer[block][proj] = {"kernel": new}
    return layer, report, None

  return cal.sequential(config, layer_source, x0, quantize_layer,
                        batch_size=batch_size, log=log)
