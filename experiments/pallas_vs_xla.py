"""4-bit LoRA training through the Pallas kernels against the XLA path
(logic).

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
from typing import Callable

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


def one_ulp_perturbation(tree, key, dtype):
  """Every float leaf moved by one ulp of `dtype` up or down, at random.

  `dtype` is the compute dtype (bf16 here; the LoRA factors are stored in
  float32, whose own ulp vanishes in the cast). One compute ulp is the size
  of a single rounding decision of the matmuls: the training curve from the
  perturbed start shows how far such noise alone carries the loss (the
  noise floor of the comparison).
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))

  def bump(x, k):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    up = jax.random.bernoulli(k, 0.5, x.shape)
    xc = x.astype(dtype)
    to = jnp.where(up, jnp.inf, -jnp.inf).astype(dtype)
    ulp = jnp.nextafter(xc, to).astype(jnp.float32) - xc.astype(jnp.float32)
    return (x.astype(jnp.float32) + ulp).astype(x.dtype)

  return jax.tree.unflatten(treedef,
                            [bump(x, k) for x, k in zip(leaves, keys)])


def global_rel_err(got, want) -> float:
  """`||got - want|| / ||want||` over every leaf, in float32."""
  sq = lambda t: sum(float(jnp.sum(jnp.square(x.astype(jnp.float32))))
                     for x in jax.tree.leaves(t))
  diff = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b, got, want)
  return math.sqrt(sq(diff) / max(sq(want), 1e-30))


# quant -> (bench_models' param builder, the method's config): QLoRA's NF4
# g64 base with double-quantized scales, or a uniform 4-bit g64 base
# (ModuLoRA's; the Mosaic GPU kernels' format on Hopper).
QUANTS = {
    "nf4": ("qlora", methods.MethodConfig(name="qlora", bits=4,
                                          group_size=64)),
    "int4": ("modulora", methods.MethodConfig(name="modulora", bits=4,
                                              group_size=64)),
}


def _start(config, implementation: str, perturb: bool, quant: str):
  """A run's starting point: bench_models' params for `quant` (a QUANTS
  key), its method and trainable view; `perturb` starts from
  `one_ulp_perturbation` of the trainable view (in the compute dtype)."""
  config = dataclasses.replace(config, matmul_implementation=implementation,
                               lora_alpha=32.0)
  builder, method_cfg = QUANTS[quant]
  opts = dict(bench_models.ROWS["qlora"][4])
  params = bench_models.build_params(config, builder, opts,
                                     jax.random.PRNGKey(0))
  method = methods.make_method(method_cfg, params)
  trainable, rebuild = method.view(params)
  if perturb:
    params = rebuild(one_ulp_perturbation(trainable, jax.random.PRNGKey(1),
                                            config.dtype))
    trainable, rebuild = method.view(params)
  return config, params, method, trainable, rebuild


def first_gradient(config, implementation: str, batches, loss_chunk: int,
                   perturb: bool = False, quant: str = "nf4"):
  """The first batch's gradient (float32) of a run's trainable view at its
  starting point."""
  config, _, _, trainable, rebuild = _start(config, implementation, perturb,
                                            quant)
  return _gradient(config, trainable, rebuild, batches[0], loss_chunk)


def _gradient(config, trainable, rebuild, batch, loss_chunk: int):
  loss_fn = train.chunked_lm_loss(config, loss_chunk)
  first = jax.tree.map(jnp.asarray, batch)

  def mean_loss(t):
    nll, n = loss_fn(rebuild(t), first.tokens, first.targets, first.loss_mask)
    return nll / n

  return jax.tree.map(lambda g: g.astype(jnp.float32),
                      jax.jit(jax.grad(mean_loss))(trainable))


def train_curve(config, implementation: str, batches, lr: float,
                loss_chunk: int, perturb: bool = False, quant: str = "nf4"):
  """One run (`_start`'s starting point, AdamW on the trainable view).

  Returns the per-step losses, step times and `first_gradient`.
  """
  config, params, method, trainable, rebuild = _start(
      config, implementation, perturb, quant)
  grads = _gradient(config, trainable, rebuild, batches[0], loss_chunk)
  loss_fn = train.chunked_lm_loss(config, loss_chunk)
  tx = methods.make_optimizer("adamw", lr)
  step = train.make_train_step(None, method, tx, loss_fn=loss_fn)
  state = train.init_state(params, method, tx)
  del params, trainable
  losses, times = [], []
  for batch in batches:
    t = time.time()
    state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    losses.append(float(metrics["loss"]))
    times.append(time.time() - t)
  return losses, times, grads


def kernel_routes(config, tokens: int, quant: str) -> dict:
  """`"NxK": {"fwd": reason, "dx": reason}` for the seven projections:
  whether `qmatmul.fwd` / `dx` take the Mosaic GPU kernels at `tokens`
  rows ("ok") or, if not, why (then the Triton kernels run)."""
  from pallas_kernels import qmatmul as kernels  # pylint: disable=g-import-not-at-top
  from qft_jax._src import memory  # pylint: disable=g-import-not-at-top
  from qft_jax._src import qarray as qa  # pylint: disable=g-import-not-at-top
  qcfg = (qa.QuantConfig(bits=4, group_size=64, codebook="nf4")
          if quant == "nf4" else qa.QuantConfig(bits=4, group_size=64,
                                                scale_dtype=jnp.bfloat16))
  routes = {}
  for n, k in sorted(set(memory.linear_shapes(config))):
    w = qa.random_qarray(jax.random.PRNGKey(0), (n, k), qcfg, config.dtype)
    x = jnp.zeros((tokens, k), config.dtype)
    dy = jnp.zeros((tokens, n), config.dtype)
    routes[f"{n}x{k}"] = {"fwd": kernels.can_use_mosaic(x, w)[1],
                          "dx": kernels.can_use_mosaic_dx(dy, w)[1]}
  return routes


def compare(xla: list[float], other: list[float]) -> dict:
  """Per-step relative differences of `other`'s losses from XLA's.

  `mean_signed_rel_diff` = mean over steps of `(other - xla) / |xla|`: near
  zero when the curves cross at random, negative when `other` sits below.
  """
  signed = [(p - x) / abs(x) for x, p in zip(xla, other)]
  rel = [abs(v) for v in signed]
  finite = all(math.isfinite(v) for v in xla + other)
  return {"rel_diff": rel, "max_rel_diff": max(rel),
          "median_rel_diff": statistics.median(rel),
          "mean_signed_rel_diff": statistics.fmean(signed), "finite": finite}


NOISE_FACTOR = 2.0


def verdict(pallas: dict, noise: dict, grad_rel_err: float, tol: float,
            grad_tol: float) -> dict:
  """Whether the Pallas curve matches XLA's within bf16 noise.

  It does when every loss is finite, the first gradients agree
  (`grad_rel_err <= grad_tol`) and no step's loss differs from XLA's by more
  than `max(tol, NOISE_FACTOR * noise["max_rel_diff"])`: the bound widens
  only as far as a one-ulp perturbation of the starting point (the noise
  run) carries the XLA curve itself.
  """
  bound = max(tol, NOISE_FACTOR * noise["max_rel_diff"])
  ok = (pallas["finite"] and noise["finite"]
        and math.isfinite(grad_rel_err) and grad_rel_err <= grad_tol
        and pallas["max_rel_diff"] <= bound)
  return {"bound": bound, "match": bool(ok)}


def run(tiny: bool, steps: int, layers: int, batch: int, seq_len: int,
        lr: float, tol: float, text: str, grad_tol: float = 1e-2,
        on_run: Callable[[dict], None] | None = None,
        quant: str = "nf4", done: dict | None = None) -> dict:
  """The four runs and their comparison, as the launcher's JSON record.

  `on_run`, if given, receives after each run what is finished so far,
  `{"setup": ..., "loss": {name: losses}, "step_s": {name: median step
  seconds}, "grad_errs": the first-gradient comparisons made so far}`, so
  a caller can save it before a time limit; passing it back as `done`
  skips those runs (a finished run's first gradient is recomputed only
  where a comparison still needs it: one compiled gradient). A `done` from
  another setup (shapes, steps, quant, ...) raises ValueError.

  Runs: "xla", the Pallas path, "xla_noise" (XLA from the one-ulp
  perturbed start, the noise floor) and the Pallas path from that start
  ("<pallas>_noise"). The last pair repeats the first from another start:
  if Pallas sits on the same side of XLA in both pairs
  (`mean_signed_rel_diff`, `noise_pair_mean_signed_rel_diff`), the offset
  is the kernels' rounding, not chance. The verdict uses the first three.

  `tiny`: bench_models' tiny shape in bf16, batch 2 x 32 tokens (overriding
  `batch` and `seq_len`), the kernels in the Pallas interpreter. `quant`:
  the frozen base's format (QUANTS).
  """
  if quant not in QUANTS:
    raise ValueError(f"quant {quant!r} is not one of {sorted(QUANTS)}")
  config = bench_models.model_config("7b", tiny)
  if tiny:  # bf16 like the GPU run: the kernels take bf16/f16 activations
    batch, seq_len = 2, 32
    config = dataclasses.replace(config, dtype=jnp.bfloat16,
                                 param_dtype=jnp.bfloat16)
  config = dataclasses.replace(config, num_layers=layers)
  batches = byte_batches(text, steps, batch, seq_len)
  chunk = seq_len if tiny else bench_models.LOSS_CHUNK
  pallas = "pallas_interpret" if tiny else "pallas"
  setup = dict(tiny=tiny, steps=steps, layers=layers, batch=batch,
               seq_len=seq_len, lr=lr, text=text, quant=quant)
  done = done or {"setup": setup, "loss": {}, "step_s": {}}
  if done.get("setup") != setup or not {"loss", "step_s"} <= set(done):
    raise ValueError(f"the finished runs given were made with "
                     f"{done.get('setup')}, not this check's {setup} (or "
                     "lack their losses and step times)")
  curves, step_s = dict(done["loss"]), dict(done["step_s"])
  # First-gradient comparisons: name -> (run, reference run).
  pairs = {"grad_rel_err": (pallas, "xla"),
           "grad_rel_err_noise": ("xla_noise", "xla")}
  grad_errs = dict(done.get("grad_errs", {}))
  grads = {}

  def compare_grads():
    for key, (a, b) in pairs.items():
      if key not in grad_errs and a in grads and b in grads:
        grad_errs[key] = global_rel_err(grads[a], grads[b])

  for name, impl, perturb in (("xla", "xla", False), (pallas, pallas, False),
                              ("xla_noise", "xla", True),
                              (pallas + "_noise", pallas, True)):
    if name in curves:
      if any(name in pair and key not in grad_errs
             for key, pair in pairs.items()):
        grads[name] = first_gradient(config, impl, batches, chunk,
                                     perturb=perturb, quant=quant)
        compare_grads()
      print(f"{name}: finished before, loss {curves[name][0]:.4f} -> "
            f"{curves[name][-1]:.4f}", flush=True)
      continue
    t0 = time.time()
    curves[name], times, grads[name] = train_curve(
        config, impl, batches, lr, chunk, perturb=perturb, quant=quant)
    compare_grads()
    # The first step compiles; the median of the others is the step time.
    step_s[name] = statistics.median(times[1:] or times)
    print(f"{name}: {steps} steps in {time.time() - t0:.1f} s (with "
          f"compilation), loss {curves[name][0]:.4f} -> "
          f"{curves[name][-1]:.4f}", flush=True)
    if on_run is not None:
      on_run({"setup": setup, "loss": dict(curves), "step_s": dict(step_s),
              "grad_errs": dict(grad_errs)})
  result = compare(curves["xla"], curves[pallas])
  noise = compare(curves["xla"], curves["xla_noise"])
  noise_pair = compare(curves["xla_noise"], curves[pallas + "_noise"])
  grad_rel_err = grad_errs["grad_rel_err"]
  return {
      "what": (f"LoRA r16 over a 4-bit g64 base ({quant}) training, XLA vs "
               "Pallas matmuls"),
      "quant": quant,
      "mosaic_routes": kernel_routes(config, batch * seq_len, quant),
      "model": ("tiny" if tiny else "llama-7b shape") + f", {layers} layers",
      "batch": batch, "seq_len": seq_len, "steps": steps,
      "learning_rate": lr, "tol": tol, "grad_tol": grad_tol,
      "noise_factor": NOISE_FACTOR, "text": text,
      "loss_xla": curves["xla"], "loss_pallas": curves[pallas],
      "loss_xla_noise": curves["xla_noise"],
      "loss_pallas_noise": curves[pallas + "_noise"],
      "pallas_implementation": pallas,
      "step_s_xla": step_s["xla"], "step_s_pallas": step_s[pallas],
      **result,
      "noise_rel_diff": noise["rel_diff"],
      "noise_max_rel_diff": noise["max_rel_diff"],
      "noise_median_rel_diff": noise["median_rel_diff"],
      "noise_mean_signed_rel_diff": noise["mean_signed_rel_diff"],
      "noise_pair_max_rel_diff": noise_pair["max_rel_diff"],
      "noise_pair_mean_signed_rel_diff": noise_pair["mean_signed_rel_diff"],
      **grad_errs,
      **verdict(result, noise, grad_rel_err, tol, grad_tol),
      "gpu": jax.devices()[0].device_kind, "jax": jax.__version__,
      "commit": os.environ.get("COMMIT", "unknown"),
      "date": datetime.date.today().isoformat(),
  }
