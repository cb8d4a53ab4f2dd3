"""Task evaluations: SST-2 accuracy, GSM8K exact match, DialogSum ROUGE, losses.

Each evaluation is a function of `(params, config, tokenizer, data, ...)` and
returns a dict of plain numbers. Any parameter tree the model runs with
(float, QArray, LoRA, PEQA, QFT weights) works, because everything goes
through `llama.Llama(config).apply`. `add_bos` must match how the model was
fine-tuned (`data.tokenize_examples(add_bos=...)`); SmolLM2's GGUF says
`add_bos_token = False`, and the peers' numbers in
../shared/design/device-notes.md use no BOS.

Protocols:

* SST-2 (`label_accuracy`, `sst2_accuracy`): prompt
  `"Review: <sentence>\\nSentiment:"` (`data.sst2_prompt`); the class is the
  label word (" negative"/" positive") whose first token has the larger logit
  at the last prompt position, `argmax_c z[T-1, tok(label_c)]` (the same
  decision as comparing log-probabilities: both share one softmax). Prompts
  are right-padded; the logit is read at each row's last real position.
* GSM8K (`gsm8k_accuracy`): prompt `"Question: <q>\\nAnswer:"` (as in
  `data.load_examples("gsm8k")`), greedy decoding until EOS, a new
  "\\nQuestion:" or `max_new_tokens`; the answer is the first number after the
  last "####", else the last number in the text (`extract_answer`); it is
  correct when it equals the reference's "####" number as a decimal
  (commas and "$" dropped, "18.00" == "18").
* DialogSum (`dialogsum_rouge`): prompt `"Dialogue:\\n<dialogue>\\nSummary:"`
  (`data.dialogsum_prompt`, prompts longer than `max_prompt_tokens` keep their
  last tokens), greedy decoding until EOS, a newline or `max_new_tokens`.
  ROUGE-1/2/L F-measure x 100 from the `rouge-score` package (its default
  tokenizer: lower-cased alphanumeric words; Porter stemming on). Each test
  dialogue has 3 references: `rouge*` is the mean over the references (the
  primary number), `rouge*_max` the best one; both are averaged over
  dialogues.
* Instruction following (`completion_loss`, `alpaca_heldout_loss`): mean NLL
  over completion tokens only (EOS included), of the last `holdout` Alpaca
  records in the Alpaca prompt template.
* Held-out perplexity (`heldout_perplexity`): `evaluate.perplexity` over the
  "eval" part (last 10 %) of a text file, as `data.load_examples("text")`
  splits it.
"""

from __future__ import annotations

import decimal
import functools
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qft_jax._src import data as data_lib
from qft_jax._src import evaluate
from qft_jax._src import train
from qft_jax._src.models import generate as generate_lib
from qft_jax._src.models import llama


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _length_batches(lengths: Sequence[int], batch_size: int):
  """Index arrays of `batch_size` rows, shortest sequences first.

  The last batch is filled by repeating its first index, so every call has
  the same batch size; `n_real` rows of each batch count.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  order = np.argsort(np.asarray(lengths), kind="stable")
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    n_real = len(idx)
    yield np.concatenate([idx, np.full(batch_size - n_real, idx[0])]), n_real


def _encode_prompts(tokenizer, prompts: Sequence[str], add_bos: bool,
                    max_prompt_tokens: int | None) -> list[list[int]]:
  """`[bos] + ids` per prompt, keeping the last `max_prompt_tokens` in all."""
  if add_bos and tokenizer.bos_id is None:
    raise ValueError("add_bos=True but the tokenizer has no BOS token")
  bos = [tokenizer.bos_id] if add_bos else []
  out = []
  for p in prompts:
    ids = tokenizer.encode(p)
    if max_prompt_tokens is not None:
      ids = ids[-(max_prompt_tokens - len(bos)):]
    out.append(bos + ids)
  return out


# --------------------------------------------------------------------------
# Classification by label logits (SST-2)


@functools.partial(jax.jit, static_argnames=("config",))
def _label_logits(params, config, tokens, mask, last, label_ids):
  """Logits `(B, C)` of `label_ids` at position `last` `(B,)` of each row."""
  hidden = llama.Llama(config).apply({"params": params}, tokens,
                                     attention_mask=mask, return_hidden=True)
  at_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  return llama.head_logits(params, config, at_last)[:, label_ids]


def label_token_ids(tokenizer, label_words: Sequence[str]) -> list[int]:
  """First token of each label word; raises if two labels share it."""
  ids = []
  for word in label_words:
    toks = tokenizer.encode(word)
    if not toks:
      raise ValueError(f"label word {word!r} encodes to no tokens")
    ids.append(toks[0])
  if len(set(ids)) != len(ids):
    raise ValueError(f"label words {list(label_words)} share a first token "
                     f"({ids}): the first-token protocol cannot tell them "
                     "apart")
  return ids


def label_accuracy(params: dict, config: llama.LlamaConfig, tokenizer,
                   prompts: Sequence[str], labels: Sequence[int],
                   label_words: Sequence[str], *, add_bos: bool = False,
                   batch_size: int = 32, bucket: int = 16) -> dict:
  """Accuracy of `argmax_c z_{T-1}[first token of label_words[c]]`.

  Args:
    params, config: the model.
    tokenizer: `encode(text) -> ids`, `bos_id`.
    prompts: N prompt strings; labels: N class indices into `label_words`.
    label_words: the C label strings, e.g. `(" negative", " positive")`.
    add_bos: prepend `tokenizer.bos_id` to every prompt.
    batch_size: rows per forward pass (sorted by length, right-padded to a
      multiple of `bucket`, so few shapes are compiled).
    bucket: padding granularity.

  Returns:
    `{"accuracy": correct / N, "correct", "n", "predictions": [N ints]}`.
  """
  if len(prompts) != len(labels) or not prompts:
    raise ValueError(f"need as many labels as prompts (>0), got "
                     f"{len(prompts)} prompts and {len(labels)} labels")
  label_ids = jnp.asarray(label_token_ids(tokenizer, label_words), jnp.int32)
  seqs = _encode_prompts(tokenizer, prompts, add_bos, None)
  if min(len(s) for s in seqs) == 0:
    raise ValueError("a prompt encodes to no tokens")
  preds = np.zeros(len(seqs), np.int64)
  for idx, n_real in _length_batches([len(s) for s in seqs], batch_size):
    length = _round_up(max(len(seqs[i]) for i in idx), bucket)
    tokens = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for row, i in enumerate(idx):
      tokens[row, :len(seqs[i])] = seqs[i]
      mask[row, :len(seqs[i])] = 1
    last = mask.sum(1) - 1
    z = _label_logits(params, config, jnp.asarray(tokens), jnp.asarray(mask),
                      jnp.asarray(last), label_ids)
    preds[idx[:n_real]] = np.asarray(jnp.argmax(z, axis=-1))[:n_real]
  correct = int(np.sum(preds == np.asarray(labels)))
  return {"accuracy": correct / len(seqs), "correct": correct,
          "n": len(seqs), "predictions": preds.tolist()}


def sst2_accuracy(params: dict, config: llama.LlamaConfig, tokenizer, path,
                  *, limit: int | None = None, add_bos: bool = False,
                  batch_size: int = 32) -> dict:
  """SST-2 accuracy on a GLUE TSV (the dev set: 872 sentences).

  `limit` keeps the first `limit` rows (for CPU-sized checks).
  """
  rows = data_lib.read_sst2(path)[:limit]
  return label_accuracy(params, config, tokenizer,
                        [data_lib.sst2_prompt(s) for s, _ in rows],
                        [y for _, y in rows], data_lib.SST2_LABELS,
                        add_bos=add_bos, batch_size=batch_size)


# --------------------------------------------------------------------------
# Greedy decoding of left-padded prompts


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens",
                                             "eos_id"))
def _greedy_padded(params, config, tokens, mask, max_new_tokens, eos_id):
  """New tokens `(B, max_new_tokens)` after left-padded prompts `(B, T)`.

  Row b has `pad_b = T - sum(mask_b)` padding tokens on the left; its real
  tokens get RoPE positions `0, 1, ...` and padded keys are masked out, so
  each row decodes as if alone. Stops early once every row has emitted
  `eos_id` (later entries of a finished row are `eos_id`).
  """
  b, t = tokens.shape
  model = llama.Llama(config)
  pad = t - jnp.sum(mask, axis=1)
  key_mask = jnp.concatenate(
      [mask, jnp.ones((b, max_new_tokens), mask.dtype)], axis=1)
  positions = jnp.maximum(jnp.arange(t)[None, :] - pad[:, None], 0)
  cache = generate_lib.init_cache(config, b, t + max_new_tokens)
  hidden, cache = model.apply({"params": params}, tokens, positions=positions,
                              attention_mask=key_mask, cache=cache,
                              cache_index=0, return_hidden=True)
  logits = llama.head_logits(params, config, hidden[:, -1])  # not (B, T, V)
  first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  fill = 0 if eos_id is None else eos_id
  out = jnp.full((b, max_new_tokens), fill, jnp.int32).at[:, 0].set(first)
  done = (jnp.zeros((b,), bool) if eos_id is None else first == eos_id)

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, token, cache, out, done = carry
    index = t + i - 1  # cache slot of `token`, the (i-1)-th new token
    logits, cache = model.apply(
        {"params": params}, token[:, None], positions=(index - pad)[:, None],
        attention_mask=key_mask, cache=cache, cache_index=index)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    if eos_id is not None:
      nxt = jnp.where(done, eos_id, nxt)
      done = done | (nxt == eos_id)
    return i + 1, nxt, cache, out.at[:, i].set(nxt), done

  _, _, _, out, _ = jax.lax.while_loop(
      cond, body, (jnp.asarray(1, jnp.int32), first, cache, out, done))
  return out


def greedy_generate(params: dict, config: llama.LlamaConfig,
                    prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    eos_id: int | None = None, batch_size: int = 16,
                    bucket: int = 32) -> list[list[int]]:
  """Greedy continuations of variable-length prompts, batched.

  Prompts are sorted by length, left-padded to a multiple of `bucket` with an
  attention mask (so a batch decodes exactly like each prompt alone with
  `generate.generate`), and decoded with a KV cache.

  Args:
    params, config: the model.
    prompts: N token-id lists (each non-empty).
    max_new_tokens: tokens generated per prompt at most (static).
    eos_id: stop a row at this token (it is not returned).
    batch_size: prompts per decode batch.
    bucket: prompt padding granularity.

  Returns:
    N lists of new token ids, cut before the first `eos_id`.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not prompts or min(len(p) for p in prompts) == 0:
    raise ValueError("need at least one prompt, each with >= 1 token")
  results: list[list[int]] = [[] for _ in prompts]
  for idx, n_real in _length_batches([len(p) for p in prompts], batch_size):
    length = _round_up(max(len(prompts[i]) for i in idx), bucket)
    tokens = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for row, i in enumerate(idx):
      tokens[row, length - len(prompts[i]):] = prompts[i]
      mask[row, length - len(prompts[i]):] = 1
    out = np.asarray(_greedy_padded(params, config, jnp.asarray(tokens),
                                    jnp.asarray(mask), max_new_tokens, eos_id))
    for row in range(n_real):
      ids = out[row].tolist()
      if eos_id is not None and eos_id in ids:
        ids = ids[:ids.index(eos_id)]
      results[idx[row]] = ids
  return results


def _cut(text: str, stops: Sequence[str]) -> str:
  for s in stops:
    if s in text:
      text = text[:text.index(s)]
  return text


# --------------------------------------------------------------------------
# GSM8K

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> decimal.Decimal | None:
  """`"$1,234.50"` -> `Decimal("1234.50")` (== 1234.5); None if no number."""
  m = _NUMBER.search(text.replace("$", ""))
  if m is None:
    return None
  try:
    return decimal.Decimal(m.group(0).replace(",", ""))
  except decimal.InvalidOperation:
    return None


def extract_answer(text: str) -> decimal.Decimal | None:
  """The first number after the last "####", else the last number in `text`."""
  if "####" in text:
    found = normalize_number(text.rsplit("####", 1)[1])
    if found is not None:
      return found
  numbers = _NUMBER.findall(text.replace("$", ""))
  return normalize_number(numbers[-1]) if numbers else None


def gsm8k_accuracy(params: dict, config: llama.LlamaConfig, tokenizer, path,
                   *, limit: int | None = None, max_new_tokens: int = 320,
                   add_bos: bool = False, batch_size: int = 16,
                   samples: int = 3) -> dict:
  """GSM8K exact match with greedy decoding (the first `limit` problems).

  Returns:
    `{"accuracy", "correct", "n", "samples": the first `samples` problems
    with their generation, predicted and reference answers}`.
  """
  examples = data_lib.load_examples("gsm8k", path)[:limit]
  prompts = _encode_prompts(tokenizer, [e.prompt for e in examples], add_bos,
                            None)
  outs = greedy_generate(params, config, prompts, max_new_tokens,
                         eos_id=tokenizer.eos_id, batch_size=batch_size)
  correct, shown = 0, []
  for e, ids in zip(examples, outs):
    text = _cut(tokenizer.decode(ids), ("\nQuestion:",))
    pred, gold = extract_answer(text), extract_answer(e.completion)
    ok = pred is not None and gold is not None and pred == gold
    correct += ok
    if len(shown) < samples:
      shown.append({"prompt": e.prompt, "generation": text,
                    "pred": None if pred is None else str(pred),
                    "gold": str(gold), "correct": bool(ok)})
  return {"accuracy": correct / len(examples), "correct": correct,
          "n": len(examples), "samples": shown}


# --------------------------------------------------------------------------
# DialogSum ROUGE

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str],
          references: Sequence[Sequence[str]]) -> dict:
  """Corpus ROUGE-1/2/L F-measure x 100 over several references each.

  Per prediction, F is computed against every reference; `rouge*` averages
  those over the references, `rouge*_max` takes the best; both are then
  averaged over predictions.
  """
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  if len(predictions) != len(references) or not predictions:
    raise ValueError(f"need one reference list per prediction (>0), got "
                     f"{len(predictions)} and {len(references)}")
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  mean = {k: 0.0 for k in ROUGE_TYPES}
  best = {k: 0.0 for k in ROUGE_TYPES}
  for pred, refs in zip(predictions, references):
    if not refs:
      raise ValueError("every prediction needs at least one reference")
    scores = [scorer.score(ref, pred) for ref in refs]
    for k in ROUGE_TYPES:
      f = [s[k].fmeasure for s in scores]
      mean[k] += sum(f) / len(f)
      best[k] += max(f)
  n = len(predictions)
  out = {k: 100.0 * v / n for k, v in mean.items()}
  out.update({f"{k}_max": 100.0 * v / n for k, v in best.items()})
  return out


def dialogsum_rouge(params: dict, config: llama.LlamaConfig, tokenizer, path,
                    *, limit: int | None = None, max_new_tokens: int = 128,
                    max_prompt_tokens: int = 1024, add_bos: bool = False,
                    batch_size: int = 16, samples: int = 3) -> dict:
  """ROUGE of greedy summaries of DialogSum dialogues (first `limit`).

  References are `summary1..3` (test) or `summary` (dev).

  Returns:
    `rouge` of the predictions, plus `n` and a few `samples`.
  """
  records = data_lib.read_json_records(path)[:limit]
  refs = [[r[k] for k in ("summary", "summary1", "summary2", "summary3")
           if k in r] for r in records]
  prompts = _encode_prompts(
      tokenizer, [data_lib.dialogsum_prompt(r["dialogue"]) for r in records],
      add_bos, max_prompt_tokens)
  outs = greedy_generate(params, config, prompts, max_new_tokens,
                         eos_id=tokenizer.eos_id, batch_size=batch_size)
  # The summary is the first line of text: a zero-shot model often opens
  # with a newline after "Summary:", which must not end it.
  preds = [_cut(tokenizer.decode(ids).lstrip(), ("\n",)).strip()
           for ids in outs]
  result = rouge(preds, refs)
  result["n"] = len(records)
  result["samples"] = [{"prediction": p, "references": r}
                       for p, r in zip(preds[:samples], refs[:samples])]
  return result


# --------------------------------------------------------------------------
# Losses


@functools.partial(jax.jit, static_argnames=("config",))
def _masked_nll(params, config, tokens, targets, mask):
  logits = llama.Llama(config).apply({"params": params}, tokens)
  return train.cross_entropy(logits, targets, mask)


def completion_loss(params: dict, config: llama.LlamaConfig, tokenizer,
                    examples: Sequence[data_lib.Example], *, seq_len: int = 512,
                    add_bos: bool = False, batch_size: int = 8) -> dict:
  """Mean NLL over completion tokens, rows as in `data.tokenize_examples`.

  Returns:
    `{"loss": nats per completion token, "ppl": exp(loss), "tokens", "n"}`.
  """
  if not examples:
    raise ValueError("no examples to score")
  rows, mask = data_lib.tokenize_examples(examples, tokenizer, seq_len,
                                          add_bos=add_bos)
  # Row length = one past its last completion token; batches of similar
  # length are cut to a multiple of 64 columns (+1 for the shifted targets).
  lengths = mask.shape[1] - np.argmax(mask[:, ::-1] > 0, axis=1)
  total = count = 0.0
  for idx, n_real in _length_batches(lengths, batch_size):
    cols = min(_round_up(int(lengths[idx].max()), 64), seq_len) + 1
    weights = mask[idx, 1:cols].copy()
    weights[n_real:] = 0.0
    s, n = _masked_nll(params, config, jnp.asarray(rows[idx, :cols - 1]),
                       jnp.asarray(rows[idx, 1:cols]), jnp.asarray(weights))
    total, count = total + float(s), count + float(n)
  if count == 0:
    raise ValueError("the examples contain no completion tokens")
  return {"loss": total / count, "ppl": math.exp(total / count),
          "tokens": int(count), "n": len(examples)}


def alpaca_heldout_loss(params: dict, config: llama.LlamaConfig, tokenizer,
                        path, *, holdout: int = 200, seq_len: int = 512,
                        add_bos: bool = False, batch_size: int = 8) -> dict:
  """`completion_loss` on the last `holdout` records of an Alpaca file."""
  examples = data_lib.load_examples("alpaca", path, split="eval",
                                    holdout=holdout)
  return completion_loss(params, config, tokenizer, examples, seq_len=seq_len,
                         add_bos=add_bos, batch_size=batch_size)


def heldout_perplexity(params: dict, config: llama.LlamaConfig, tokenizer,
                       path, *, seq_len: int = 512, windows: int | None = None,
                       batch_size: int = 4) -> dict:
  """`evaluate.perplexity` on the held-out (last 10 %) part of a text file."""
  text = data_lib.load_examples("text", path, split="eval")[0].completion
  return evaluate.perplexity(params, config, tokenizer.encode(text),
                             seq_len=seq_len, windows=windows,
                             batch_size=batch_size)
