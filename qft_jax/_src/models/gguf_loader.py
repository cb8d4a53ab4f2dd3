"""GGUF files (llama.cpp): metadata -> LlamaConfig, tensors, tokenizer.

Tensors are dequantized one at a time with `gguf.quants.dequantize` (Q4_1,
Q8_0, K-quants, F16, ...) to float32 in PyTorch `(out, in)` layout (the ggml
shape reversed).

RoPE layout: for the `llama` architecture, llama.cpp's HF-to-GGUF converter
permutes the rows of `attn_q` / `attn_k` within each head so that ggml's
adjacent-pair ("NORM") RoPE applies:

    w_gguf = w_hf.reshape(H, 2, D_h/2, K).swapaxes(1, 2).reshape(H*D_h, K)

We undo it (`interleaved_to_half`) so our `rotate_half` RoPE applies. `qwen2`
files use NEOX RoPE and are not permuted.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np

from qft_jax._src.models import llama
from qft_jax._src.models import tokenizer as tokenizer_lib

ARCHITECTURES = ("llama", "qwen2")

_LAYER_NAMES = {
    "attn_norm.weight": "input_norm/scale",
    "ffn_norm.weight": "post_attn_norm/scale",
    "attn_q.weight": "attn/q_proj/kernel", "attn_q.bias": "attn/q_proj/bias",
    "attn_k.weight": "attn/k_proj/kernel", "attn_k.bias": "attn/k_proj/bias",
    "attn_v.weight": "attn/v_proj/kernel", "attn_v.bias": "attn/v_proj/bias",
    "attn_output.weight": "attn/o_proj/kernel",
    "ffn_gate.weight": "mlp/gate_proj/kernel",
    "ffn_up.weight": "mlp/up_proj/kernel",
    "ffn_down.weight": "mlp/down_proj/kernel",
}
_TOP_NAMES = {"token_embd.weight": "embed/embedding",
              "output_norm.weight": "final_norm/scale",
              "output.weight": "lm_head/kernel"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Reorders q/k rows (or biases) from adjacent-pair to rotate_half RoPE.

  Within each head, output rows `(2i, 2i+1)` (a rotated pair) move to
  `(i, i + D_h/2)`. Used for GGUF `llama` files and llama2.c checkpoints.
  """
  out = w.shape[0]
  if out % (2 * n_heads):
    raise ValueError(f"cannot split {out} rows into {n_heads} heads of pairs")
  return (w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _metadata(reader) -> dict:
  """Scalar metadata (token lists and other arrays are skipped)."""
  return {key: field.contents() for key, field in reader.fields.items()
          if not key.startswith("tokenizer.ggml.")}


def config_from_gguf(meta: dict, tensor_shapes: dict) -> llama.LlamaConfig:
  """`LlamaConfig` from GGUF metadata and `{tensor name: (out, in)}` shapes."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"unknown GGUF architecture {arch!r}: supported are "
                     f"{ARCHITECTURES}")
  if "rope_freqs.weight" in tensor_shapes:
    raise ValueError("GGUF rope_freqs (llama-3 RoPE scaling factors) are not "
                     "supported; load the HF checkpoint instead")
  get = lambda k, default=None: meta.get(f"{arch}.{k}", default)
  missing = [f"{arch}.{k}" for k in ("block_count", "embedding_length",
                                     "feed_forward_length",
                                     "attention.head_count")
             if get(k) is None]
  if missing or "token_embd.weight" not in tensor_shapes:
    raise ValueError(f"GGUF file lacks {missing or ['token_embd.weight']}")
  d, heads = int(get("embedding_length")), int(get("attention.head_count"))
  head_dim = int(get("attention.key_length", get("rope.dimension_count",
                                                 d // heads)))
  return llama.LlamaConfig(
      vocab_size=int(tensor_shapes["token_embd.weight"][0]), hidden_size=d,
      intermediate_size=int(get("feed_forward_length")),
      num_layers=int(get("block_count")), num_heads=heads,
      num_kv_heads=int(get("attention.head_count_kv", heads)),
      head_dim=head_dim, rope_theta=float(get("rope.freq_base", 10000.0)),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      tie_word_embeddings="output.weight" not in tensor_shapes,
      attention_bias=arch == "qwen2",
      max_position_embeddings=int(get("context_length", 2048)))


def _lazy(tensor, permute_heads: int | None):
  from gguf.quants import dequantize  # pylint: disable=g-import-not-at-top
  shape = tuple(int(s) for s in reversed(list(tensor.shape)))

  def read():
    w = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
    w = w.reshape(shape)
    return w if permute_heads is None else interleaved_to_half(w,
                                                               permute_heads)

  return read


def read_gguf(path) -> tuple[llama.LlamaConfig, dict]:
  """Config and lazy tensors `{our per-layer path: () -> np.ndarray}`.

  Raises:
    ValueError: unknown architecture or tensors with no place in the model.
  """
  import gguf  # pylint: disable=g-import-not-at-top
  reader = gguf.GGUFReader(str(pathlib.Path(path)))
  meta = _metadata(reader)
  shapes = {t.name: tuple(int(s) for s in reversed(list(t.shape)))
            for t in reader.tensors}
  config = config_from_gguf(meta, shapes)
  permute = meta["general.architecture"] == "llama"
  tensors, unexpected = {}, []
  for t in reader.tensors:
    m = _LAYER_RE.fullmatch(t.name)
    if m and m.group(2) in _LAYER_NAMES and int(m.group(1)) < config.num_layers:
      ours = f"layers/{m.group(1)}/{_LAYER_NAMES[m.group(2)]}"
      heads = None
      if permute and m.group(2).startswith("attn_q."):
        heads = config.num_heads
      elif permute and m.group(2).startswith("attn_k."):
        heads = config.num_kv_heads
      tensors[ours] = _lazy(t, heads)
    elif t.name in _TOP_NAMES:
      tensors[_TOP_NAMES[t.name]] = _lazy(t, None)
    else:
      unexpected.append(t.name)
  if unexpected:
    raise ValueError(f"unexpected tensors in {path}: {sorted(unexpected)}")
  return config, tensors


def read_gguf_tokenizer(path) -> tokenizer_lib.Tokenizer:
  """The tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata."""
  import gguf  # pylint: disable=g-import-not-at-top
  reader = gguf.GGUFReader(str(pathlib.Path(path)))
  prefix = "tokenizer.ggml."
  meta = {}
  for key, field in reader.fields.items():
    if key.startswith(prefix):
      meta[key[len(prefix):]] = field.contents()
  arch = reader.fields["general.architecture"].contents()
  return tokenizer_lib.from_gguf_metadata(meta, arch)
