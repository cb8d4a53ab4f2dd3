"""Fine-tuning configs for experiments/finetune.py.

`--config=experiments/configs/finetune.py` is the CPU-sized default
(stories260K on TinyShakespeare, QLoRA-style 4-bit LoRA, 100 steps);
`--config=experiments/configs/finetune.py:smollm2` is SmolLM2-135M on
TinyShakespeare; `:sst2` and `:gsm8k` fine-tune SmolLM2 on those tasks.
Override any field on the command line, e.g. `--config.method.name=qft`.
"""

import pathlib

import ml_collections

DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = str(DATA / "models" / "stories260K" / "stories260K.bin")
  c.dtype = "float32"              # activations and float params
  c.remat = "none"                 # or "full", "dots_saveable", ...
  c.mesh = ""                      # "fsdp:4", "data:2,fsdp:-1,tensor:1"...;
                                   # empty: every device on one fsdp axis

  c.method = ml_collections.ConfigDict(dict(
      name="qlora", bits=4, group_size=-1, quantizer="gptq", lora_rank=8,
      lora_alpha=16.0,
      lora_targets=(r"attn/(q|k|v|o)_proj$", r"mlp/(gate|up|down)_proj$"),
      outlier_fraction=0.01, rounding="stochastic", calib_segments=16,
      calib_seq_len=128, apiq_epochs=2))
  c.hift = ml_collections.ConfigDict(dict(
      group_size=1, order="bottom-up", lr_mode="per_step"))

  c.data = ml_collections.ConfigDict(dict(
      kind="text", train=str(DATA / "text" / "tinyshakespeare_input.txt"),
      eval="", limit=0, eval_limit=64, seq_len=128,
      calib=str(DATA / "text" / "tinyshakespeare_input.txt"),
      sampler="numpy", sample_seed=-1, holdout=0, add_bos=True))

  c.optimizer = "adamw"            # adamw | lion | lion_int8 | sgd
  c.learning_rate = 3e-3
  c.weight_decay = 0.0
  c.schedule = "linear"            # constant | linear | cosine
  c.warmup_steps = 10
  c.batch_size = 8
  c.accum_steps = 1
  c.steps = 100
  c.seed = 0

  c.eval_interval = 50
  c.eval_batches = 8
  c.log_interval = 10
  c.checkpoint_dir = ""            # empty: no checkpoints
  c.checkpoint_interval = 50
  c.keep_checkpoints = 3
  c.on_nonfinite = "skip"          # skip | stop
  c.memory_check = True            # refuse to start when the memory plan
                                   # (printed at setup) exceeds the device's
                                   # bytes_limit; False: warn and start
  c.workdir = "runs/finetune"      # metrics.jsonl and TensorBoard events

  if variant == "cpu":
    pass
  elif variant in ("smollm2", "sst2", "gsm8k", "alpaca"):
    c.model = "smollm2"
    c.data.add_bos = False         # SmolLM2's GGUF: add_bos_token = false
    c.method.group_size = 64
    c.method.lora_rank = 16
    c.method.lora_alpha = 32.0
    c.learning_rate = 2e-4
    c.batch_size = 16
    c.steps = 250
    c.data.seq_len = 256
    c.method.calib_seq_len = 256
    c.eval_interval = 125
    if variant == "sst2":
      c.data.kind = "sst2"
      c.data.train = str(DATA / "tasks" / "sst2" / "train.tsv")
      c.data.eval = str(DATA / "tasks" / "sst2" / "dev.tsv")
      c.data.limit = 4000
      c.data.seq_len = 96
    elif variant == "gsm8k":
      c.data.kind = "gsm8k"
      c.data.train = str(DATA / "tasks" / "gsm8k" / "train.jsonl")
      c.data.eval = str(DATA / "tasks" / "gsm8k" / "test.jsonl")
      c.data.seq_len = 384
    elif variant == "alpaca":
      c.data.kind = "alpaca"
      c.data.train = str(DATA / "tasks" / "alpaca" / "alpaca_subset_2k.json")
  else:
    raise ValueError(f"unknown config variant {variant!r}: cpu, smollm2, "
                     "sst2, gsm8k or alpaca")
  return c
