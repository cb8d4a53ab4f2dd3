r"""QLoRA 4-bit training through the Pallas kernels against the XLA path.

  python experiments/check_pallas_training.py --out=$OUT             # GPU
  python experiments/check_pallas_training.py --tiny --out=/tmp/chk  # CPU

Builds one model of the LLaMA-7B shape (random weights; `--layers` decoder
layers; NF4 group-64 base with double-quantized scales and LoRA r16 on all
seven projections, as bench_models.py's "qlora" row) and trains its LoRA
factors twice from the same start on the same batches of TinyShakespeare
bytes (token id = byte): once with every quantized matmul, forward and
input gradient, through XLA's dequantize-then-matmul
(`matmul_implementation="xla"`), once through the Pallas kernels ("pallas",
which raises if any layer's kernel refuses; `--tiny` runs them in the Pallas
interpreter on any backend). Writes `pallas_training_<gpu>_<date>.json`:
both loss curves, the per-step relative difference
`|loss_pallas - loss_xla| / loss_xla`, the median step times, and
`match` = every relative difference <= `--tol`.

Every step of both runs sees the same batch, so the curves differ only by
the kernels' rounding (the Pallas path applies group scales in float32 and
rounds once; XLA rounds the dequantized bf16 weight first), which the
optimizer then carries forward.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_OUT = flags.DEFINE_string("out", "/tmp/check_pallas_training",
                           "Output folder.")
_TEXT = flags.DEFINE_string(
    "text", str(REPO.parent / "shared" / "data" / "text"
                / "tinyshakespeare_input.txt"), "Training text (bytes).")
_STEPS = flags.DEFINE_integer("steps", 50, "Training steps per run.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder layers (7B shape).")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "AdamW learning rate.")
_TOL = flags.DEFINE_float("tol", 1e-2, "Largest relative loss difference.")
_TINY = flags.DEFINE_bool(
    "tiny", False, "Tiny shapes and the Pallas interpreter (CPU check).")


def byte_batches(path: str, n: int, batch: int, seq_len: int, seed: int = 0):
  """`n` Batches of random windows of the file's bytes (ids 0..255)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from qft_jax._src import data as data_lib  # pylint: disable=g-import-not-at-top
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
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments import bench_models  # pylint: disable=g-import-not-at-top
  from qft_jax._src import methods  # pylint: disable=g-import-not-at-top
  from qft_jax._src import train  # pylint: disable=g-import-not-at-top
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
  import math  # pylint: disable=g-import-not-at-top
  rel = [abs(p - x) / abs(x) for x, p in zip(xla, pallas)]
  finite = all(math.isfinite(v) for v in xla + pallas)
  return {"rel_diff": rel, "max_rel_diff": max(rel),
          "finite": finite, "match": finite and max(rel) <= tol}


def run(tiny: bool, steps: int, layers: int, batch: int, seq_len: int,
        lr: float, tol: float, text: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments import bench_models  # pylint: disable=g-import-not-at-top
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  record = run(_TINY.value, _STEPS.value, _LAYERS.value, _BATCH.value,
               _SEQ.value, _LR.value, _TOL.value, _TEXT.value)
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  gpu = record["gpu"].split()[1].lower() if " " in record["gpu"] else (
      record["gpu"].lower())
  path = out / f"pallas_training_{gpu}_{record['date']}.json"
  path.write_text(json.dumps(record, indent=1) + "\n")
  print(json.dumps({k: record[k] for k in (
      "max_rel_diff", "match", "step_s_xla", "step_s_pallas")}))
  print(f"wrote {path}")
  if not record["match"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
