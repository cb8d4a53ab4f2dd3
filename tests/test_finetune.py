"""The fine-tuning launcher end to end on a real pretrained model (CPU).

stories260K (a TinyStories model) fine-tuned on TinyShakespeare, a new
domain: the first 90 % of the text trains, the last 10 % is held out.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import shared_path
from experiments import training_loop
from experiments.configs import finetune as finetune_configs

REPO = pathlib.Path(__file__).resolve().parents[1]
# method -> (optimizer, learning rate); QFT uses the int8-state Lion.
METHODS = {
    "full": ("adamw", 3e-3),
    "lora": ("adamw", 3e-3),
    "qlora": ("adamw", 3e-3),
    "modulora": ("adamw", 3e-3),
    "apiq": ("adamw", 3e-3),
    "loftq": ("adamw", 3e-3),
    "peqa": ("adamw", 3e-3),
    "qft": ("lion_int8", 3e-4),
    "hift": ("adamw", 3e-3),
}


def small_config(method: str, workdir: pathlib.Path, steps: int = 100):
  shared_path("models", "stories260K", "stories260K.bin")
  c = finetune_configs.get_config("cpu")
  c.method.name = method
  c.optimizer, c.learning_rate = METHODS[method]
  c.steps = steps
  c.data.seq_len = 64
  c.method.calib_segments = 8
  c.method.calib_seq_len = 64
  c.eval_interval = 10_000
  c.eval_batches = 4
  c.workdir = str(workdir / "run")
  return c


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_lowers_held_out_loss(method, tmp_path):
  summary, state = training_loop.run(small_config(method, tmp_path),
                                     log=lambda *_: None)
  assert summary["steps"] == 100 and int(state.step) == 100
  assert summary["skipped_steps"] == 0
  # A clear margin: the base model scores ~4.7 nats/token on Shakespeare.
  assert summary["eval_loss"] < summary["eval_loss_before"] - 0.8, summary
  assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_mistyped_override_raises():
  """The launcher's config is locked: a typo in an override is an error."""
  result = subprocess.run(
      [sys.executable, str(REPO / "experiments" / "finetune.py"),
       "--config.method.nmae=qft"], capture_output=True, text=True,
      timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert result.returncode != 0
  assert "nmae" in result.stderr


def test_unknown_method_is_a_clear_error(tmp_path):
  c = small_config("lora", tmp_path)
  c.method.name = "qlorra"
  with pytest.raises(ValueError, match="unknown method 'qlorra'"):
    training_loop.run(c, log=lambda *_: None)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_smollm2_every_method_20_steps(method, tmp_path):
  """SmolLM2-135M-Instruct, 20 steps of each method on CPU (slow)."""
  from conftest import smollm2_gguf  # pylint: disable=g-import-not-at-top
  smollm2_gguf()
  c = small_config(method, tmp_path, steps=20)
  c.model = "smollm2"
  c.method.group_size = 64
  c.method.calib_segments, c.method.calib_seq_len = 4, 64
  c.batch_size, c.data.seq_len, c.eval_batches = 4, 64, 2
  c.learning_rate = {"qft": 1e-4}.get(method, 1e-4 if method == "full"
                                       else 1e-3)
  summary, state = training_loop.run(c, log=lambda *_: None)
  assert int(state.step) == 20 and summary["skipped_steps"] == 0
  assert summary["eval_loss"] < summary["eval_loss_before"], summary
