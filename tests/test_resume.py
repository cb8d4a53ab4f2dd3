"""Checkpoints: exact resume after kill -9, corrupted checkpoints, NaN losses."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import shared_path
from experiments import training_loop
from experiments.configs import finetune as finetune_configs
from qft_jax._src import checkpoint as ckpt_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *_: None)


def qft_config(tmp_path, steps=40, ckpt="ckpt"):
  shared_path("models", "stories260K", "stories260K.bin")
  c = finetune_configs.get_config("cpu")
  c.method.name, c.optimizer, c.learning_rate = "qft", "lion_int8", 3e-4
  c.steps, c.batch_size, c.data.seq_len = steps, 16, 64
  c.eval_interval, c.eval_batches = 10_000, 1
  c.checkpoint_dir = str(tmp_path / ckpt)
  c.checkpoint_interval = 10
  c.workdir = str(tmp_path / "run")
  return c


def _overrides(c):
  flat = {"method.name": c.method.name, "optimizer": c.optimizer,
          "learning_rate": c.learning_rate, "steps": c.steps,
          "batch_size": c.batch_size, "data.seq_len": c.data.seq_len,
          "eval_interval": c.eval_interval, "eval_batches": c.eval_batches,
          "checkpoint_dir": c.checkpoint_dir,
          "checkpoint_interval": c.checkpoint_interval,
          "workdir": c.workdir}
  return [f"--config.{k}={v}" for k, v in flat.items()]


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_kill_minus_9_then_resume_is_bitwise_identical(tmp_path):
  c = qft_config(tmp_path)
  proc = subprocess.Popen(
      [sys.executable, str(REPO / "experiments" / "finetune.py"),
       *_overrides(c)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  marker = pathlib.Path(c.checkpoint_dir) / "20"
  deadline = time.time() + 400
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  steps_on_disk = ckpt_lib.Checkpointer(c.checkpoint_dir).steps()
  assert steps_on_disk and max(steps_on_disk) < c.steps, steps_on_disk

  resumed_log = []
  summary, resumed = training_loop.run(c, log=resumed_log.append)
  assert any("resumed from step" in line for line in resumed_log)
  assert summary["steps"] == c.steps

  c_ref = qft_config(tmp_path, ckpt="ckpt_ref")
  _, reference = training_loop.run(c_ref, **QUIET)
  got, want = _leaves(resumed), _leaves(reference)
  assert len(got) == len(want)
  int8_leaves = 0
  for a, b in zip(got, want):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
    int8_leaves += a.dtype == np.int8
  assert int8_leaves > 0, "expected int8 optimizer states in the state"


def test_corrupted_newest_checkpoint_falls_back(tmp_path, capsys):
  ck = ckpt_lib.Checkpointer(tmp_path / "c", keep=3)
  state = {"w": jnp.arange(6.0), "m": jnp.zeros(4, jnp.int8)}
  for step in (1, 2, 3):
    ck.save(step, jax.tree.map(lambda x, s=step: x + s, state), {"step": step})
  for f in (tmp_path / "c" / "3").rglob("*"):
    if f.is_file() and f.stat().st_size:
      f.write_bytes(b"\0garbage")
  step, restored, meta = ck.restore_latest(jax.eval_shape(lambda: state))
  assert step == 2 and meta == {"step": 2}
  np.testing.assert_array_equal(restored["w"], np.arange(6.0) + 2)
  assert "unreadable" in capsys.readouterr().out
  # Saving over a step that exists replaces it.
  ck.save(3, state, {"step": 3})
  assert ck.restore_latest(jax.eval_shape(lambda: state))[0] == 3


def test_every_checkpoint_corrupted_is_an_error(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path / "c")
  ck.save(1, {"w": jnp.ones(3)}, {})
  for f in (tmp_path / "c" / "1").rglob("*"):
    if f.is_file() and f.stat().st_size:
      f.write_bytes(b"\0")
  with pytest.raises(ckpt_lib.CheckpointError, match="could be restored"):
    ck.restore_latest(jax.eval_shape(lambda: {"w": jnp.ones(3)}))


def _divergent(tmp_path, on_nonfinite):
  c = qft_config(tmp_path, steps=6)
  c.method.name, c.optimizer, c.learning_rate = "full", "sgd", 1e30
  c.schedule, c.warmup_steps = "constant", 0
  c.batch_size, c.data.seq_len = 4, 32
  c.checkpoint_interval, c.log_interval = 1, 1
  c.on_nonfinite = on_nonfinite
  return c


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
  summary, state = training_loop.run(_divergent(tmp_path, "skip"), **QUIET)
  assert summary["skipped_steps"] >= 1
  for leaf in jax.tree.leaves(state.params):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_nonfinite_stop_keeps_last_good_checkpoint(tmp_path):
  c = _divergent(tmp_path, "stop")
  with pytest.raises(training_loop.NonFiniteLossError, match="non-finite"):
    training_loop.run(c, **QUIET)
  ck = ckpt_lib.Checkpointer(c.checkpoint_dir)
  assert ck.steps(), "the last good checkpoint must be on disk"
  # Every saved checkpoint holds finite params.
  step = max(ck.steps())
  raw = ocp.StandardCheckpointer().restore(
      pathlib.Path(c.checkpoint_dir) / str(step) / "state")
  assert jax.tree.leaves(raw)
  for leaf in jax.tree.leaves(raw):
    if hasattr(leaf, "dtype") and np.issubdtype(np.asarray(leaf).dtype,
                                                np.floating):
      assert np.all(np.isfinite(np.asarray(leaf)))
