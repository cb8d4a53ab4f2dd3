"""Export a tuned model: an HF directory, or our quantized checkpoint.

`export_hf` writes config.json + model.safetensors that transformers'
`LlamaForCausalLM` loads: LoRA merged, QArray (PEQA, QLoRA...) and QFT
weights dequantized. `save_quantized` keeps integer weights as they are
(QArray codes and scales, QFT int8 + outliers, LoRA factors beside them) with
the model config, and `load_quantized` reads them back bit for bit.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qft_jax._src.models import hf
from qft_jax._src.models import llama
from qft_jax._src.optim import qft
from qft_jax._src.quantizers import protocol

_QFT_DENSE = "qft_dense"


def dequantize_qft(params: Any) -> Any:
  """Replaces every `QFTWeight` by its float matrix (float32)."""
  return jax.tree.map(
      lambda p: qft.qft_dequantize(p, jnp.float32) if qft.is_qft_weight(p)
      else p, params, is_leaf=qft.is_qft_weight)


def export_hf(params: dict, config: llama.LlamaConfig, out_dir, *,
              dtype=np.float32) -> pathlib.Path:
  """Writes an HF checkpoint of `params` (see module docstring)."""
  hf.save_hf(dequantize_qft(params), config, out_dir, dtype=dtype)
  return pathlib.Path(out_dir)


def _config_json(config: llama.LlamaConfig) -> dict:
  out = {}
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    if f.name in ("dtype", "param_dtype"):
      v = jnp.dtype(v).name
    elif dataclasses.is_dataclass(v):
      v = dataclasses.asdict(v)
    out[f.name] = v
  return out


def _flatten_qft(params: Any) -> tuple[Any, list[str]]:
  """QFT weights -> plain dicts of (QArray, index, value) for saving."""
  paths = []

  def visit(keypath, p):
    if qft.is_qft_weight(p):
      paths.append("/".join(str(getattr(k, "key", k)) for k in keypath))
      return {_QFT_DENSE: p.dense, "outlier_index": p.outlier_index,
              "outlier_value": p.outlier_value}
    return p
  return (jax.tree_util.tree_map_with_path(visit, params,
                                           is_leaf=qft.is_qft_weight), paths)


def save_quantized(params: dict, config: llama.LlamaConfig, out_dir) -> None:
  """Writes params (integer weights kept) and the model config."""
  flat, qft_paths = _flatten_qft(jax.device_get(params))
  protocol.save_params(out_dir, flat, meta={
      "config": _config_json(config), "qft_weights": qft_paths})


def load_quantized(path) -> tuple[llama.LlamaConfig, dict]:
  """Inverse of `save_quantized`: `(config, params)` on the default device."""
  tree, meta = protocol.load_params(path)
  if "config" not in meta:
    raise ValueError(f"{path} holds no model config (not written by "
                     "save_quantized)")
  cfg = dict(meta["config"])
  cfg["dtype"], cfg["param_dtype"] = (jnp.dtype(cfg["dtype"]),
                                      jnp.dtype(cfg["param_dtype"]))
  config = llama.LlamaConfig(**cfg)
  for path_str in meta.get("qft_weights", []):
    *parents, last = path_str.split("/")
    node = tree
    for key in parents:
      node = node[key]
    d = node[last]
    node[last] = qft.QFTWeight(d[_QFT_DENSE], d["outlier_index"],
                               d["outlier_value"])
  params = jax.tree.map(jnp.asarray, tree)
  llama.check_params(params, config)
  return config, params
