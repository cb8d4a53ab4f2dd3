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

_ROWS = flags.DEFINE_string("rows", "", "Comma-separated row names (all).")
_ROW = flags.DEFINE_string("row", "", "Run one row in this process.")
_OUT = flags.DEFINE_string("out", "/tmp/bench_train", "Output folder.")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny shapes (CPU smoke test).")
_STEPS = flags.DEFINE_integer("steps", 4, "Timed steps per row.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Warm-up steps per row.")

LOSS_CHUNK = 128  # positions per chunk of the head + cross-entropy
# name -> (model, method, batch, seq, options)
ROWS = {  # in the order they run (most important first)
    "qlora": ("7b", "qlora", 4, 512, dict(optimizer="adamw", bits=4,
                                          group_size=64)),
    # QLoRA through the layer-streamed step: one layer's LoRA gradient and
    # AdamW update at a time, no full LoRA gradient tree.
    "qlora_streamed": ("7b", "qlora", 4, 512, dict(
        optimizer="adamw", bits=4, group_size=64, streamed=True)),
    # ... with the saved residual stream in host memory.
    "qlora_offload": ("7b", "qlora", 4, 512, dict(
        optimizer="adamw", bits=4, group_size=64, streamed=True,
        offload_saved=True)),
    "full_lion_int8": ("7b", "full", 4, 512, dict(optimizer="lion_int8",
                                                  streamed=True)),
    "qft": ("7b", "qft", 4, 512, dict(optimizer="lion_int8", streamed=True)),
    "lora": ("7b", "lora", 4, 512, dict(optimizer="adamw")),
    "modulora3": ("7b", "modulora", 4, 512, dict(optimizer="adamw", bits=3,
                                                 group_size=128)),
    "peqa4": ("7b", "peqa", 4, 512, dict(optimizer="adamw", bits=4,
                                         group_size=128)),
    "hift_adamw_fp32": ("7b", "hift", 4, 512, dict(
        optimizer="adamw", streamed=True, hift_layers=1, weight_bytes=4)),
    "qft_hift": ("7b", "qft", 4, 512, dict(optimizer="lion_int8",
                                           streamed=True, hift_layers=1)),
    "modulora3_65b": ("65b", "modulora", 1, 512, dict(
        optimizer="adamw", bits=3, group_size=128)),
}


def model_config(name: str, tiny: bool):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qft_jax._src.models import llama  # pylint: disable=g-import-not-at-top
  if tiny:
    return llama.LlamaConfig(vocab_size=512, hidden_size=128,
                             intermediate_size=256, num_layers=2, num_heads=4,
                             num_kv_heads=4, head_dim=32, remat="full",
                             dtype=jnp.float32, param_dtype=jnp.float32)
  d, f, layers, heads = ((4096, 11008, 32, 32) if name == "7b"
                         else (8192, 22016, 80, 64))
  return llama.LlamaConfig(vocab_size=32000, hidden_size=d,
                           intermediate_size=f, num_layers=layers,
                           num_heads=heads, num_kv_heads=heads, head_dim=128,
                           remat="full", dtype=jnp.bfloat16,
                           param_dtype=jnp.bfloat16)


def build_params(config, method: str, opts: dict, key):
  """Random params directly in the method's storage, on the device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qft_jax._src import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from qft_jax._src import qarray as qa  # pylint: disable=g-import-not-at-top
  from qft_jax._src.optim import qft  # pylint: disable=g-import-not-at-top
  from qft_jax._src.quantizers import nf4  # pylint: disable=g-import-not-at-top
  from qft_jax._src.memory import linear_shapes  # pylint: disable=g-import-not-at-top
  c, lnum = config, config.num_layers
  trained_rest = method in ("full", "qft", "hift")
  wdt = jnp.float32 if opts.get("weight_bytes") == 4 else c.param_dtype
  rest_dt = jnp.float32 if trained_rest else c.param_dtype
  keys = iter(jax.random.split(key, 32))

  def normal(shape, dt):
    k = next(keys)
    return jax.jit(lambda: (0.02 * jax.random.normal(k, shape, jnp.float32)
                            ).astype(dt))()

  names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj")
  scale_dt = jnp.bfloat16

  def one_layer(shape, k):
    """One layer's kernel; `lax.map` stacks them with per-layer temporaries
    only, so building never raises the process's peak memory."""
    if method in ("full", "lora", "hift"):
      return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(wdt)
    if method == "qft":
      dense_cfg = qa.QuantConfig(bits=8, group_size=-1, symmetric=True)
      n_out = qft.num_outliers(shape, 0.01)
      stride = shape[0] * shape[1] // n_out
      k1, k2, k3 = jax.random.split(k, 3)
      dense = qa.random_qarray(k1, shape, dense_cfg, c.dtype)
      idx = (jnp.arange(n_out, dtype=jnp.int32) * stride
             + jax.random.randint(k2, (n_out,), 0, stride, jnp.int32))
      val = 0.05 * jax.random.normal(k3, (n_out,), jnp.float32)
      return qft.QFTWeight(dense, idx, val)
    if method == "qlora":  # NF4 with double-quantized scales (QLoRA)
      cfg = qa.QuantConfig(bits=4, group_size=opts["group_size"],
                           codebook="nf4", scale_dtype=jnp.float32)
      q = qa.random_qarray(k, shape, cfg, c.dtype)
      return dataclasses.replace(q, scale=nf4.double_quantize(q.scale))
    else:
      cfg = qa.QuantConfig(bits=opts["bits"], group_size=opts["group_size"],
                           scale_dtype=scale_dt)
    return qa.random_qarray(k, shape, cfg, c.dtype)

  def kernel(shape):
    layer_keys = jax.random.split(next(keys), lnum)
    return jax.jit(lambda ks: jax.lax.map(lambda k: one_layer(shape, k), ks)
                   )(layer_keys)

  shapes = dict(zip(names, linear_shapes(c)))
  layers = {
      "input_norm": {"scale": jnp.ones((lnum, c.hidden_size), c.param_dtype)},
      "post_attn_norm": {"scale": jnp.ones((lnum, c.hidden_size),
                                           c.param_dtype)},
      "attn": {n: {"kernel": kernel(shapes[n])} for n in names[:4]},
      "mlp": {n: {"kernel": kernel(shapes[n])} for n in names[4:]},
  }
  params = {"embed": {"embedding": normal((c.vocab_size, c.hidden_size),
                                          rest_dt)},
            "layers": layers,
            "final_norm": {"scale": jnp.ones((c.hidden_size,), rest_dt)},
            "lm_head": {"kernel": normal((c.vocab_size, c.hidden_size),
                                         rest_dt)}}
  if method in ("lora", "qlora", "modulora"):
    spec = lora_lib.LoraSpec(rank=16, alpha=32.0, targets=(
        r"attn/(q|k|v|o)_proj$", r"mlp/(gate|up|down)_proj$"))
    params = lora_lib.init_lora(params, spec, next(keys))
  return params


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
