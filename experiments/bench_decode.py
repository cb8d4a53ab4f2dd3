r"""One decode step of a LLaMA-7B-shaped model: what the kernels buy a user.

  COMMIT=<hash> python3 experiments/bench_decode.py --out $OUT   # H100
  python3 experiments/bench_decode.py --tiny --out /tmp           # CPU check

bench_kernels.py times single matmuls; this times what generation runs per
token: `generate.decode_step` of the whole model (32 layers, batch 1, one
token against a KV cache of `--context` positions), for the model's weights
in bf16, uniform 4-bit (group 128, bf16 scales, zero points) and QLoRA's
NF4 (group 64, double-quantized scales, LoRA r16 on all seven projections,
unmerged), each quantized model with `qdot`'s default (the Pallas kernels
at M <= 16 on the GPU) and forced through XLA's dequantize-then-matmul.
Random weights built on the device (bench_models.build_params). Reported
per step: CUPTI kernel time summed (bench_kernels.Timer, median of 7) and
wall-clock time of a jitted step in a Python loop (median of 20, dispatch
included); the costliest kernels by name (CUPTI, per step), which shows
whatever the step spends beyond streaming the weights; the logits of each
default run against its XLA run (relative error) so a fast wrong path
shows. Writes $OUT/decode_<gpu>_<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (bench_models method, options, matmul implementation)
VARIANTS = {
    "bf16": ("full", {}, None),
    "int4": ("peqa", dict(bits=4, group_size=128), None),
    "int4_xla": ("peqa", dict(bits=4, group_size=128), "xla"),
    "qlora_nf4": ("qlora", dict(group_size=64), None),
    "qlora_nf4_xla": ("qlora", dict(group_size=64), "xla"),
}


def top_kernels(compiled, args, count: int = 15) -> list | None:
  """The step's `count` costliest kernel names with their summed
  microseconds per step (CUPTI; None where it is unavailable): where the
  step's time goes beyond the weight-streaming matmuls."""
  from experiments import decode_breakdown  # pylint: disable=g-import-not-at-top
  try:
    per_name = decode_breakdown.per_kernel_us(compiled, args, calls=1)
  except RuntimeError as e:  # no CUPTI (CPU)
    print("per-kernel times unavailable:", e)
    return None
  return sorted(per_name.items(), key=lambda kv: -kv[1])[:count]


def time_variant(name: str, config, context: int, timer) -> tuple[dict, object]:
  """Builds the variant's weights, times one decode step; (row, logits)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments import bench_models  # pylint: disable=g-import-not-at-top
  from qft_jax._src.models import generate  # pylint: disable=g-import-not-at-top
  method, opts, impl = VARIANTS[name]
  cfg = dataclasses.replace(config, matmul_implementation=impl)
  params = bench_models.build_params(cfg, method, opts, jax.random.PRNGKey(0))
  cache = generate.init_cache(cfg, 1, context + 1)
  token = jnp.ones((1, 1), jnp.int32)
  step = jax.jit(lambda p, t, c: generate.decode_step(p, cfg, t, c, context))
  compiled = step.lower(params, token, cache).compile()
  logits, _ = compiled(params, token, cache)
  kernel_ms = timer(compiled, (params, token, cache), 1)
  walls = []
  for _ in range(20):
    t = time.perf_counter()
    jax.block_until_ready(compiled(params, token, cache))
    walls.append((time.perf_counter() - t) * 1e3)
  weight_bytes = sum(x.size * x.dtype.itemsize
                     for x in jax.tree.leaves(params["layers"]))
  row = dict(variant=name, method=method, matmul_implementation=impl,
             kernel_ms=kernel_ms, wall_ms=statistics.median(walls),
             layer_weight_bytes=int(weight_bytes),
             finite=bool(jnp.isfinite(logits).all()),
             top_kernels_us=top_kernels(compiled, (params, token, cache)))
  del params, cache
  return row, logits.astype(jnp.float32)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
  ap.add_argument("--context", type=int, default=512,
                  help="KV-cache positions before the timed token")
  ap.add_argument("--tiny", action="store_true",
                  help="the tiny CPU model (plumbing check)")
  args = ap.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments import bench_kernels  # pylint: disable=g-import-not-at-top
  from experiments import bench_models  # pylint: disable=g-import-not-at-top
  config = bench_models.model_config("7b", args.tiny)
  config = dataclasses.replace(config, remat="none")
  timer = bench_kernels.Timer()
  rows, logits = [], {}
  for name in VARIANTS:
    row, logits[name] = time_variant(name, config, args.context, timer)
    base = name.removesuffix("_xla")
    if name.endswith("_xla") and base in logits:
      ref = logits[name]
      row_default = next(r for r in rows if r["variant"] == base)
      row_default["logits_rel_err_vs_xla"] = float(
          jnp.linalg.norm(logits[base] - ref) / jnp.linalg.norm(ref))
    rows.append(row)
    print(row, flush=True)
  bf16 = rows[0]["kernel_ms"]
  for r in rows:
    r["speedup_vs_bf16"] = bf16 / r["kernel_ms"]
  gpu = jax.devices()[0].device_kind
  date = datetime.date.today().isoformat()
  tag = "cpu" if args.tiny else "h100"
  path = pathlib.Path(args.out) / f"decode_{tag}_{date}.json"
  path.write_text(json.dumps(dict(
      gpu=gpu, jax=jax.__version__, commit=os.environ.get("COMMIT", "unknown"),
      date=date, model="llama-7b shape" if not args.tiny else "tiny",
      batch=1, context=args.context, timing=timer.method, rows=rows),
      indent=1))
  print("wrote", path)


if __name__ == "__main__":
  main()
