"""Tokenizers behind one small interface, none of them needing torch.

`Tokenizer.encode(text, add_bos=False) -> list[int]`, `decode(ids) -> str`,
`bos_id`, `eos_id`. Back ends: a `tokenizers.Tokenizer` (from tokenizer.json
or rebuilt from GGUF metadata) or a SentencePiece model (llama2.c).
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers


class Tokenizer:
  """Encode/decode over a `tokenizers.Tokenizer` or a SentencePiece model.

  Special tokens in the text (e.g. `<|im_start|>`) map to their ids; `encode`
  adds no BOS/EOS unless `add_bos`.
  """

  def __init__(self, backend, bos_id: int | None, eos_id: int | None):
    if not isinstance(backend, (tokenizers.Tokenizer,
                                sentencepiece.SentencePieceProcessor)):
      raise ValueError(f"unsupported tokenizer back end {type(backend)}")
    self.backend = backend
    self.bos_id = bos_id
    self.eos_id = eos_id

  @property
  def vocab_size(self) -> int:
    if isinstance(self.backend, tokenizers.Tokenizer):
      return self.backend.get_vocab_size()
    return self.backend.get_piece_size()

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    if isinstance(self.backend, tokenizers.Tokenizer):
      ids = self.backend.encode(text, add_special_tokens=False).ids
    else:
      ids = self.backend.encode(text)
    if add_bos:
      if self.bos_id is None:
        raise ValueError("this tokenizer has no BOS token")
      ids = [self.bos_id] + ids
    return list(ids)

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if isinstance(self.backend, tokenizers.Tokenizer):
      return self.backend.decode(ids, skip_special_tokens=False)
    return self.backend.decode(ids)


def from_sentencepiece(model_file) -> Tokenizer:
  """A SentencePiece `.model` file (llama2.c's `tok512.model`)."""
  sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
  pick = lambda i: i if i >= 0 else None
  return Tokenizer(sp, pick(sp.bos_id()), pick(sp.eos_id()))


def from_tokenizer_json(file, bos_id: int | None,
                        eos_id: int | None) -> Tokenizer:
  """An HF `tokenizer.json`."""
  return Tokenizer(tokenizers.Tokenizer.from_file(str(pathlib.Path(file))),
                   bos_id, eos_id)


def from_gguf_metadata(meta: dict, architecture: str) -> Tokenizer:
  """Rebuilds the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`).

  Byte-level BPE ("gpt2") with llama.cpp's `smollm` pre-tokenizer (digits
  split one by one, then the GPT-2 regex) is built directly; other types go
  through transformers' torch-free `convert_gguf_tokenizer`.

  Args:
    meta: `{key without the "tokenizer.ggml." prefix: value}`, e.g. `tokens`,
      `merges`, `token_type`, `model`, `pre`, `bos_token_id`.
    architecture: `general.architecture` of the file.
  """
  if "tokens" not in meta or "model" not in meta:
    raise ValueError("the GGUF file carries no tokenizer (tokenizer.ggml.*)")
  bos, eos = meta.get("bos_token_id"), meta.get("eos_token_id")
  toks = list(meta["tokens"])
  if meta["model"] == "gpt2" and meta.get("pre") == "smollm":
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    tok = tokenizers.Tokenizer(models.BPE(
        vocab={t: i for i, t in enumerate(toks)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    control = 3  # llama.cpp token type CONTROL
    tok.add_special_tokens([
        tokenizers.AddedToken(t, special=True, normalized=False)
        for t, kind in zip(toks, meta["token_type"]) if kind == control])
    return Tokenizer(tok, bos, eos)
  from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer  # pylint: disable=g-import-not-at-top
  renames = {"pre": "pre_tokenizer_type", "merges": "merges",
             "scores": "scores", "token_type": "token_type",
             "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
             "unknown_token_id": "unk_token_id",
             "padding_token_id": "pad_token_id",
             "add_space_prefix": "add_prefix_space"}
  tok_dict = {"tokenizer_type": meta["model"], "tokens": toks}
  tok_dict.update({new: meta[old] for old, new in renames.items()
                   if old in meta})
  tok, _ = convert_gguf_tokenizer(architecture, tok_dict)
  return Tokenizer(tok, bos, eos)
