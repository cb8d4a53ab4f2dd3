"""Calibration: token segments, per-layer execution, and captured layer inputs.

Post-training quantizers that look at data (GPTQ, ApiQ) walk the decoder one
layer at a time. Layer `l`'s float parameters are brought to the device, the
calibration activations `X_q` (the already-quantized model's hidden states
entering layer `l`) and, where needed, `X_fp` (the float model's) are pushed
through it, the inputs of its linears are captured, the layer is quantized,
and only then is the next layer read. The float model is never on the
accelerator as a whole: a layer source yields one host copy of a layer at a
time, and the quantized layers are stacked at the end.

Linear inputs are captured with `flax.linen.intercept_methods` on
`llama.Linear`, so the model code needs no hooks. Statistics are accumulated
in float32 over batches of segments: `H = 2 X^T X / n` and, for ApiQ's
layer-wise objective, `C = 2 X_fp^T X / n` (see `protocol.LayerStats`).
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qft_jax._src import qarray as qa
from qft_jax._src.models import llama
from qft_jax._src.quantizers import protocol

_HP = jax.lax.Precision.HIGHEST

# Linears that share an input, in forward order (GPTQ's "true sequential").
LINEAR_GROUPS = (("attn/q_proj", "attn/k_proj", "attn/v_proj"),
                 ("attn/o_proj",),
                 ("mlp/gate_proj", "mlp/up_proj"),
                 ("mlp/down_proj",))


def calibration_segments(token_ids: Sequence[int], num_segments: int,
                         seq_len: int, seed: int = 0) -> np.ndarray:
  """Random, non-overlapping segments of a tokenized calibration text.

  The text is cut into `len // seq_len` consecutive windows and
  `num_segments` of them are drawn without replacement (GPTQ samples random
  segments of its calibration text; drawing from disjoint windows keeps them
  distinct).

  Args:
    token_ids: the tokenized text `(n,)`.
    num_segments: how many segments.
    seq_len: tokens per segment.
    seed: numpy seed of the draw.

  Returns:
    int32 `(num_segments, seq_len)`.

  Raises:
    ValueError: the text has fewer than `num_segments * seq_len` tokens.
  """
  if num_segments <= 0 or seq_len <= 1:
    raise ValueError(f"need num_segments >= 1 and seq_len >= 2, got "
                     f"{num_segments} and {seq_len}")
  ids = np.asarray(token_ids, np.int32)
  windows = len(ids) // seq_len
  if windows < num_segments:
    raise ValueError(
        f"calibration text too short: {len(ids)} tokens make {windows} "
        f"segments of {seq_len}, but {num_segments} were requested "
        f"(need at least {num_segments * seq_len} tokens)")
  pick = np.random.default_rng(seed).choice(windows, num_segments,
                                            replace=False)
  return ids[:windows * seq_len].reshape(windows, seq_len)[np.sort(pick)]


def _strings(record) -> list[str]:
  if isinstance(record, str):
    return [record] if record.strip() else []
  if isinstance(record, dict):
    return [s for v in record.values() for s in _strings(v)]
  if isinstance(record, list):
    return [s for v in record for s in _strings(v)]
  return []


def read_calibration_text(path) -> str:
  """The text of a calibration file.

  `.txt` (and other suffixes): the file as is. `.json` / `.jsonl`: the string
  fields of each record joined by newlines, records separated by a blank
  line (Alpaca, GSM8K, DialogSum). `.tsv`: the first column of each row
  after the header (SST-2 sentences).
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"calibration file not found: {path}")
  text = path.read_text(encoding="utf-8")
  if path.suffix == ".json":
    records = json.loads(text)
  elif path.suffix == ".jsonl":
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
  elif path.suffix == ".tsv":
    return "\n".join(line.split("\t")[0] for line in text.splitlines()[1:])
  else:
    return text
  if not isinstance(records, list):
    records = [records]
  return "\n\n".join("\n".join(_strings(r)) for r in records)


def text_segments(tokenizer, paths, num_segments: int, seq_len: int,
                  seed: int = 0) -> np.ndarray:
  """`calibration_segments` of one or more calibration files.

  Args:
    tokenizer: has `encode(text, add_bos=False)`.
    paths: a path, a comma-separated string of paths, or a list. Each file
      (`read_calibration_text`) is encoded as one string without BOS; with
      several files the segments are shared out evenly (the first
      `num_segments % len(paths)` files give one more), so a large file does
      not crowd out a small one.
    num_segments, seq_len, seed: see `calibration_segments`.
  """
  if isinstance(paths, (str, pathlib.Path)):
    paths = [p for p in str(paths).split(",") if p]
  if not paths or num_segments < len(paths):
    raise ValueError(f"need at least one segment per calibration file, got "
                     f"{num_segments} segments for {len(paths)} files")
  parts = []
  for i, path in enumerate(paths):
    count = num_segments // len(paths) + (i < num_segments % len(paths))
    ids = tokenizer.encode(read_calibration_text(path), add_bos=False)
    parts.append(calibration_segments(ids, count, seq_len, seed + i))
  return np.concatenate(parts, axis=0)


# ---------------------------------------------------------------- layers ----


def layer_slice(stacked: Any, index: int) -> Any:
  """Layer `index` of a stacked layer tree (QArrays included), host copy."""
  return jax.tree.map(lambda a: np.asarray(a[index]), stacked)


def stack_layers(layers: Sequence[Any]) -> Any:
  """Stacks per-layer trees along a new leading axis (on the device)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def layers_from_params(params: dict) -> Callable[[int], dict]:
  """A layer source over loaded params: `l -> layer l` as host arrays."""
  layers = params["layers"]
  return lambda index: layer_slice(layers, index)


def layers_from_tensors(config: llama.LlamaConfig, tensors: dict,
                        dtype=np.float32) -> Callable[[int], dict]:
  """A layer source over a loader's lazy tensors (`models.loading`).

  Reads `layers/{l}/...` entries only when layer `l` is requested, so a
  model larger than the accelerator (or host memory) can be calibrated.
  """
  def source(index: int) -> dict:
    prefix = f"layers/{index}/"
    tree = {}
    for path, read in tensors.items():
      if not path.startswith(prefix):
        continue
      node = tree
      *parents, leaf = path[len(prefix):].split("/")
      for key in parents:
        node = node.setdefault(key, {})
      node[leaf] = np.asarray(read(), dtype)
    if not tree:
      raise ValueError(f"no tensors for layer {index} (config has "
                       f"{config.num_layers} layers)")
    return tree
  return source


def get_linear(layer: dict, name: str) -> dict:
  """The `{"kernel", ...}` sub-dict of a linear, `name` like "attn/q_proj"."""
  node = layer
  for key in name.split("/"):
    node = node[key]
  return node


def set_linear(layer: dict, name: str, entries: dict) -> dict:
  """A copy of `layer` with the linear `name`'s sub-dict updated."""
  block, proj = name.split("/")
  new = dict(layer)
  new[block] = dict(layer[block])
  new[block][proj] = {**layer[block][proj], **entries}
  return new


def _rope_and_mask(config: llama.LlamaConfig, t: int):
  positions = jnp.arange(t)[None]
  cos, sin = llama.rope_cos_sin(config, positions)
  return cos, sin, llama.attention_mask_matrix(config, t, t, 0)


def apply_layer(config: llama.LlamaConfig, layer: dict, x: jax.Array
                ) -> jax.Array:
  """One decoder layer on hidden states `x` `(B, T, D)` (positions 0..T-1)."""
  cos, sin, mask = _rope_and_mask(config, x.shape[1])
  y, _ = llama.DecoderLayer(config).apply({"params": layer}, x, cos, sin,
                                          mask, None, None)
  return y


def apply_layer_capturing(config: llama.LlamaConfig, layer: dict,
                          x: jax.Array) -> tuple[jax.Array, dict]:
  """`apply_layer` plus the input of every linear, keyed "attn/q_proj"."""
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    if (isinstance(context.module, llama.Linear)
        and context.method_name == "__call__"):
      captured["/".join(context.module.path[-2:])] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    y = apply_layer(config, layer, x)
  return y, captured


@functools.partial(jax.jit, static_argnames=("config",))
def _apply_layer_jit(config, layer, x):
  return apply_layer(config, layer, x)


def run_layer(config: llama.LlamaConfig, layer: dict, x: jax.Array,
              batch_size: int) -> jax.Array:
  """`apply_layer` over `x` `(S, T, D)` in batches of segments."""
  outs = [_apply_layer_jit(config, layer, x[i:i + batch_size])
          for i in range(0, x.shape[0], batch_size)]
  return jnp.concatenate(outs, axis=0)


@functools.partial(jax.jit, static_argnames=("config", "names", "cross"))
def _moments(config, layer_q, x_q, layer_fp, x_fp, names, cross):
  _, cap_q = apply_layer_capturing(config, layer_q, x_q)
  out = {}
  if cross:
    _, cap_fp = apply_layer_capturing(config, layer_fp, x_fp)
  for name in names:
    xq = cap_q[name].reshape(-1, cap_q[name].shape[-1]).astype(jnp.float32)
    hq = jnp.dot(xq.T, xq, precision=_HP)
    if cross:
      xf = cap_fp[name].reshape(xq.shape).astype(jnp.float32)
      out[name] = (hq, jnp.dot(xf.T, xq, precision=_HP))
    else:
      out[name] = (hq, None)
  return out


def linear_stats(config: llama.LlamaConfig, layer_q: dict, x_q: jax.Array,
                 names: Sequence[str], batch_size: int, *,
                 layer_fp: dict | None = None,
                 x_fp: jax.Array | None = None
                 ) -> dict[str, protocol.LayerStats]:
  """`LayerStats` of the named linears' inputs, accumulated over batches.

  Args:
    config: model config.
    layer_q: the (partially quantized) layer whose linear inputs are `X`.
    x_q: its input hidden states `(S, T, D)`.
    names: linears to capture, e.g. ("attn/q_proj",).
    batch_size: segments per forward pass.
    layer_fp, x_fp: the float layer and its inputs; when given, the cross
      moments `2 X_fp^T X / n` are accumulated too.

  Returns:
    `{name: LayerStats}` with `n = S * T`.
  """
  names = tuple(names)
  cross = layer_fp is not None
  if cross and (x_fp is None or x_fp.shape != x_q.shape):
    raise ValueError("cross statistics need x_fp shaped like x_q")
  acc = None
  for i in range(0, x_q.shape[0], batch_size):
    part = _moments(config, layer_q, x_q[i:i + batch_size], layer_fp,
                    None if x_fp is None else x_fp[i:i + batch_size], names,
                    cross)
    acc = part if acc is None else jax.tree.map(jnp.add, acc, part)
  n = x_q.shape[0] * x_q.shape[1]
  return {name: protocol.LayerStats(
      hessian=2.0 * h / n, cross=None if c is None else 2.0 * c / n,
      num_tokens=n) for name, (h, c) in acc.items()}


def embed_tokens(params: dict, tokens: np.ndarray) -> jax.Array:
  """Hidden states entering layer 0: `E[tokens]` `(S, T, D)`."""
  table = jnp.asarray(params["embed"]["embedding"])
  return table[jnp.asarray(tokens)]


def sequential(config: llama.LlamaConfig, layer_source: Callable[[int], dict],
               x0: jax.Array, quantize_layer: Callable[..., tuple[dict, dict]],
               *, need_fp: bool = False, batch_size: int = 8,
               log: Callable[[str], None] | None = None
               ) -> tuple[dict, list[dict]]:
  """Walks the decoder, quantizing layer by layer on quantized inputs.

  Args:
    config: model config.
    layer_source: `l -> layer l's float params` (host arrays).
    x0: hidden states entering layer 0 `(S, T, D)` (the embeddings).
    quantize_layer: `(l, layer_fp (device), x_q, x_fp or None) ->
      (new layer params, report dict, y_fp)`, where `y_fp` is
      `layer_fp(x_fp)` if the callee computed it anyway, else None.
    need_fp: also propagate the float model's hidden states `x_fp`.
    batch_size: segments per forward pass when propagating.
    log: optional progress printer.

  Returns:
    (stacked quantized layers, per-layer reports).
  """
  x_q = x0
  x_fp = x0 if need_fp else None
  new_layers, reports = [], []
  for index in range(config.num_layers):
    layer_fp = jax.tree.map(jnp.asarray, layer_source(index))
    new, report, y_fp = quantize_layer(index, layer_fp, x_q, x_fp)
    if need_fp:
      x_fp = (run_layer(config, layer_fp, x_fp, batch_size) if y_fp is None
              else y_fp)
    x_q = run_layer(config, new, x_q, batch_size)
    if not bool(jnp.all(jnp.isfinite(x_q))):
      raise ValueError(f"non-finite hidden states after quantized layer "
                       f"{index}")
    del layer_fp
    new_layers.append(jax.device_get(new))
    reports.append({"layer": index, **report})
    if log is not None:
      log(f"layer {index}: {report}")
  return stack_layers(new_layers), reports


def quantize_layer_with(config: llama.LlamaConfig, quantizer: Any, *,
                        batch_size: int = 8, with_cross: bool = False,
                        baseline: qa.QuantConfig | None = None):
  """A `quantize_layer` for `sequential` from a (calibrating) `Quantizer`.

  Linears are quantized group by group in forward order (`LINEAR_GROUPS`):
  each group's inputs are captured on the layer whose earlier linears are
  already quantized. A quantizer with a `quantize_with_lora(w, stats)`
  method (ApiQ layer-wise) also yields LoRA factors stored beside the kernel.

  Args:
    config: model config.
    quantizer: a `protocol.Quantizer`.
    batch_size: segments per capture pass.
    with_cross: also capture `X_fp` and fill `LayerStats.cross`.
    baseline: optional RTN config; the report then holds each linear's proxy
      loss for the quantizer and for RTN at this config.
  """
  def quantize_layer(index, layer_fp, x_q, x_fp):
    del index
    layer = layer_fp
    report = {}
    for group in LINEAR_GROUPS:
      stats = None
      if quantizer.needs_calibration or baseline is not None:
        stats = linear_stats(config, layer, x_q, group, batch_size,
                             layer_fp=layer_fp if with_cross else None,
                             x_fp=x_fp if with_cross else None)
      for name in group:
        w = get_linear(layer_fp, name)["kernel"]
        st = stats[name] if quantizer.needs_calibration else None
        if hasattr(quantizer, "quantize_with_lora"):
          q, extra = quantizer.quantize_with_lora(w, st)
        else:
          q, extra = quantizer(w, st), {}
        layer = set_linear(layer, name, {"kernel": q, **extra})
        if baseline is not None:
          h = stats[name].hessian
          w_hat = qa.dequantize(q, jnp.float32)
          if extra:
            w_hat = w_hat + (config.lora_alpha / extra["lora_a"].shape[0]
                             * extra["lora_b"] @ extra["lora_a"])
          rtn = qa.dequantize(qa.quantize(w, baseline))
          report[name] = {
              "proxy": float(protocol.proxy_loss(w, w_hat, h)),
              "proxy_rtn": float(protocol.proxy_loss(w, rtn, h))}
    return layer, report, None

  return quantize_layer

