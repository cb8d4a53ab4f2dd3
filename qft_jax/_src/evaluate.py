"""Perplexity of a causal LM over token sequences.

Protocol (`perplexity`): tokenize the whole file as one string without special
tokens (no BOS), giving ids `x_0 .. x_{N-1}`. Window `i` is
`x[i*L : (i+1)*L]` for `i = 0 .. W-1` (non-overlapping; a last partial window
is dropped); each window is run independently, from position 0, with no
context from the previous one. Every window contributes its `L - 1`
next-token predictions:

    NLL = -1 / (W (L-1)) * sum_i sum_{t=1}^{L-1} log p(x_{iL+t} | x_{iL..iL+t-1})
    ppl = exp(NLL)

with float32 logits and a float32 log-softmax. For SmolLM2-135M-Instruct on
WikiText-2 raw test, W=4, L=512 gives ppl 29.98 (../shared/data/README.md).

`sequence_nll` scores a list of variable-length sequences the same way
(right-padded to a common length; causal attention makes the padding
invisible to real tokens, and padded targets get zero weight), e.g. the
stories260K protocol: `[BOS] + encode(story)` truncated to 512.
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qft_jax._src.models import llama


@functools.partial(jax.jit, static_argnames=("config",))
def _batch_nll(params, config, tokens, weights):
  """Sum of `weights * -log p(tokens[:, 1:])` and the sum of weights."""
  logits = llama.Llama(config).apply({"params": params}, tokens)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(nll * weights), jnp.sum(weights)


def sequence_nll(params: dict, config: llama.LlamaConfig,
                 sequences: Sequence[Sequence[int]], *, batch_size: int = 4,
                 pad_to: int | None = None, bucket: int = 64) -> dict:
  """Mean next-token NLL over all predictions in `sequences`.

  Args:
    params, config: the model.
    sequences: token id lists (each of length >= 2 to contribute).
    batch_size: sequences per forward pass (the last batch is padded with
      zero-weight rows so every call has the same batch size).
    pad_to: one common length for every batch (one compilation). None: sort
      the sequences by length and pad each batch to its longest sequence
      rounded up to a multiple of `bucket` (less attention work).
    bucket: length granularity when `pad_to` is None.

  Returns:
    `{"nll": mean NLL in nats, "ppl": exp(nll), "tokens": predictions}`.
  """
  llama.check_params(params, config)
  if not sequences:
    raise ValueError("no sequences to score")
  longest = max(len(s) for s in sequences)
  if pad_to is not None and (pad_to < 2 or longest > pad_to):
    raise ValueError(f"sequences of up to {longest} tokens do not fit in "
                     f"pad_to={pad_to} (>= 2)")
  if pad_to is None:
    sequences = sorted(sequences, key=len)
  total, count = 0.0, 0.0
  for start in range(0, len(sequences), batch_size):
    chunk = sequences[start:start + batch_size]
    length = pad_to or max(2, -(-max(len(s) for s in chunk) // bucket)
                           * bucket)
    tokens = np.zeros((batch_size, length), np.int32)
    weights = np.zeros((batch_size, length - 1), np.float32)
    for row, seq in enumerate(chunk):
      tokens[row, :len(seq)] = seq
      weights[row, :max(len(seq) - 1, 0)] = 1.0
    s, c = _batch_nll(params, config, jnp.asarray(tokens),
                      jnp.asarray(weights))
    total += float(s)
    count += float(c)
  if count == 0:
    raise ValueError("the sequences contain no next-token predictions")
  nll = total / count
  return {"nll": nll, "ppl": math.exp(nll), "tokens": int(count)}


def perplexity(params: dict, config: llama.LlamaConfig,
               token_ids: Sequence[int], *, seq_len: int = 512,
               windows: int | None = None, batch_size: int = 4) -> dict:
  """Perplexity over non-overlapping windows (see the module docstring).

  Args:
    params, config: the model.
    token_ids: the tokenized file, `(N,)`.
    seq_len: window length `L`.
    windows: number of windows `W` from the start (None: all full windows).
    batch_size: windows per forward pass.

  Returns:
    `{"nll", "ppl", "tokens"}` with `tokens = W * (L - 1)`.
  """
  ids = np.asarray(token_ids, np.int32)
  available = len(ids) // seq_len
  windows = available if windows is None else windows
  if seq_len < 2 or windows < 1 or windows > available:
    raise ValueError(f"cannot take {windows} windows of {seq_len} tokens "
                     f"from {len(ids)} tokens")
  seqs = ids[:windows * seq_len].reshape(windows, seq_len).tolist()
  return sequence_nll(params, config, seqs, batch_size=batch_size,
                      pad_to=seq_len)


def text_token_ids(tokenizer, path) -> list[int]:
  """Token ids of a whole text file, encoded as one string, no BOS."""
  text = pathlib.Path(path).read_text(encoding="utf-8")
  return tokenizer.encode(text, add_bos=False)
