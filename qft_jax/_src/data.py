"""Fine-tuning data: real task files -> fixed-shape token batches.

Every dataset becomes a list of `Example(prompt, completion)`; the loss covers
the completion tokens only (for plain text the prompt is empty and every
token counts). Batches are a pure function of `(seed, step)`: the example
order is a fresh permutation per epoch, so resuming at step `s` needs no
iterator state beyond `s` itself.

Formats read (paths under ../shared/data/tasks by default):
  text    plain UTF-8 text; split by characters into train (first 90 %) and
          eval (last 10 %), cut into `seq_len + 1`-token windows.
  alpaca  JSON list or JSONL of {"instruction", "input", "output"}.
  gsm8k   JSONL of {"question", "answer"}.
  sst2    TSV `sentence<TAB>label` with a header; prompt
          "Review: <sentence>\\nSentiment:", completion " negative"/" positive".
  dialogsum  JSONL of {"dialogue", "summary"} (dev) or {"dialogue",
          "summary1".."summary3"} (test: the first reference is trained on);
          prompt "Dialogue:\\n<dialogue>\\nSummary:", completion " <summary>".
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import random
from typing import Protocol, Sequence

import jax
import numpy as np

TEXT_TRAIN_FRACTION = 0.9
SST2_LABELS = (" negative", " positive")


class Tokenizer(Protocol):
  bos_id: int | None
  eos_id: int | None

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ...


@dataclasses.dataclass(frozen=True)
class Example:
  prompt: str
  completion: str


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
  """One batch. tokens/targets int32 `(B, T)`; loss_mask float32 `(B, T)`."""
  tokens: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray


def _require(path: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"data file not found: {path}")
  return path


def alpaca_prompt(instruction: str, inp: str = "") -> str:
  """The Stanford Alpaca prompt template."""
  if inp:
    return ("Below is an instruction that describes a task, paired with an "
            "input that provides further context. Write a response that "
            "appropriately completes the request.\n\n### Instruction:\n"
            f"{instruction}\n\n### Input:\n{inp}\n\n### Response:\n")
  return ("Below is an instruction that describes a task. Write a response "
          "that appropriately completes the request.\n\n### Instruction:\n"
          f"{instruction}\n\n### Response:\n")


def sst2_prompt(sentence: str) -> str:
  return f"Review: {sentence.strip()}\nSentiment:"


def dialogsum_prompt(dialogue: str) -> str:
  return f"Dialogue:\n{dialogue.strip()}\nSummary:"


def read_json_records(path: str | pathlib.Path) -> list[dict]:
  """A JSON list or JSON-lines file as a list of dicts."""
  text = _require(path).read_text(encoding="utf-8")
  if text.lstrip().startswith("["):
    return json.loads(text)
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_sst2(path: str | pathlib.Path) -> list[tuple[str, int]]:
  with open(_require(path), encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  if not rows or rows[0][:2] != ["sentence", "label"]:
    raise ValueError(f"{path}: expected an SST-2 TSV with header "
                     "'sentence<TAB>label'")
  return [(r[0], int(r[1])) for r in rows[1:] if len(r) >= 2]


def load_examples(kind: str, path: str | pathlib.Path, *, split: str = "train",
                  limit: int | None = None, seed: int = 0,
                  sampler: str = "numpy", holdout: int = 0) -> list[Example]:
  """Reads one of the supported task formats as prompt/completion pairs.

  Args:
    kind: "text", "alpaca", "gsm8k", "sst2" or "dialogsum".
    path: the file.
    split: for "text", which part ("train" or "eval") of the file to use;
      for the other kinds with `holdout > 0`, "train" drops the last
      `holdout` records and "eval" keeps only them.
    limit: keep this many examples (in file order) when there are more.
    seed: seed of that draw.
    sampler: how the `limit` examples are drawn: "numpy" (the first `limit`
      of `np.random.default_rng(seed).permutation(n)`) or "python" (the first
      `limit` indices after `random.Random(seed).shuffle(list(range(n)))`,
      which is the same subset as shuffling the rows themselves: the SST-2
      peer protocol in ../shared/design/device-notes.md).
    holdout: number of trailing records held out (see `split`).
  """
  if kind == "text":
    text = _require(path).read_text(encoding="utf-8")
    cut = int(len(text) * TEXT_TRAIN_FRACTION)
    if split not in ("train", "eval"):
      raise ValueError(f"text split must be 'train' or 'eval', got {split!r}")
    return [Example("", text[:cut] if split == "train" else text[cut:])]
  if kind == "alpaca":
    examples = [Example(alpaca_prompt(r["instruction"], r.get("input", "")),
                        r["output"]) for r in read_json_records(path)]
  elif kind == "gsm8k":
    examples = [Example(f"Question: {r['question']}\nAnswer:",
                        " " + r["answer"]) for r in read_json_records(path)]
  elif kind == "sst2":
    examples = [Example(sst2_prompt(s), SST2_LABELS[y])
                for s, y in read_sst2(path)]
  elif kind == "dialogsum":
    examples = [Example(dialogsum_prompt(r["dialogue"]),
                        " " + r.get("summary", r.get("summary1", "")).strip())
                for r in read_json_records(path)]
  else:
    raise ValueError(f"unknown dataset kind {kind!r}: choose text, alpaca, "
                     "gsm8k, sst2 or dialogsum")
  if holdout:
    if not 0 < holdout < len(examples) or split not in ("train", "eval"):
      raise ValueError(f"holdout={holdout} with split={split!r} needs "
                       f"0 < holdout < {len(examples)} and split train/eval")
    examples = (examples[:-holdout] if split == "train"
                else examples[-holdout:])
  if limit is not None and limit < len(examples):
    if sampler == "numpy":
      order = np.random.default_rng(seed).permutation(len(examples))[:limit]
    elif sampler == "python":
      order = list(range(len(examples)))
      random.Random(seed).shuffle(order)
      order = order[:limit]
    else:
      raise ValueError(f"unknown sampler {sampler!r}: numpy or python")
    examples = [examples[i] for i in sorted(order)]
  return examples


def tokenize_examples(examples: Sequence[Example], tokenizer: Tokenizer,
                      seq_len: int, *, add_bos: bool = True
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Token rows `(R, seq_len + 1)` and their loss masks.

  Plain text (empty prompts) is concatenated and cut into non-overlapping
  windows of `seq_len + 1` tokens. Prompted examples become one row each:
  `[bos] prompt completion [eos]` (`bos` only with `add_bos` and a tokenizer
  that has one), truncated from the left of the prompt so the completion
  survives, right-padded; the mask marks completion positions.
  """
  if all(not e.prompt for e in examples):
    ids = np.concatenate([np.asarray(tokenizer.encode(e.completion), np.int32)
                          for e in examples])
    n = len(ids) // (seq_len + 1)
    if n == 0:
      raise ValueError(f"text has {len(ids)} tokens, fewer than one window "
                       f"of {seq_len + 1}")
    rows = ids[:n * (seq_len + 1)].reshape(n, seq_len + 1)
    return rows, np.ones_like(rows, np.float32)
  rows = np.zeros((len(examples), seq_len + 1), np.int32)
  mask = np.zeros((len(examples), seq_len + 1), np.float32)
  bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
  eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  for i, e in enumerate(examples):
    p = bos + tokenizer.encode(e.prompt)
    c = tokenizer.encode(e.completion) + eos
    c = c[:seq_len]
    p = p[-(seq_len + 1 - len(c)):]
    row = p + c
    rows[i, :len(row)] = row
    mask[i, len(p):len(row)] = 1.0
  return rows, mask


@dataclasses.dataclass(frozen=True)
class TokenDataset:
  """Tokenized rows with deterministic per-epoch shuffling."""
  rows: np.ndarray
  mask: np.ndarray

  @property
  def num_rows(self) -> int:
    return self.rows.shape[0]

  def batch(self, step: int, batch_size: int, seed: int = 0) -> Batch:
    """The batch of training step `step` (a pure function of its inputs)."""
    per_epoch = max(1, self.num_rows // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(self.num_rows)
    idx = np.resize(order[offset * batch_size:(offset + 1) * batch_size],
                    batch_size)
    return self._make(idx)

  def eval_batches(self, batch_size: int, limit: int | None = None):
    """Sequential batches over the rows (the last one wraps to fill)."""
    n = self.num_rows if limit is None else min(limit, self.num_rows)
    for start in range(0, n, batch_size):
      idx = np.arange(start, start + batch_size) % n
      yield self._make(idx), min(batch_size, n - start)

  def _make(self, idx: np.ndarray) -> Batch:
    rows, mask = self.rows[idx], self.mask[idx]
    return Batch(tokens=rows[:, :-1], targets=rows[:, 1:],
                 loss_mask=mask[:, 1:])


def build_dataset(kind: str, path: str | pathlib.Path, tokenizer: Tokenizer,
                  seq_len: int, *, split: str = "train",
                  limit: int | None = None, seed: int = 0,
                  sampler: str = "numpy", holdout: int = 0,
                  add_bos: bool = True) -> TokenDataset:
  """`load_examples` then `tokenize_examples` (see both for the arguments)."""
  rows, mask = tokenize_examples(
      load_examples(kind, path, split=split, limit=limit, seed=seed,
                    sampler=sampler, holdout=holdout),
      tokenizer, seq_len, add_bos=add_bos)
  return TokenDataset(rows, mask)


def random_batches(vocab_size: int, batch: int, seq_len: int, n: int = 3,
                   seed: int = 0) -> list[Batch]:
  """`n` batches of uniformly random tokens (benchmarks), numpy arrays."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    rows = rng.integers(0, vocab_size, (batch, seq_len + 1)).astype(np.int32)
    out.append(Batch(rows[:, :-1], rows[:, 1:],
                     np.ones((batch, seq_len), np.float32)))
  return out
