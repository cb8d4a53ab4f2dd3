r"""PyTorch peers of experiments/bench_train.py, on the same GPU and shapes.

  python3 experiments/peer_torch_train.py --out $OUT [qlora lion8 lora]

LLaMA-7B shape (random weights), batch 4 x 512, gradient checkpointing:
bitsandbytes NF4 (double quantization off, bf16 compute) + peft LoRA r16 on
all seven projections with AdamW; peft LoRA r16 over bf16; full fine-tuning
in bf16 with bitsandbytes' Lion8bit. Peak `torch.cuda.max_memory_allocated`
after one warm-up step, median step time over the timed steps. Writes
`peer_torch_train.json`.
"""

import argparse
import gc
import json
import os
import statistics
import time

import torch
from torch import nn

LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, max_position_embeddings=4096)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj"]


def make_model(dtype):
  from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=g-import-not-at-top
  cfg = LlamaConfig(**LLAMA7B)
  cfg._attn_implementation = "sdpa"  # pylint: disable=protected-access
  with torch.device("cuda"):
    return LlamaForCausalLM(cfg).to(dtype)


def to_nf4(model):
  import bitsandbytes as bnb  # pylint: disable=g-import-not-at-top
  for module in list(model.model.layers.modules()):
    for name, child in list(module.named_children()):
      if isinstance(child, nn.Linear):
        q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                              bias=child.bias is not None,
                              compute_dtype=torch.bfloat16, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                     quant_type="nf4")
        setattr(module, name, q.cuda())
  gc.collect()
  torch.cuda.empty_cache()
  return model


def with_lora(model):
  from peft import LoraConfig, get_peft_model  # pylint: disable=g-import-not-at-top
  for p in model.parameters():
    p.requires_grad_(False)
  return get_peft_model(model, LoraConfig(r=16, lora_alpha=32,
                                          target_modules=TARGETS,
                                          lora_dropout=0.0))


def bench(model, opt, batch, seq, steps):
  model.gradient_checkpointing_enable(
      gradient_checkpointing_kwargs={"use_reentrant": False})
  model.config.use_cache = False
  model.train()
  ids = torch.randint(0, LLAMA7B["vocab_size"], (batch, seq), device="cuda")

  def step():
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss

  step()
  torch.cuda.synchronize()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    loss = step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
  dt = statistics.median(times)
  return {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
          "tok_per_s": round(batch * seq / dt, 1), "step_s": round(dt, 4),
          "loss": float(loss)}


def run(name, batch, seq, steps):
  import bitsandbytes as bnb  # pylint: disable=g-import-not-at-top
  torch.cuda.reset_peak_memory_stats()
  if name == "qlora":
    model = with_lora(to_nf4(make_model(torch.bfloat16)))
    opt = torch.optim.AdamW([p for p in model.parameters()
                             if p.requires_grad], lr=1e-4)
  elif name == "lora":
    model = with_lora(make_model(torch.bfloat16))
    opt = torch.optim.AdamW([p for p in model.parameters()
                             if p.requires_grad], lr=1e-4)
  elif name == "lion8":
    model = make_model(torch.bfloat16)
    opt = bnb.optim.Lion8bit(model.parameters(), lr=1e-5)
  else:
    raise ValueError(f"unknown peer {name!r}")
  torch.cuda.reset_peak_memory_stats()
  row = bench(model, opt, batch, seq, steps)
  del model, opt
  gc.collect()
  torch.cuda.empty_cache()
  return {"method": f"peer:{name}", "model": "llama-7b", "batch": batch,
          "seq_len": seq, **row}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("peers", nargs="*", default=["qlora", "lion8", "lora"])
  parser.add_argument("--out", default="/tmp")
  parser.add_argument("--steps", type=int, default=4)
  args = parser.parse_args()
  rows = []
  for name in args.peers:
    t = time.time()
    try:
      rows.append(run(name, 4, 512, args.steps))
    except Exception as e:  # pylint: disable=broad-except
      rows.append({"method": f"peer:{name}", "error": f"{type(e).__name__}: "
                   f"{str(e)[:300]}"})
    print(json.dumps(rows[-1]), f"({time.time() - t:.0f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peer_torch_train.json"), "w") as f:
      json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
