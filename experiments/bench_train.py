r"""Training-step memory and speed at LLaMA-7B / 65B shapes, one row a process.

  python experiments/bench_train.py --out $OUT            # every row
  python experiments/bench_train.py --rows qft,qlora      # some rows
  python experiments/bench_train.py --tiny --out /tmp/b   # CPU smoke test

Each row runs in a fresh process (peak memory is a per-process high-water
mark): it builds the model directly in its method's storage on the device
(random codes and scales, never a float copy of a quantized model), compiles
the step, runs warm-up steps, times steady-state steps (median), and reads
`memory_stats()["peak_bytes_in_use"]`; the memory planner's prediction sits
beside it. Writes `train_<gpu>_<date>.json` with a `rows` list.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments.bench_models import LOSS_CHUNK, ROWS, build_params, model_config  # pylint: disable=g-import-not-at-top

_ROWS = flags.DEFINE_string("rows", "", "Comma-separated row names (all).")
_ROW = flags.DEFINE_string("row", "", "Run one row in this process.")
_OUT = flags.DEFINE_string("out", "/tmp/bench_train", "Output folder.")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny shapes (CPU smoke test).")
_STEPS = flags.DEFINE_integer("steps", 4, "Timed steps per row.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Warm-up steps per row.")


def run_row(name: str, tiny: bool, steps: int, warmup: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from qft_jax._src import data as data_lib  # pylint: disable=g-import-not-at-top
  from qft_jax._src import memory  # pylint: disable=g-import-not-at-top
  from qft_jax._src import methods  # pylint: disable=g-import-not-at-top
  from qft_jax._src import streamed  # pylint: disable=g-import-not-at-top
  from qft_jax._src import train  # pylint: disable=g-import-not-at-top
  from qft_jax._src.models import llama as llama_lib  # pylint: disable=g-import-not-at-top
  from qft_jax._src.optim import masks  # pylint: disable=g-import-not-at-top

  model, method, batch, seq, opts = ROWS[name]
  if tiny:
    batch, seq = 2, 32
  config = model_config(model, tiny)
  if method == "peqa":
    config = dataclasses.replace(config, matmul_trainable="scale")
  if method in ("lora", "qlora", "modulora"):
    config = dataclasses.replace(config, lora_alpha=32.0)
  plan = memory.plan(
      config, method, batch=batch, seq_len=seq, bits=opts.get("bits", 4),
      group_size=opts.get("group_size", 64), optimizer=opts["optimizer"],
      weight_bytes=opts.get("weight_bytes", 2), streamed=opts.get(
          "streamed", False), hift_layers=opts.get("hift_layers"),
      zero_point=method != "qlora", act_bytes=2,
      scale_bytes=1 + 5 / 256 if method == "qlora" else 2,
      loss_chunk=None if tiny else LOSS_CHUNK,
      fused_attention=llama_lib.uses_cudnn_attention(
          config, None, None, config.dtype),
      offload_saved=opts.get("offload_saved", False))
  t0 = time.time()
  params = build_params(config, method, opts, jax.random.PRNGKey(0))
  jax.block_until_ready(params)
  build_s = time.time() - t0
  batches = [jax.tree.map(jnp.asarray, b) for b in
             data_lib.random_batches(config.vocab_size, batch, seq)]
  lr = 1e-5
  tx = methods.make_optimizer(opts["optimizer"], lr)
  if opts.get("streamed"):
    hift_layers = opts.get("hift_layers")
    lora_only = method in ("lora", "qlora", "modulora")
    rest_units = () if hift_layers or lora_only else streamed.REST_UNITS
    rest = {k: v for k, v in params.items() if k in rest_units}
    all_true = lambda t: masks.trainable_mask(t, [(r".*", True)],
                                              allow_unmatched=True)
    if method == "qft":
      layer_method = methods.qft_method("stochastic")
    else:
      layer0 = jax.tree.map(lambda a: a[0], params["layers"])
      rules = [(r"lora_(a|b)$", True)] if lora_only else [(r".*", True)]
      layer_method = methods.masked_method(masks.trainable_mask(
          layer0, rules, allow_unmatched=True))
    spec = streamed.StreamedSpec(layer_method=layer_method,
                                 rest_method=methods.masked_method(
                                     all_true(rest)),
                                 active_rest=rest_units,
                                 hift_layers=hift_layers,
                                 offload_saved=opts.get("offload_saved",
                                                        False))
    active = None if not hift_layers else jnp.asarray([0], jnp.int32)
    opt = streamed.init_opt_states(spec, params, tx, tx,
                                   active_layers=None if not hift_layers
                                   else [0])
    step_fn = streamed.make_streamed_step(config, spec, tx, tx)
    state = (params, opt, jax.random.PRNGKey(0))
    del params

    def one(state, i):
      p, o, r = state
      act = None if active is None else jnp.asarray(
          [i % config.num_layers], jnp.int32)
      p, o, r, m = step_fn(p, o, r, jnp.int32(i), batches[i % 3], act)
      return (p, o, r), m
  else:
    cfg = methods.MethodConfig(name=method, bits=opts.get("bits", 4),
                               group_size=opts.get("group_size", 64))
    method_obj = methods.make_method(cfg, params)
    step_fn = train.make_train_step(
        None, method_obj, tx,
        loss_fn=train.chunked_lm_loss(config, seq if tiny else LOSS_CHUNK))
    state = train.init_state(params, method_obj, tx)
    del params

    def one(state, i):
      return step_fn(state, batches[i % 3])

  t0 = time.time()
  for i in range(warmup):
    state, metrics = one(state, i)
  jax.block_until_ready(metrics)
  compile_s = time.time() - t0
  times = []
  for i in range(warmup, warmup + steps):
    t = time.time()
    state, metrics = one(state, i)
    jax.block_until_ready(metrics)
    times.append(time.time() - t)
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  median = statistics.median(times)
  loss = float(metrics["loss"])
  return {
      "method": name, "model": f"llama-{model}" if not tiny else "tiny",
      "batch": batch, "seq_len": seq, "optimizer": opts["optimizer"],
      "peak_gib": None if peak is None else round(peak / 2**30, 3),
      "tok_per_s": round(batch * seq / median, 1),
      "step_s": round(median, 4), "planned_gib": plan.as_dict()["total_gib"],
      "plan": plan.as_dict(), "loss": loss, "finite": bool(np.isfinite(loss)),
      "build_s": round(build_s, 1), "compile_s": round(compile_s, 1),
      "streamed": bool(opts.get("streamed")),
      "attention": "cudnn" if llama_lib.uses_cudnn_attention(
          config, None, None, config.dtype) else "xla",
      "gpu": jax.devices()[0].device_kind, "jax": jax.__version__,
  }


def main(argv):
  del argv
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  if _ROW.value:
    row = run_row(_ROW.value, _TINY.value, _STEPS.value, _WARMUP.value)
    (out / f"row_{_ROW.value}.json").write_text(json.dumps(row))
    print(json.dumps(row), flush=True)
    return
  import jax  # pylint: disable=g-import-not-at-top
  names = _ROWS.value.split(",") if _ROWS.value else list(ROWS)
  rows = []
  for name in names:
    if name not in ROWS:
      raise app.UsageError(f"unknown row {name!r}; rows: {list(ROWS)}")
    t = time.time()
    cmd = [sys.executable, __file__, f"--row={name}", f"--out={out}",
           f"--steps={_STEPS.value}", f"--warmup={_WARMUP.value}"]
    if _TINY.value:
      cmd.append("--tiny")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ,
                               "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    row_file = out / f"row_{name}.json"
    if proc.returncode == 0 and row_file.exists():
      rows.append(json.loads(row_file.read_text()))
    else:
      err = (proc.stderr or "")[-1500:]
      rows.append({"method": name, "error": err})
    print(f"{name}: {json.dumps(rows[-1])[:400]} ({time.time() - t:.0f} s)",
          flush=True)
  device = jax.devices()[0]
  gpu = device.device_kind.lower().replace(" ", "_")
  date = datetime.date.today().isoformat()
  result = {"gpu": device.device_kind, "jax": jax.__version__,
            "commit": os.environ.get("COMMIT", "unknown"), "date": date,
            "rows": rows}
  name = f"train_{'tiny' if _TINY.value else gpu}_{date}.json"
  (out / name).write_text(json.dumps(result, indent=1))
  print(f"wrote {out / name}")


if __name__ == "__main__":
  app.run(main)
