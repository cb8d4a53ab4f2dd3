"""llama2.c legacy checkpoints (`stories260K.bin`) and their tokenizer.

File layout: seven int32 `dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len` (a negative vocab_size means an unshared classifier),
then float32 weights in PyTorch `(out, in)` layout, in this order:

    token_embedding (V, D), rms_att (L, D), wq (L, H*Dh, D), wk (L, Hkv*Dh, D),
    wv (L, Hkv*Dh, D), wo (L, D, H*Dh), rms_ffn (L, D), w1 (L, F, D),
    w2 (L, D, F), w3 (L, F, D), rms_final (D), freq_cis_real (S, Dh/2),
    freq_cis_imag (S, Dh/2), [wcls (V, D) when unshared].

llama2.c's RoPE rotates adjacent pairs (complex multiplication), so q/k rows
are reordered to `rotate_half` like the GGUF case. RoPE theta is 1e4 and the
RMSNorm epsilon 1e-5 (llama2.c's `run.c`).
"""

from __future__ import annotations

import pathlib

import numpy as np

from qft_jax._src.models import gguf_loader
from qft_jax._src.models import llama
from qft_jax._src.models import tokenizer as tokenizer_lib

_HEADER_BYTES = 7 * 4


def read_llama2c(path) -> tuple[llama.LlamaConfig, dict]:
  """Config and tensors `{our per-layer path: () -> np.ndarray}`.

  Raises:
    ValueError: a header that does not describe a model or a file size that
      does not match the header.
  """
  path = pathlib.Path(path)
  raw = np.fromfile(path, np.int32, 7)
  if raw.size < 7:
    raise ValueError(f"{path} is too short for a llama2.c header")
  dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = (int(v) for v in raw)
  shared = vocab > 0
  vocab = abs(vocab)
  if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or (
      dim % n_heads):
    raise ValueError(f"{path}: invalid llama2.c header {raw.tolist()}")
  dh = dim // n_heads
  kv_dim = n_kv * dh
  layout = [("embed/embedding", (vocab, dim)), ("input_norm", (n_layers, dim)),
            ("q_proj", (n_layers, dim, dim)),
            ("k_proj", (n_layers, kv_dim, dim)),
            ("v_proj", (n_layers, kv_dim, dim)),
            ("o_proj", (n_layers, dim, dim)),
            ("post_attn_norm", (n_layers, dim)),
            ("gate_proj", (n_layers, hidden, dim)),
            ("down_proj", (n_layers, dim, hidden)),
            ("up_proj", (n_layers, hidden, dim)),
            ("final_norm/scale", (dim,)),
            ("freq_cis", (2, seq_len, dh // 2))]
  if not shared:
    layout.append(("lm_head/kernel", (vocab, dim)))
  total = sum(int(np.prod(s)) for _, s in layout)
  size = path.stat().st_size
  if size != _HEADER_BYTES + 4 * total:
    raise ValueError(f"{path}: {size} bytes, but its header "
                     f"{raw.tolist()} needs {_HEADER_BYTES + 4 * total}")
  config = llama.LlamaConfig(
      vocab_size=vocab, hidden_size=dim, intermediate_size=hidden,
      num_layers=n_layers, num_heads=n_heads, num_kv_heads=n_kv, head_dim=dh,
      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=shared,
      max_position_embeddings=seq_len)
  data = np.memmap(path, np.float32, "r", offset=_HEADER_BYTES, shape=(total,))
  arrays, offset = {}, 0
  for name, shape in layout:
    n = int(np.prod(shape))
    arrays[name] = data[offset:offset + n].reshape(shape)
    offset += n
  where = {"input_norm": "input_norm/scale",
           "post_attn_norm": "post_attn_norm/scale",
           **{p: f"attn/{p}/kernel" for p in llama.LINEAR_NAMES["attn"]},
           **{p: f"mlp/{p}/kernel" for p in llama.LINEAR_NAMES["mlp"]}}
  heads = {"q_proj": n_heads, "k_proj": n_kv}
  tensors = {}
  for name, arr in arrays.items():
    if name == "freq_cis":
      continue
    if name not in where:
      tensors[name] = lambda a=arr: np.array(a)
      continue
    for i in range(n_layers):
      def read(a=arr[i], h=heads.get(name)):
        a = np.array(a)
        return a if h is None else gguf_loader.interleaved_to_half(a, h)
      tensors[f"layers/{i}/{where[name]}"] = read
  return config, tensors


def read_llama2c_tokenizer(path) -> tokenizer_lib.Tokenizer:
  """The SentencePiece tokenizer beside a llama2.c checkpoint.

  Looks for `tok{vocab}.model` (llama2.c's custom vocabularies) and then
  `tokenizer.model` in the checkpoint's directory; `path` may also be the
  `.model` file itself.
  """
  path = pathlib.Path(path)
  if path.suffix == ".model":
    return tokenizer_lib.from_sentencepiece(path)
  vocab = abs(int(np.fromfile(path, np.int32, 7)[5]))
  for name in (f"tok{vocab}.model", "tokenizer.model"):
    if (path.parent / name).exists():
      return tokenizer_lib.from_sentencepiece(path.parent / name)
  raise ValueError(f"no SentencePiece tokenizer (tok{vocab}.model or "
                   f"tokenizer.model) next to {path}")
