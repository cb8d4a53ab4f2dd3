"""Grids for experiments/reproduce.py: (method preset, task, seed) cells.

  --config=experiments/configs/reproduce.py          every method x task, seed 0
  --config=experiments/configs/reproduce.py:headline the acceptance cells, 3 seeds
  --config=experiments/configs/reproduce.py:cpu      stories260K, a few steps

A cell's fine-tuning config is `experiments/configs/finetune.py` (`base`),
then the task's overrides (`TASKS`), then the method preset's (`PRESETS`),
then the seed. Select cells with comma lists, e.g.
`--config.methods=lora,qft --config.tasks=sst2 --config.seeds=0,1,2`.

Choices not fixed by the papers (written down here so that they are
deliberate): every LoRA-family method uses rank 16, alpha 32 on all seven
projections and AdamW lr 2e-4 (the peers' peft setting); full fine-tuning
AdamW lr 2e-5 (the peers'); Lion (float and QFT's int8) lr 5e-6, 4x below
AdamW's as Lion's authors advise; PEQA AdamW lr 5e-5 on the scales; HiFT
AdamW lr 5e-5, one unit (embedding, a decoder layer or the final norm) per
step, the schedule evaluated per global step. Weight decay 0 throughout;
warm-up 20 steps then linear decay to 0. "qlora2_rtn" stands in for
ApiQ's "QLoRA 2-bit" baseline (LoRA with B = 0 over a plain 2-bit RTN base:
NF4 has no 2-bit form here). "zeroshot" evaluates the loaded model untrained.
"""

import pathlib

import ml_collections

from experiments.configs import finetune

DATA = finetune.DATA
TASK_DIR = DATA / "tasks"

_LORA_LR = dict(optimizer="adamw", learning_rate=2e-4)
PRESETS = {
    "zeroshot": {},
    "full_adamw": dict(method=dict(name="full"), optimizer="adamw",
                       learning_rate=2e-5),
    "full_lion": dict(method=dict(name="full"), optimizer="lion",
                      learning_rate=5e-6),
    "lora": dict(method=dict(name="lora"), **_LORA_LR),
    "qlora4": dict(method=dict(name="qlora", bits=4), **_LORA_LR),
    "qlora2_rtn": dict(method=dict(name="modulora", quantizer="rtn", bits=2),
                       **_LORA_LR),
    "modulora_gptq3": dict(method=dict(name="modulora", quantizer="gptq",
                                       bits=3), **_LORA_LR),
    "modulora_gptq4": dict(method=dict(name="modulora", quantizer="gptq",
                                       bits=4), **_LORA_LR),
    "apiq2": dict(method=dict(name="apiq", bits=2), **_LORA_LR),
    "apiq3": dict(method=dict(name="apiq", bits=3), **_LORA_LR),
    "apiq4": dict(method=dict(name="apiq", bits=4), **_LORA_LR),
    "loftq2": dict(method=dict(name="loftq", bits=2), **_LORA_LR),
    "peqa3": dict(method=dict(name="peqa", bits=3), optimizer="adamw",
                  learning_rate=5e-5),
    "peqa4": dict(method=dict(name="peqa", bits=4), optimizer="adamw",
                  learning_rate=5e-5),
    "qft": dict(method=dict(name="qft", bits=8), optimizer="lion_int8",
                learning_rate=5e-6),
    "hift_bottom_up": dict(method=dict(name="hift"), optimizer="adamw",
                           learning_rate=5e-5, hift=dict(order="bottom-up")),
    "hift_top_down": dict(method=dict(name="hift"), optimizer="adamw",
                          learning_rate=5e-5, hift=dict(order="top-down")),
    "hift_random": dict(method=dict(name="hift"), optimizer="adamw",
                        learning_rate=5e-5, hift=dict(order="random")),
}
ALL_METHODS = tuple(PRESETS)


def _tasks_gpu() -> dict:
  """Full-size tasks on SmolLM2 (steps = epochs x rows / batch 16)."""
  sst2, gsm8k, dsum = (TASK_DIR / "sst2", TASK_DIR / "gsm8k",
                       TASK_DIR / "dialogsum")
  text = str(DATA / "text" / "tinyshakespeare_input.txt")
  return {
      # The peers' protocol: 4,000 sentences drawn with
      # random.Random(0).shuffle, batch 16, one epoch, 20 warm-up steps.
      "sst2": dict(
          data=dict(kind="sst2", train=str(sst2 / "train.tsv"),
                    eval=str(sst2 / "dev.tsv"), limit=4000, sampler="python",
                    sample_seed=0, seq_len=96),
          steps=250,
          eval=dict(fn="sst2_accuracy", path=str(sst2 / "dev.tsv"))),
      # DialogSum dev (500 dialogues) -> test, 3 epochs. Full remat: 16 x
      # 640 float32 activations of full fine-tuning exceed 60 GB without it.
      "dialogsum": dict(
          data=dict(kind="dialogsum", train=str(dsum / "dialogsum.dev.jsonl"),
                    eval=str(dsum / "dialogsum.test.jsonl"), seq_len=640),
          steps=94, remat="full",
          eval=dict(fn="dialogsum_rouge",
                    path=str(dsum / "dialogsum.test.jsonl"),
                    max_new_tokens=128)),
      # GSM8K train (7,473) -> test (1,319), one epoch.
      "gsm8k": dict(
          data=dict(kind="gsm8k", train=str(gsm8k / "train.jsonl"),
                    eval=str(gsm8k / "test.jsonl"), seq_len=384),
          steps=467,
          eval=dict(fn="gsm8k_accuracy", path=str(gsm8k / "test.jsonl"),
                    max_new_tokens=320)),
      # TinyShakespeare: first 90 % -> perplexity of the last 10 %.
      "shakespeare": dict(
          data=dict(kind="text", train=text, seq_len=256),
          steps=200,
          eval=dict(fn="heldout_perplexity", path=text, seq_len=256)),
      # The stability run of the QFT acceptance criterion.
      "shakespeare2k": dict(
          data=dict(kind="text", train=text, seq_len=256),
          steps=2000, eval_interval=250,
          eval=dict(fn="heldout_perplexity", path=text, seq_len=256)),
      # Alpaca subset: first 1,800 -> completion loss of the last 200.
      "alpaca": dict(
          data=dict(kind="alpaca",
                    train=str(TASK_DIR / "alpaca" / "alpaca_subset_2k.json"),
                    holdout=200, seq_len=512),
          steps=113,
          eval=dict(fn="alpaca_heldout_loss",
                    path=str(TASK_DIR / "alpaca" / "alpaca_subset_2k.json"),
                    holdout=200, seq_len=512)),
  }


def _tasks_cpu() -> dict:
  """The same tasks cut to CI size for stories260K."""
  tasks = _tasks_gpu()
  del tasks["shakespeare2k"]
  small = {
      "sst2": (dict(limit=64, seq_len=64), dict(limit=32)),
      "dialogsum": (dict(limit=16, seq_len=256),
                    dict(limit=4, max_new_tokens=8, max_prompt_tokens=192)),
      "gsm8k": (dict(limit=32, seq_len=128), dict(limit=4, max_new_tokens=8)),
      "shakespeare": (dict(seq_len=64), dict(seq_len=64, windows=4)),
      "alpaca": (dict(limit=32, seq_len=128), dict(seq_len=128, holdout=16)),
  }
  for name, (data, ev) in small.items():
    tasks[name]["data"].update(data)
    tasks[name]["eval"].update(ev)
    tasks[name]["steps"] = 3
  tasks["alpaca"]["data"]["holdout"] = 16
  return tasks


HEADLINE_METHODS = ("zeroshot", "full_adamw", "full_lion", "lora", "qlora4",
                    "qlora2_rtn", "modulora_gptq3", "modulora_gptq4", "apiq2",
                    "loftq2", "peqa4", "qft", "hift_bottom_up")


def get_config(variant: str = "gpu") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.methods = ",".join(m for m in ALL_METHODS)
  c.tasks = "sst2,dialogsum,gsm8k,shakespeare,alpaca"
  c.seeds = "0"
  c.results_dir = "experiments/results/reproduce"
  c.work_dir = "runs/reproduce"    # metrics.jsonl / TensorBoard per cell
  c.add_bos = False                # SmolLM2: add_bos_token = False
  c.eval_batch_size = 32
  c.eval_limit = 0                 # >0: evaluate only that many examples
  c.max_steps = 0                  # >0: cap every cell's training steps
  c.warmup_steps = 20
  c.group_size = 64
  c.base = finetune.get_config("smollm2")
  c.base.schedule = "linear"
  c.base.weight_decay = 0.0
  c.base.batch_size = 16
  c.base.log_interval = 10
  c.base.hift.lr_mode = "per_step"
  c.tasks_table = _tasks_gpu()
  if variant == "gpu":
    pass
  elif variant == "headline":
    c.methods = ",".join(HEADLINE_METHODS)
    c.tasks = "sst2,dialogsum"
    c.seeds = "0,1,2"
  elif variant == "cpu":
    c.methods = "zeroshot,full_adamw,lora,qlora4,peqa4,qft,hift_bottom_up"
    c.results_dir = "runs/reproduce_cpu/results"
    c.work_dir = "runs/reproduce_cpu/work"
    c.add_bos = True               # llama2.c models are trained with BOS
    c.eval_batch_size = 8
    c.warmup_steps = 1
    c.group_size = -1              # stories260K's FFN width 172 has no g=64
    c.base = finetune.get_config("cpu")
    c.base.schedule = "linear"
    c.base.batch_size = 8
    c.base.log_interval = 1
    c.base.eval_batches = 2
    c.base.method.calib_segments = 4
    c.base.method.calib_seq_len = 64
    c.base.method.apiq_epochs = 1
    c.tasks_table = _tasks_cpu()
  else:
    raise ValueError(f"unknown reproduce variant {variant!r}: gpu, headline "
                     "or cpu")
  c.base.workdir = str(pathlib.Path(c.work_dir))
  return c
