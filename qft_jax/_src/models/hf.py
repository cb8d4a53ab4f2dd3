"""Hugging Face checkpoint directories: config.json + safetensors, both ways.

Reading maps HF tensor names onto our parameter paths (with the layer index
spelled out, e.g. `layers/3/attn/q_proj/kernel`; `loading.py` stacks the
layers), lazily, one tensor at a time. Writing (`save_hf`) produces a
directory that transformers' `AutoModelForCausalLM.from_pretrained` loads.

Safetensors files are parsed here (an 8-byte little-endian header length, a
JSON header of `{name: {dtype, shape, data_offsets}}`, then raw little-endian
data) so bfloat16 tensors load through numpy (`ml_dtypes`) without torch.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import struct
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qft_jax._src import qarray as qa
from qft_jax._src import qmatmul
from qft_jax._src.models import llama

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}

# HF per-layer suffix -> our per-layer suffix.
_LAYER_NAMES = {
    "input_layernorm.weight": "input_norm/scale",
    "post_attention_layernorm.weight": "post_attn_norm/scale",
    **{f"self_attn.{p}.{w}": f"attn/{p}/{k}"
       for p in llama.LINEAR_NAMES["attn"]
       for w, k in (("weight", "kernel"), ("bias", "bias"))},
    **{f"mlp.{p}.weight": f"mlp/{p}/kernel" for p in llama.LINEAR_NAMES["mlp"]},
}
_TOP_NAMES = {"model.embed_tokens.weight": "embed/embedding",
              "model.norm.weight": "final_norm/scale",
              "lm_head.weight": "lm_head/kernel"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def config_from_hf(cfg: dict) -> llama.LlamaConfig:
  """`LlamaConfig` from a parsed HF config.json (Llama, Mistral, Qwen2)."""
  archs = cfg.get("architectures") or []
  if not archs or archs[0] not in ARCHITECTURES:
    raise ValueError(f"unknown architecture {archs or cfg.get('model_type')!r}:"
                     f" supported are {ARCHITECTURES}")
  arch = archs[0]
  if cfg.get("hidden_act", "silu") != "silu":
    raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (need silu)")
  if cfg.get("mlp_bias"):
    raise ValueError("mlp_bias=True is not supported")
  if arch == "LlamaForCausalLM" and cfg.get("attention_bias"):
    raise ValueError("LLaMA attention_bias=True (biased o_proj) is not "
                     "supported")
  if arch == "Qwen2ForCausalLM" and cfg.get("use_sliding_window"):
    raise ValueError("Qwen2 use_sliding_window=True is not supported")
  rope = dict(cfg.get("rope_parameters") or {})
  theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
  legacy = cfg.get("rope_scaling") or {}
  rope.update(legacy)
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    scaling = None
  elif rope_type == "llama3":
    scaling = llama.Llama3RopeScaling(
        float(rope["factor"]), float(rope["low_freq_factor"]),
        float(rope["high_freq_factor"]),
        int(rope["original_max_position_embeddings"]))
  else:
    raise ValueError(f"unsupported rope type {rope_type!r} (default or llama3)")
  heads = cfg["num_attention_heads"]
  return llama.LlamaConfig(
      vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
      intermediate_size=cfg["intermediate_size"],
      num_layers=cfg["num_hidden_layers"], num_heads=heads,
      num_kv_heads=cfg.get("num_key_value_heads") or heads,
      head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
      rope_theta=float(theta), rope_scaling=scaling,
      rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      attention_bias=arch == "Qwen2ForCausalLM",
      sliding_window=(cfg.get("sliding_window")
                      if arch == "MistralForCausalLM" else None),
      max_position_embeddings=cfg.get("max_position_embeddings", 2048))


def safetensors_entries(file: pathlib.Path) -> dict[str, Callable[[], np.ndarray]]:
  """Lazy readers `{name: () -> np.ndarray}` for one .safetensors file."""
  with open(file, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)

  def reader(info):
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{file}: unsupported safetensors dtype {info['dtype']}")
    start, end = info["data_offsets"]
    dtype = np.dtype(_DTYPES[info["dtype"]])
    count = (end - start) // dtype.itemsize
    return lambda: np.fromfile(file, dtype, count, offset=8 + n + start
                               ).reshape(info["shape"])

  return {name: reader(info) for name, info in header.items()}


def read_hf(directory) -> tuple[llama.LlamaConfig, dict]:
  """Config and lazy tensors `{our per-layer path: () -> np.ndarray}`.

  Raises:
    ValueError: no config.json / safetensors, unknown architecture, or a
      tensor name that has no place in the model.
  """
  d = pathlib.Path(directory)
  if not (d / "config.json").exists():
    raise ValueError(f"{d} has no config.json")
  config = config_from_hf(json.loads((d / "config.json").read_text()))
  index = d / "model.safetensors.index.json"
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (d / "model.safetensors").exists():
    files = ["model.safetensors"]
  else:
    raise ValueError(f"{d} has neither model.safetensors nor "
                     "model.safetensors.index.json")
  entries = {}
  for name in files:
    if not (d / name).exists():
      raise ValueError(f"shard {d / name} listed in the index is missing")
    entries.update(safetensors_entries(d / name))
  tensors, unexpected = {}, []
  for name, read in entries.items():
    if name.endswith("rotary_emb.inv_freq"):
      continue
    if name == "lm_head.weight" and config.tie_word_embeddings:
      continue
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES and int(m.group(1)) < config.num_layers:
      tensors[f"layers/{m.group(1)}/{_LAYER_NAMES[m.group(2)]}"] = read
    elif name in _TOP_NAMES:
      tensors[_TOP_NAMES[name]] = read
    else:
      unexpected.append(name)
  if unexpected:
    raise ValueError(f"unexpected tensors in {d}: {sorted(unexpected)}")
  return config, tensors


def _architecture(config: llama.LlamaConfig) -> tuple[str, str]:
  if config.attention_bias:
    if config.sliding_window is not None:
      raise ValueError("cannot export q/k/v biases with a sliding window")
    return "Qwen2ForCausalLM", "qwen2"
  if config.sliding_window is not None:
    return "MistralForCausalLM", "mistral"
  return "LlamaForCausalLM", "llama"


def config_to_hf(config: llama.LlamaConfig, dtype=np.float32) -> dict:
  """The HF config.json dict for `config` (see `_architecture`)."""
  arch, model_type = _architecture(config)
  c = config
  out = {
      "architectures": [arch], "model_type": model_type,
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
      "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
      "max_position_embeddings": c.max_position_embeddings,
      "tie_word_embeddings": c.tie_word_embeddings,
      "rope_theta": c.rope_theta, "torch_dtype": str(np.dtype(dtype)),
  }
  if c.rope_scaling is not None:
    s = c.rope_scaling
    out["rope_scaling"] = {
        "rope_type": "llama3", "factor": s.factor,
        "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_position_embeddings}
  if model_type == "mistral":
    out["sliding_window"] = c.sliding_window
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  return out


_dequantize = jax.jit(qa.dequantize, static_argnums=1)


def _dense(node: dict, alpha: float) -> np.ndarray:
  """Float kernel of a linear node, QArray dequantized and LoRA merged."""
  w = node["kernel"]
  if isinstance(w, qmatmul.WeightWithProbe):
    w = w.q
  w = _dequantize(w, jnp.float32) if isinstance(w, qa.QArray) else w
  w = np.asarray(w, np.float32)
  if "lora_a" in node:
    a = np.asarray(node["lora_a"], np.float32)
    b = np.asarray(node["lora_b"], np.float32)
    w = w + (alpha / a.shape[-2]) * np.matmul(b, a)
  return w


def write_safetensors(file, tensors: dict[str, np.ndarray]) -> None:
  """Writes `{name: array}` (float32/16, bfloat16, ints) as .safetensors."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, arr in tensors.items():
    header[name] = {"dtype": _DTYPE_NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for arr in tensors.values():
      f.write(np.ascontiguousarray(arr).tobytes())


def save_hf(params: dict, config: llama.LlamaConfig, out_dir, *,
            dtype=np.float32) -> None:
  """Writes config.json + model.safetensors loadable by transformers.

  QArray kernels are dequantized and LoRA factors merged
  (`W + (alpha / r) B A`) before writing; every tensor is cast to `dtype`.
  """
  llama.check_params(params, config)
  out = pathlib.Path(out_dir)
  os.makedirs(out, exist_ok=True)
  host = lambda x: np.asarray(x, np.float32)
  layers = params["layers"]
  per_layer = {"input_layernorm.weight": host(layers["input_norm"]["scale"]),
               "post_attention_layernorm.weight":
                   host(layers["post_attn_norm"]["scale"])}
  for block, names in llama.LINEAR_NAMES.items():
    hf_block = "self_attn" if block == "attn" else "mlp"
    for name in names:
      node = layers[block][name]
      per_layer[f"{hf_block}.{name}.weight"] = _dense(node, config.lora_alpha)
      if "bias" in node:
        per_layer[f"{hf_block}.{name}.bias"] = host(node["bias"])
  tensors = {"model.embed_tokens.weight": host(params["embed"]["embedding"])}
  for i in range(config.num_layers):
    for suffix, stacked in per_layer.items():
      tensors[f"model.layers.{i}.{suffix}"] = stacked[i]
  tensors["model.norm.weight"] = host(params["final_norm"]["scale"])
  if not config.tie_word_embeddings:
    tensors["lm_head.weight"] = _dense(params["lm_head"], config.lora_alpha)
  tensors = {k: np.asarray(v).astype(dtype) for k, v in tensors.items()}
  write_safetensors(out / "model.safetensors", tensors)
  (out / "config.json").write_text(
      json.dumps(config_to_hf(config, dtype), indent=2))
