"""QLoRA training through the Pallas kernels against the XLA path (logic).

The launcher is experiments/check_pallas_training.py (its docstring says
what is compared and how); this module is flag-free so tests import it.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_models
from qft_jax._src import data as data_lib
from qft_jax._src import methods
from qft_jax._src import train


def byte_batches(path: str, n: int, batch: int, seq_len: int, seed: int = 0):
  """`n` Batches of random windows of the file's bytes (ids 0..255)."""
  text = pathlib.Path(path)
  if not text.is_file():
    raise FileNotFoundError(f"training text {path} not found (--text)")
  ids = np.frombuffer(text.read_bytes(), np.uint8).astype(np.int32)
  if ids.size <= seq_len + 1:
    raise ValueError(f"{path} has {ids.size} bytes, fewer than one window "
                     f"of {seq_len + 1}")
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    starts = rng.integers(0, ids.size - seq_len - 1, batch)
    rows = np.stack([ids[s:s + seq_len + 1] for s in starts])
    out.append(data_lib.Batch(rows[:, :-1], rows[:, 1:],
                              np.ones((batch, seq_len), np.float32)))
  return out


def train_curve(config, implementation: str, batches, lr: float,
                loss_chunk: int) -> tuple[list[float], list[float]]:
  """Losses and step times of one run from bench_train's "qlora" params."""
  config = dataclasses.replace(config, matmul_implementation=implementation,
                               lora_alpha=32.0)
  opts = dict(bench_models.ROWS["qlora"][4])
  params = bench_models.build_params(config, "qlora", opts,
                                     jax.random.PRNGKey(0))
  method = methods.make_method(
      methods.MethodConfig(name="qlora", bits=4, group_size=64), params)
  tx = methods.make_optimizer("adamw", lr)
  step = train.make_train_step(
      None, method, tx, loss_fn=train.chunked_lm_loss(config, loss_chunk))
  state = train.init_state(params, method, tx)
  del params
  losses, times = [], []
  for batch in batches:
    t = time.time()
    state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    losses.append(float(metrics["loss"]))
    times.append(time.time() - t)
  return losses, times


def compare(xla: list[float], pallas: list[float], tol: float) -> dict:
  """Per-step relative differences and the verdict."""
  rel = [abs(p - x) / abs(x) for x, p in zip(xla, pallas)]
  finite = all(math.isfinite(v) for v in xla + pallas)
  return {"rel_diff": rel, "max_rel_diff": max(rel),
          "finite": finite, "match": finite and max(rel) <= tol}


def run(tiny: bool, steps: int, layers: int, batch: int, seq_len: int,
        lr: float, tol: float, text: str) -> dict:
  """Both runs and their comparison, as the launcher's JSON record.

  `tiny`: bench_models' tiny shape in bf16, batch 2 x 32 tokens (overriding
  `batch` and `seq_len`), the kernels in the Pallas interpreter.
  """
  config = bench_models.model_config("7b", tiny)
  if tiny:  # bf16 like the GPU run: the kernels take bf16/f16 activations
    batch, seq_len = 2, 32
    config = dataclasses.replace(config, dtype=jnp.bfloat16,
                                 param_dtype=jnp.bfloat16)
  config = dataclasses.replace(config, num_layers=layers)
  batches = byte_batches(text, steps, batch, seq_len)
  chunk = seq_len if tiny else bench_models.LOSS_CHUNK
  pallas = "pallas_interpret" if tiny else "pallas"
  curves, times = {}, {}
  for impl in ("xla", pallas):
    curves[impl], times[impl] = train_curve(config, impl, batches, lr, chunk)
  result = compare(curves["xla"], curves[pallas], tol)
  return {
      "what": "QLoRA NF4 g64 r16 training, XLA vs Pallas matmuls",
      "model": ("tiny" if tiny else "llama-7b shape") + f", {layers} layers",
      "batch": batch, "seq_len": seq_len, "steps": steps,
      "learning_rate": lr, "tol": tol, "text": text,
      "loss_xla": curves["xla"], "loss_pallas": curves[pallas],
      "pallas_implementation": pallas,
      # The first step compiles; the median of the others is the step time.
      "step_s_xla": statistics.median(times["xla"][1:] or times["xla"]),
      "step_s_pallas": statistics.median(times[pallas][1:] or times[pallas]),
      **result,
      "gpu": jax.devices()[0].device_kind, "jax": jax.__version__,
      "commit": os.environ.get("COMMIT", "unknown"),
      "date": datetime.date.today().isoformat(),
  }
