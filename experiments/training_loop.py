"""The fine-tuning run behind experiments/finetune.py (config -> summary).

Kept apart from the absl entry point so tests and other launchers (the
reproduction suite, the notebook) can call `run(config)` directly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from qft_jax._src import checkpoint as ckpt_lib
from qft_jax._src import data as data_lib
from qft_jax._src import memory
from qft_jax._src import methods
from qft_jax._src import sharding
from qft_jax._src import train
from qft_jax._src.models import llama
from qft_jax._src.models import loading
from qft_jax._src.optim import hift as hift_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteLossError(RuntimeError):
  """Training stopped on a NaN/inf loss (config.on_nonfinite == "stop")."""


def method_config(c: ml_collections.ConfigDict) -> methods.MethodConfig:
  m = c.method.to_dict()
  m["lora_targets"] = tuple(m["lora_targets"])
  return methods.MethodConfig(**m)


def peak_bytes() -> int:
  """Peak device bytes in use (GPU), or the process's peak RSS on CPU."""
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def device_memory_limit() -> int | None:
  """The first device's allocator limit (`bytes_limit`), None if unknown.

  CPU devices report no memory stats, so runs there are never refused.
  """
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return None


def memory_plan(c: ml_collections.ConfigDict, mcfg: methods.MethodConfig,
                config: llama.LlamaConfig) -> memory.Plan:
  """`memory.plan` of one training step of this run's config.

  Activations are those of one micro-batch (`batch_size / accum_steps`
  rows) under the model's `remat`; float weights, LoRA factors and
  activations are `c.dtype`. NF4 bases (qlora, modulora with nf4) store
  8-bit double-quantized block scales and no zero points; the other
  quantized bases float32 scales and uint8 zero points. HiFT
  differentiates one group of `hift.group_size` units per step, which is
  the plan's streamed gradient term.
  """
  name = mcfg.name
  float_bytes = jnp.dtype(DTYPES[c.dtype]).itemsize
  nf4 = name == "qlora" or (name == "modulora" and mcfg.quantizer == "nf4")
  try:  # training attention: causal, no padding mask, no cache
    fused = llama.uses_cudnn_attention(config, None, None, config.dtype)
  except ValueError:  # attention="cudnn" where it cannot apply
    fused = False
  return memory.plan(
      config, name, batch=max(c.batch_size // max(c.accum_steps, 1), 1),
      seq_len=c.data.seq_len, bits=4 if nf4 else mcfg.bits,
      group_size=mcfg.group_size, lora_rank=mcfg.lora_rank,
      optimizer=c.optimizer, weight_bytes=float_bytes,
      scale_bytes=1 + 5 / 256 if nf4 else 4, zero_point=not nf4,
      streamed=bool(c.get("streamed", False)) or name == "hift",
      hift_layers=c.hift.group_size if name == "hift" else None,
      outlier_fraction=mcfg.outlier_fraction, act_bytes=float_bytes,
      remat=config.remat, fused_attention=fused)


def describe_plan(p: memory.Plan) -> str:
  """`total X GiB = weights a + trainable b + ... GiB` (one line)."""
  parts = " + ".join(f"{k} {v / memory.GIB:.3f}"
                     for k, v in dataclasses.asdict(p).items())
  return f"total {p.total / memory.GIB:.3f} GiB = {parts} GiB"


def check_memory(c: ml_collections.ConfigDict, mcfg: methods.MethodConfig,
                 config: llama.LlamaConfig, num_devices: int, *,
                 log=print) -> memory.Plan:
  """Prints the run's memory plan; raises ValueError when it cannot fit.

  The limit is the first device's `bytes_limit` times the mesh's device
  count (the step's arrays are spread over the mesh). Without a known limit
  (CPU) it only prints; `c.memory_check = False` turns the refusal into a
  warning.
  """
  p = memory_plan(c, mcfg, config)
  group = "per-channel" if mcfg.group_size == -1 else f"g{mcfg.group_size}"
  if mcfg.name == "qlora" or (mcfg.name == "modulora"
                              and mcfg.quantizer == "nf4"):
    base = f" nf4 {group}"
  elif mcfg.name == "qft":
    base = " int8"
  elif mcfg.name in ("full", "lora", "hift"):
    base = ""
  else:
    base = f" {mcfg.bits}-bit {group}"
  what = (mcfg.name + base
          + (f" r{mcfg.lora_rank}" if mcfg.name in methods.LORA_METHODS
             else "")
          + f", {c.optimizer}, batch {c.batch_size} x {c.data.seq_len}"
          + (f" (accum {c.accum_steps})" if c.accum_steps > 1 else "")
          + f", remat {config.remat}, {c.dtype}")
  limit = device_memory_limit()
  available = None if limit is None else limit * max(num_devices, 1)
  if available is None:
    where = f"device limit unknown ({jax.default_backend()}): not checked"
  else:
    where = (f"device limit {available / memory.GIB:.2f} GiB"
             + (f" over {num_devices} devices" if num_devices > 1 else ""))
  log(f"memory plan ({what}): {describe_plan(p)}; {where}")
  try:
    memory.check_fits(p, available)
  except ValueError as e:
    if c.get("memory_check", True):
      raise ValueError(f"refusing to start: {e} (set config.memory_check="
                       "False to start anyway)") from None
    log(f"WARNING: {e}; starting anyway (memory_check=False)")
  return p


class MetricsWriter:
  """metrics.jsonl plus TensorBoard scalars under `workdir`."""

  def __init__(self, workdir: str):
    self.dir = pathlib.Path(workdir)
    self.dir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(self.dir / "tb"))
    except ImportError:
      self._tb = None

  def write(self, step: int, scalars: dict) -> None:
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def build_data(c, tokenizer):
  """(train dataset, eval dataset) from the config's data section.

  Optional data fields: `sampler` ("numpy"/"python", how `limit` examples
  are drawn), `sample_seed` (seed of that draw; -1: the run's seed),
  `holdout` (evaluate on the last `holdout` records of the train file) and
  `add_bos`.
  """
  seq = c.data.seq_len
  limit = c.data.limit or None
  sample_seed = c.data.get("sample_seed", -1)
  opts = dict(sampler=c.data.get("sampler", "numpy"),
              add_bos=c.data.get("add_bos", True))
  holdout = c.data.get("holdout", 0)
  train_ds = data_lib.build_dataset(
      c.data.kind, c.data.train, tokenizer, seq, split="train", limit=limit,
      seed=c.seed if sample_seed < 0 else sample_seed, holdout=holdout,
      **opts)
  if c.data.kind == "text" or holdout:
    eval_path, split = (c.data.eval or c.data.train), "eval"
  else:
    if not c.data.eval:
      raise ValueError(f"data.eval is required for {c.data.kind!r} data")
    eval_path, split = c.data.eval, "train"
  eval_ds = data_lib.build_dataset(c.data.kind, eval_path, tokenizer, seq,
                                   split=split,
                                   limit=c.data.eval_limit or None,
                                   seed=c.seed + 1, holdout=holdout, **opts)
  return train_ds, eval_ds


def calibration_tokens(c, tokenizer) -> np.ndarray:
  from qft_jax._src.quantizers import calibration as cal  # pylint: disable=g-import-not-at-top
  return cal.text_segments(tokenizer, c.data.calib, c.method.calib_segments,
                           c.method.calib_seq_len, seed=c.seed)


@dataclasses.dataclass
class Trainer:
  """A step function over `train.TrainState`, for every method."""
  step_fn: Any
  eval_fn: Any
  init: Any

  @staticmethod
  def build(c, mcfg, params, config, mesh) -> "Trainer":
    """Steps and init over `mesh`: `init` places the params by the
    sharding rules; steps take host batches and split them over the mesh."""
    apply_fn = lambda p, tokens: llama.Llama(config).apply({"params": p},
                                                            tokens)
    lr = methods.schedule(c.schedule, c.learning_rate, c.steps,
                          c.warmup_steps)
    make_tx = lambda lr_: methods.make_optimizer(
        c.optimizer, lr_, weight_decay=c.weight_decay)
    eval_jit = train.make_eval_step(apply_fn)
    eval_step = lambda p, b: eval_jit(p, sharding.shard_batch(b, mesh))
    param_sh = sharding.param_shardings(params, mesh)
    if mcfg.name != "hift":
      method = methods.make_method(mcfg, params, weight_decay=c.weight_decay,
                                   learning_rate=lr)
      tx = make_tx(lr)
      init = lambda p: train.init_state(p, method, tx, c.seed)
      shardings = sharding.train_step_shardings(jax.eval_shape(init, params),
                                                mesh)
      build_state = train.jit_init_state(method, tx, c.seed, shardings[0])
      step_jit = train.make_train_step(apply_fn, method, tx,
                                       accum_steps=c.accum_steps,
                                       skip_nonfinite=c.on_nonfinite == "skip",
                                       shardings=shardings)
      return Trainer(
          lambda s, b: step_jit(s, sharding.shard_batch(b, mesh)), eval_step,
          lambda p: build_state(sharding.place(p, param_sh)))
    schedule = hift_lib.HiFTSchedule(
        hift_lib.hift_units(params), group_size=c.hift.group_size,
        order=c.hift.order, seed=c.seed, lr_mode=c.hift.lr_mode)
    hift = hift_lib.HiFT(schedule, make_tx, lr)

    def loss_fn(p, tokens, targets, mask):
      nll, n = train.cross_entropy(apply_fn(p, tokens), targets, mask)
      return nll / jnp.maximum(n, 1.0)

    hift_step = hift.make_step(loss_fn)

    def step(state: train.TrainState, batch: data_lib.Batch):
      batch = sharding.shard_batch(batch, mesh)
      with sharding.compute_mesh(mesh):
        params, opt, loss = hift_step(state.params, state.opt_state,
                                      int(state.step), batch.tokens,
                                      batch.targets, batch.loss_mask)
      finite = bool(jnp.isfinite(loss))
      if not finite and c.on_nonfinite == "skip":
        params, opt = state.params, state.opt_state
      new = train.TrainState(state.step + 1, params, opt, state.rng,
                             state.skipped + int(not finite))
      return new, {"loss": loss, "finite": int(finite),
                   "group": schedule.group(int(state.step))}

    def init(p):
      p = sharding.place(p, param_sh)
      return train.TrainState(
          jnp.zeros((), jnp.int32), p, hift.init(p),
          jax.random.PRNGKey(c.seed), jnp.zeros((), jnp.int32))
    return Trainer(step, eval_step, init)


def evaluate(eval_fn, params, eval_ds, c) -> float:
  nll = count = 0.0
  for i, (batch, _) in enumerate(eval_ds.eval_batches(c.batch_size)):
    if i >= c.eval_batches:
      break
    s, n = eval_fn(params, batch)
    nll, count = nll + float(s), count + float(n)
  return nll / max(count, 1.0)


@dataclasses.dataclass
class Setup:
  """Everything a run (or an export) builds before the first step."""
  mcfg: methods.MethodConfig
  config: llama.LlamaConfig
  tokenizer: Any
  trainer: Trainer
  state: train.TrainState
  plan: memory.Plan | None = None


def setup(c: ml_collections.ConfigDict, *, log=print) -> Setup:
  """Loads the model and builds the method's initial training state.

  First (from the checkpoint's config alone, before any weight is read or
  anything is saved) prints the run's memory plan and refuses to start,
  with a ValueError, when it exceeds the device's memory (`check_memory`).
  """
  mcfg = method_config(c)
  mesh = sharding.make_mesh(c.mesh)
  config = dataclasses.replace(
      loading.load_config(c.model, dtype=DTYPES[c.dtype]), remat=c.remat)
  plan = check_memory(c, mcfg, config, mesh.size, log=log)
  log(f"loading {c.model}")
  config, params = loading.load_model(c.model, dtype=DTYPES[c.dtype])
  config = dataclasses.replace(config, remat=c.remat)
  tokenizer = loading.load_tokenizer(c.model)
  calib = calibration_tokens(c, tokenizer) if mcfg.uses_calibration else None
  params, config = methods.prepare_params(
      mcfg, params, config, jax.random.PRNGKey(c.seed + 7),
      calib_tokens=calib, log=log)
  log(f"method {mcfg.name}: {methods.trainable_count(mcfg, params):,} "
      "trainable parameters")
  log(f"mesh {sharding.mesh_sizes(mesh)} over {mesh.size} "
      f"{jax.default_backend()} device(s)")
  trainer = Trainer.build(c, mcfg, params, config, mesh)
  return Setup(mcfg, config, tokenizer, trainer, trainer.init(params), plan)


def restore(c: ml_collections.ConfigDict, state: train.TrainState, *,
            log=print) -> tuple[train.TrainState, Any]:
  """The newest intact checkpoint of `c.checkpoint_dir` (or `state`)."""
  if not c.checkpoint_dir:
    return state, None
  checkpointer = ckpt_lib.Checkpointer(c.checkpoint_dir,
                                       keep=c.keep_checkpoints)
  restored = checkpointer.restore_latest(sharding.abstract(state))
  if restored is not None:
    step0, state, _ = restored
    log(f"resumed from step {step0} ({checkpointer.directory})")
  return state, checkpointer


def run(c: ml_collections.ConfigDict, *, log=print, task_eval=None
        ) -> tuple[dict, train.TrainState]:
  """Runs one fine-tuning job; returns the summary and the final state.

  `task_eval(params, config, tokenizer) -> dict`, if given, runs after
  training and its result is the summary's "task" entry.
  """
  s = setup(c, log=log)
  mcfg, config, trainer, tokenizer = s.mcfg, s.config, s.trainer, s.tokenizer
  plan = s.plan
  train_ds, eval_ds = build_data(c, tokenizer)
  log(f"data: {train_ds.num_rows} train rows, {eval_ds.num_rows} eval rows "
      f"of {c.data.seq_len} tokens")
  state, checkpointer = restore(c, s.state, log=log)
  del s

  writer = MetricsWriter(c.workdir)
  eval_loss0 = evaluate(trainer.eval_fn, state.params, eval_ds, c)
  history = []
  start = int(state.step)
  bar = tqdm.tqdm(range(start, c.steps), initial=start, total=c.steps,
                  desc=mcfg.name, dynamic_ncols=True, mininterval=1.0)
  t0 = time.time()
  for step in bar:
    batch = train_ds.batch(step, c.batch_size, seed=c.seed)
    state, metrics = trainer.step_fn(state, batch)
    if (step + 1) % c.log_interval == 0 or step + 1 == c.steps:
      scalars = {k: float(v) for k, v in metrics.items()}
      tokens_seen = (step + 1 - start) * batch.tokens.size
      scalars["tok_per_s"] = tokens_seen / max(time.time() - t0, 1e-9)
      writer.write(step + 1, scalars)
      history.append({"step": step + 1, **scalars})
      bar.set_postfix(loss=f"{scalars['loss']:.4f}")
    if c.on_nonfinite == "stop" and not int(metrics["finite"]):
      raise NonFiniteLossError(
          f"non-finite loss at step {step + 1}; the last good checkpoint in "
          f"{c.checkpoint_dir or '(none configured)'} is intact")
    if (step + 1) % c.eval_interval == 0 and step + 1 < c.steps:
      ev = evaluate(trainer.eval_fn, state.params, eval_ds, c)
      writer.write(step + 1, {"eval_loss": ev})
      bar.write(f"step {step + 1}: eval loss {ev:.4f}")
    if checkpointer and ((step + 1) % c.checkpoint_interval == 0
                         or step + 1 == c.steps):
      checkpointer.save(step + 1, state, {"step": step + 1,
                                          "config": c.to_json()})
  eval_loss = evaluate(trainer.eval_fn, state.params, eval_ds, c)
  writer.write(int(state.step), {"eval_loss": eval_loss})
  writer.close()
  if checkpointer:
    checkpointer.close()
  train_losses = [h["loss"] for h in history]
  summary = {
      "method": mcfg.name, "bits": mcfg.bits, "model": c.model,
      "optimizer": c.optimizer, "steps": int(state.step),
      "train_loss": train_losses[-1] if train_losses else math.nan,
      "eval_loss_before": eval_loss0, "eval_loss": eval_loss,
      "skipped_steps": int(state.skipped), "peak_bytes": peak_bytes(),
      "backend": jax.default_backend(),
      "memory_plan": plan.as_dict() if plan is not None else None,
  }
  if task_eval is not None:
    summary["task"] = task_eval(state.params, config, tokenizer)
  return summary, state
