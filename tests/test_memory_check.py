"""The launcher prints its memory plan and refuses runs that cannot fit.

stories260K on CPU; the device's `bytes_limit` is faked by patching
`training_loop.device_memory_limit` (CPU devices report none).
"""

import dataclasses
import hashlib
import pathlib

import pytest

from conftest import shared_path
from experiments import training_loop
from experiments.configs import finetune as finetune_configs
from qft_jax._src import memory
from qft_jax._src.models import llama
from qft_jax._src.models import loading


def tiny_config(tmp_path: pathlib.Path, steps: int = 2):
  shared_path("models", "stories260K", "stories260K.bin")
  c = finetune_configs.get_config("cpu")
  c.method.name = "lora"
  c.steps = steps
  c.warmup_steps = 1
  c.batch_size = 4
  c.data.seq_len = 32
  c.eval_batches = 1
  c.eval_interval = 10_000
  c.log_interval = 1
  c.checkpoint_dir = str(tmp_path / "ckpt")
  c.checkpoint_interval = 2
  c.workdir = str(tmp_path / "run")
  return c


def snapshot(root: pathlib.Path) -> dict:
  """Every file under `root`: relative path -> (sha256, mtime_ns)."""
  return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                     p.stat().st_mtime_ns)
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_plan_is_printed_and_recorded(tmp_path):
  lines = []
  summary, _ = training_loop.run(tiny_config(tmp_path), log=lines.append)
  plan_lines = [l for l in lines if l.startswith("memory plan (")]
  assert len(plan_lines) == 1, lines
  line = plan_lines[0]
  assert "lora r8, adamw, batch 4 x 32, remat none, float32" in line, line
  for part in ("total", "weights", "trainable", "gradients", "optimizer",
               "activations", "workspace", "GiB"):
    assert part in line, line
  assert "not checked" in line  # CPU: no bytes_limit
  # Printed before the model is loaded.
  assert lines.index(line) < next(i for i, l in enumerate(lines)
                                  if l.startswith("loading "))
  plan = summary["memory_plan"]
  assert plan["total"] > 0 and plan["total"] == sum(
      plan[k] for k in ("weights", "trainable", "gradients", "optimizer",
                        "activations", "workspace"))
  assert f"total {plan['total'] / memory.GIB:.3f} GiB" in line


def test_refuses_before_anything_is_loaded_or_saved(tmp_path, monkeypatch):
  c = tiny_config(tmp_path)
  training_loop.run(c, log=lambda *_: None)  # an existing checkpoint (step 2)
  before = snapshot(tmp_path)
  assert any(k.startswith("ckpt/") for k in before), before

  monkeypatch.setattr(training_loop, "device_memory_limit", lambda: 1 << 20)

  def no_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the memory check")

  monkeypatch.setattr(loading, "load_model", no_loading)
  c = tiny_config(tmp_path, steps=4)
  lines = []
  with pytest.raises(ValueError, match=r"refusing to start: the planned peak "
                     r".* exceeds the device's 0\.00 GiB.*memory_check=False"):
    training_loop.run(c, log=lines.append)
  assert any("device limit 0.00 GiB" in l for l in lines), lines
  assert snapshot(tmp_path) == before


def test_memory_check_false_starts_anyway(tmp_path, monkeypatch):
  monkeypatch.setattr(training_loop, "device_memory_limit", lambda: 1 << 20)
  c = tiny_config(tmp_path)
  c.memory_check = False
  lines = []
  summary, state = training_loop.run(c, log=lines.append)
  assert int(state.step) == 2 and summary["steps"] == 2
  assert any(l.startswith("WARNING: the planned peak") for l in lines), lines
  assert summary["memory_plan"]["total"] > 1 << 20


def test_plan_follows_the_config():
  """Micro-batch, dtype, remat and method reach `memory.plan`."""
  c = finetune_configs.get_config("smollm2")
  c.method.name = "lora"
  config = llama.LlamaConfig(vocab_size=512, hidden_size=64,
                             intermediate_size=128, num_layers=4, num_heads=4,
                             num_kv_heads=2, head_dim=16)
  plan = lambda c: training_loop.memory_plan(
      c, training_loop.method_config(c),
      dataclasses.replace(config, remat=c.remat))
  base = plan(c)
  c.accum_steps = 4
  assert plan(c).activations < base.activations
  c.accum_steps = 1
  c.remat = "full"
  assert plan(c).activations < base.activations
  c.remat = "none"
  c.dtype = "bfloat16"
  assert plan(c).activations < base.activations
  c.dtype = "float32"
  c.method.name = "full"
  assert plan(c).optimizer > base.optimizer
  c.method.name = "qlora"
  assert plan(c).weights < base.weights
