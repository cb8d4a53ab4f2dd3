r"""Runs a grid of (method, task, seed) fine-tuning cells and writes their JSON.

  python experiments/reproduce.py --config=experiments/configs/reproduce.py:cpu
  python experiments/reproduce.py --config=experiments/configs/reproduce.py \
      --config.methods=lora,qft --config.tasks=sst2 --config.seeds=0,1,2
  python experiments/make_tables.py --results_dir=experiments/results/reproduce

Each cell fine-tunes with `experiments/training_loop.run`, evaluates its task
(`qft_jax._src.tasks`) and writes `<results_dir>/<task>/<method>_s<seed>.json`
(summary, task metrics, loss curve, steady tokens/s, peak memory, config,
command, commit). Resumable: a cell whose JSON exists (without "error") is
skipped. By default every cell runs in its own subprocess, so that the peak
memory it reports is its own and a crash does not stop the grid; a failed
cell's JSON carries "error" and is retried by the next invocation.
`--workers=N` runs N such subprocesses at once on the same accelerator (a
135M model leaves most of an H100 idle; each gets 1/N of its memory) and
records `concurrent_cells` = N in their JSON, since their tokens/s then
share the device; a cell that runs out of memory beside the others is
retried once, alone, at the end. `--in_process` runs the cells in this
process instead (tests, notebooks). "zeroshot" is deterministic and runs at
the first seed only.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import traceback

from absl import app
from absl import flags
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import training_loop  # pylint: disable=g-import-not-at-top
from experiments.configs import reproduce as reproduce_configs  # pylint: disable=g-import-not-at-top

CONCURRENT_ENV = "QFT_REPRODUCE_CONCURRENT_CELLS"

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(REPO / "experiments" / "configs" / "reproduce.py"),
    "Reproduction grid config (`path[:variant]`).", lock_config=True)
_CELL = flags.DEFINE_string(
    "cell", "", "Run only this cell, `task/method/seed` (used by the parent "
    "process for its subprocesses).")
_IN_PROCESS = flags.DEFINE_bool(
    "in_process", False, "Run every cell in this process.")
_FORCE = flags.DEFINE_bool(
    "force", False, "Re-run cells whose JSON already exists.")
_WORKERS = flags.DEFINE_integer(
    "workers", 1, "Cells run at once, each in its own subprocess.")
_TIME_BUDGET = flags.DEFINE_float(
    "time_budget_s", 0.0, "Start no new cell after this many seconds (0: no "
    "limit), so a time-limited session ends between cells; run the same "
    "command again to continue.")


def _split(text: str) -> list[str]:
  return [x.strip() for x in text.split(",") if x.strip()]


def cells(c) -> list[tuple[str, str, int]]:
  """The `(task, method, seed)` cells selected by the config, validated."""
  tasks, methods = _split(c.tasks), _split(c.methods)
  for t in tasks:
    if t not in c.tasks_table:
      raise ValueError(f"unknown task {t!r}: choose from "
                       f"{sorted(c.tasks_table.keys())}")
  for m in methods:
    if m not in reproduce_configs.PRESETS:
      raise ValueError(f"unknown method preset {m!r}: choose from "
                       f"{list(reproduce_configs.PRESETS)}")
  seeds = [int(s) for s in _split(c.seeds)]
  return [(t, m, s) for t in tasks for m in methods for s in seeds
          if m != "zeroshot" or s == seeds[0]]


def cell_json(c, task: str, method: str, seed: int) -> pathlib.Path:
  return pathlib.Path(c.results_dir) / task / f"{method}_s{seed}.json"


def _update(cfg, overrides: dict) -> None:
  for key, value in overrides.items():
    if isinstance(value, dict):
      _update(cfg[key], value)
    else:
      cfg[key] = value


def cell_config(c, task: str, method: str, seed: int):
  """The fine-tuning ConfigDict of one cell (base <- task <- preset <- seed)."""
  spec = c.tasks_table[task].to_dict()
  f = copy.deepcopy(c.base)
  f.unlock()
  _update(f, {"data": spec["data"]})
  f.steps = spec["steps"]
  f.remat = spec.get("remat", f.remat)
  if c.max_steps:
    f.steps = min(f.steps, c.max_steps)
  f.eval_interval = spec.get("eval_interval", max(f.steps // 2, 1))
  f.warmup_steps = min(c.warmup_steps, max(f.steps - 1, 0))
  f.method.group_size = c.group_size
  f.data.add_bos = c.add_bos
  _update(f, copy.deepcopy(reproduce_configs.PRESETS[method]))
  f.seed = seed
  f.workdir = str(pathlib.Path(c.work_dir) / task / f"{method}_s{seed}")
  f.checkpoint_dir = ""
  f.lock()
  return f


def task_eval(c, task: str):
  """`(params, model_config, tokenizer) -> metrics` for the task."""
  from qft_jax._src import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  spec = c.tasks_table[task].eval.to_dict()
  fn = getattr(tasks_lib, spec.pop("fn"))
  path = spec.pop("path")
  accepts = inspect.signature(fn).parameters
  if "add_bos" in accepts:
    spec["add_bos"] = c.add_bos
  if c.eval_limit and "limit" in accepts:
    spec["limit"] = c.eval_limit
  spec["batch_size"] = spec.get("batch_size", c.eval_batch_size)

  def evaluate(params, config, tokenizer):
    out = fn(params, config, tokenizer, path, **spec)
    return {k: v for k, v in out.items() if k != "predictions"}

  return evaluate


def _curve(workdir: pathlib.Path) -> dict:
  """Per-log-step series from metrics.jsonl (train rows, then eval rows)."""
  path = workdir / "metrics.jsonl"
  train, evals = {}, {"step": [], "eval_loss": []}
  if not path.exists():
    return {"train": train, "eval": evals}
  for line in path.read_text().splitlines():
    row = json.loads(line)
    if "eval_loss" in row:
      evals["step"].append(row["step"])
      evals["eval_loss"].append(row["eval_loss"])
      continue
    for k, v in row.items():
      train.setdefault(k, []).append(v)
  return {"train": train, "eval": evals}


def steady_tok_per_s(train_curve: dict, tokens_per_step: int) -> float | None:
  """Tokens/s between the first and last logged step (compile excluded).

  The training loop logs a cumulative rate `r_s = tokens(s) / time(s)`;
  `time(s) = (s - s0) * tokens_per_step / r_s` recovers the clock.
  """
  steps, rates = train_curve.get("step", []), train_curve.get("tok_per_s", [])
  if len(steps) < 2:
    return None
  t = [(s * tokens_per_step) / r for s, r in zip(steps, rates)]
  if t[-1] <= t[0]:
    return None
  return (steps[-1] - steps[0]) * tokens_per_step / (t[-1] - t[0])


def _commit() -> str:
  """$COMMIT when set (a copied tree whose git HEAD is stale), else HEAD."""
  if os.environ.get("COMMIT"):
    return os.environ["COMMIT"]
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO,
                          capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _zeroshot(f, evaluate) -> dict:
  """Evaluates the loaded model without training (the "zeroshot" preset)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from qft_jax._src.models import loading  # pylint: disable=g-import-not-at-top
  config, params = loading.load_model(
      f.model, dtype=training_loop.DTYPES[f.dtype])
  config = dataclasses.replace(config, remat=f.remat)
  tokenizer = loading.load_tokenizer(f.model)
  return {"method": "zeroshot", "bits": None, "model": f.model, "steps": 0,
          "peak_bytes": training_loop.peak_bytes(),
          "task": evaluate(params, config, tokenizer)}


def run_cell(c, task: str, method: str, seed: int, *, log=print,
             command: str | None = None) -> dict:
  """Fine-tunes and evaluates one cell; writes and returns its JSON record.

  `command` is recorded as the command that produced it (default: this
  process's `python experiments/reproduce.py ...` command line).
  """
  import jax  # pylint: disable=g-import-not-at-top
  f = cell_config(c, task, method, seed)
  out = cell_json(c, task, method, seed)
  out.parent.mkdir(parents=True, exist_ok=True)
  workdir = pathlib.Path(f.workdir)
  (workdir / "metrics.jsonl").unlink(missing_ok=True)  # no stale rows
  record = {"task": task, "method": method, "seed": seed,
            "command": command or " ".join(
                ["python", "experiments/reproduce.py"] + sys.argv[1:]),
            "commit": _commit(), "device": jax.devices()[0].device_kind,
            "concurrent_cells": int(os.environ.get(CONCURRENT_ENV, "1")),
            "config": json.loads(f.to_json())}
  start = time.time()
  try:
    evaluate = task_eval(c, task)
    if method == "zeroshot":
      summary = _zeroshot(f, evaluate)
    else:
      summary, _ = training_loop.run(f, log=log, task_eval=evaluate)
    record["task_metrics"] = summary.pop("task")
    record["summary"] = summary
    record["curve"] = _curve(workdir)
    record["tok_per_s"] = steady_tok_per_s(
        record["curve"]["train"], f.batch_size * f.data.seq_len)
  except Exception:  # pylint: disable=broad-except
    record["error"] = traceback.format_exc()
  record["seconds"] = round(time.time() - start, 1)
  out.write_text(json.dumps(record, indent=1) + "\n")
  log(f"wrote {out}" + (" (FAILED)" if "error" in record else ""))
  return record


def is_done(path: pathlib.Path) -> bool:
  if not path.exists():
    return False
  try:
    return "error" not in json.loads(path.read_text())
  except json.JSONDecodeError:
    return False


OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory")


def ran_out_of_memory(path: pathlib.Path) -> bool:
  """Whether the cell's JSON records an accelerator out-of-memory error."""
  try:
    error = json.loads(path.read_text()).get("error", "")
  except (OSError, json.JSONDecodeError):
    return False
  return any(m in error for m in OOM_MARKERS)


def _cell_env(workers: int) -> dict:
  """A subprocess's environment: 1/`workers` of the accelerator's memory."""
  env = dict(os.environ)
  env[CONCURRENT_ENV] = str(workers)
  if workers > 1:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / workers:.3f}"
  return env


def run_grid(c, *, in_process: bool, force: bool = False,
             time_budget_s: float = 0.0, workers: int = 1,
             log=print) -> dict:
  """Runs every pending cell, up to `workers` subprocesses at a time.

  A cell that runs out of accelerator memory while sharing it (workers > 1,
  each with 1/workers of the memory) is retried once, alone, with the
  default memory share, after the other cells; its id is then also listed
  under "retried_alone".

  Returns:
    `{"done", "skipped", "failed", "pending", "retried_alone"}` lists of
    `task/method/seed` ids; "pending" cells were not started because
    `time_budget_s` ran out.
  """
  if workers < 1 or (in_process and workers > 1):
    raise ValueError(f"workers={workers}: need >= 1, and 1 with in_process")
  report = {"done": [], "skipped": [], "failed": [], "pending": [],
            "retried_alone": []}
  todo = cells(c)
  start = time.time()
  running = []  # (cell_id, json path, Popen)
  alone = []  # (cell_id, json path): out of memory beside other cells

  def launch(cell_id: str, path: pathlib.Path, share: int) -> None:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()),
           *sys.argv[1:], f"--cell={cell_id}"]
    running.append((cell_id, path, subprocess.Popen(cmd,
                                                    env=_cell_env(share))))

  def reap() -> None:
    """Records the finished subprocesses; sleeps a second if none has."""
    finished = [item for item in running if item[2].poll() is not None]
    for item in finished:
      running.remove(item)
      cell_id, path, proc = item
      ok = proc.returncode == 0 and is_done(path)
      if (not ok and workers > 1 and cell_id not in report["retried_alone"]
          and ran_out_of_memory(path)):
        alone.append((cell_id, path))
        continue
      report["done" if ok else "failed"].append(cell_id)
    if not finished:
      time.sleep(1.0)

  def out_of_time() -> bool:
    return bool(time_budget_s) and time.time() - start > time_budget_s

  try:
    for i, (task, method, seed) in enumerate(todo):
      cell_id = f"{task}/{method}/{seed}"
      path = cell_json(c, task, method, seed)
      if not force and is_done(path):
        report["skipped"].append(cell_id)
        continue
      if out_of_time():
        report["pending"].append(cell_id)
        continue
      log(f"[{i + 1}/{len(todo)}] {cell_id}")
      if in_process:
        ok = "error" not in run_cell(c, task, method, seed, log=log)
        report["done" if ok else "failed"].append(cell_id)
        continue
      launch(cell_id, path, workers)
      while len(running) >= workers:
        reap()
    while running or alone:
      if running:
        reap()
        continue
      cell_id, path = alone.pop(0)
      if out_of_time():
        report["pending"].append(cell_id)
        continue
      log(f"{cell_id} ran out of memory beside other cells; again, alone")
      report["retried_alone"].append(cell_id)
      launch(cell_id, path, 1)
  finally:  # interrupted (SIGTERM, Ctrl-C): stop the cells still running
    for _, _, proc in running:
      proc.terminate()
    for _, _, proc in running:
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
  return report


def _exit_on_sigterm(signum, frame):
  del frame
  sys.exit(128 + signum)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # `timeout` sends SIGTERM: exit through run_grid's cleanup of its cells.
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  c = _CONFIG.value
  if _CELL.value:
    task, method, seed = _CELL.value.split("/")
    record = run_cell(c, task, method, int(seed))
    if "error" in record:
      print(record["error"], file=sys.stderr)
      sys.exit(1)
    return
  report = run_grid(c, in_process=_IN_PROCESS.value, force=_FORCE.value,
                    time_budget_s=_TIME_BUDGET.value,
                    workers=_WORKERS.value)
  print(json.dumps({k: len(v) for k, v in report.items()}))
  if report["pending"]:
    print(f"time budget spent: {len(report['pending'])} cells pending; run "
          "the same command again to continue", file=sys.stderr)
  if report["failed"]:
    print("failed cells: " + ", ".join(report["failed"]), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
