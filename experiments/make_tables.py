r"""Markdown tables and PNG plots from experiments/reproduce.py's JSON files.

  python experiments/make_tables.py --results_dir=experiments/results/reproduce

Writes `<out_dir>/tables.md` (one table per task: mean ± sample std over
seeds, with the number of seeds; and an overview of each method's headline
metric per task) and, per task, `loss_<task>.png` (training loss per method,
first seed), `memory_<task>.png` (peak memory per method) and, where QFT ran,
`codes_changed_<task>.png` (fraction of int8 codes changed per step).
`<out_dir>` defaults to the results directory. Tokens/s averages only the
cells that had the device to themselves (`concurrent_cells` = 1, see
reproduce.py's `--workers`).
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import statistics
import sys

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.configs import reproduce as reproduce_configs  # pylint: disable=g-import-not-at-top

_RESULTS = flags.DEFINE_string("results_dir", "experiments/results/reproduce",
                               "Directory of <task>/<method>_s<seed>.json.")
_OUT = flags.DEFINE_string("out_dir", "", "Where tables.md and the PNGs go "
                           "(default: results_dir).")

# task -> [(column title, key in task_metrics, scale)]; the first is headline.
METRICS = {
    "sst2": [("acc %", "accuracy", 100.0)],
    "gsm8k": [("acc %", "accuracy", 100.0)],
    "dialogsum": [("ROUGE-L", "rougeL", 1.0), ("ROUGE-1", "rouge1", 1.0),
                  ("ROUGE-2", "rouge2", 1.0), ("ROUGE-L max", "rougeL_max",
                                               1.0)],
    "shakespeare": [("ppl", "ppl", 1.0)],
    "shakespeare2k": [("ppl", "ppl", 1.0)],
    "alpaca": [("loss", "loss", 1.0)],
}
GIB = 1024 ** 3
LOWER_IS_BETTER = ("ppl", "loss")  # task_metrics keys

# The papers' claims: (claim, method, baseline, kind, threshold). "rel": the
# method falls short of the baseline's headline metric by at most
# `threshold` of it; "points": by at most `threshold` absolute; "beats": the
# method's mean is better.
CLAIMS = [
    ("QFT within 2 % of full FT", "qft", "full_adamw", "rel", 0.02),
    ("PEQA 4-bit within 3 % of LoRA", "peqa4", "lora", "rel", 0.03),
    ("ApiQ-bw 2-bit beats LoftQ 2-bit", "apiq2", "loftq2", "beats", None),
    ("ApiQ-bw 2-bit beats QLoRA 2-bit", "apiq2", "qlora2_rtn", "beats", None),
    ("ModuLoRA 3-bit within 1 point of QLoRA 4-bit", "modulora_gptq3",
     "qlora4", "points", 1.0),
    ("HiFT within 2 % of full FT", "hift_bottom_up", "full_adamw", "rel",
     0.02),
]


def load_records(results_dir: pathlib.Path) -> dict:
  """`{task: {method: [records sorted by seed]}}` of the successful cells."""
  out = collections.defaultdict(lambda: collections.defaultdict(list))
  for path in sorted(results_dir.glob("*/*.json")):
    rec = json.loads(path.read_text())
    if "error" in rec or "task_metrics" not in rec:
      continue
    out[rec["task"]][rec["method"]].append(rec)
  for methods in out.values():
    for recs in methods.values():
      recs.sort(key=lambda r: r["seed"])
  return out


def method_order(methods) -> list[str]:
  known = list(reproduce_configs.PRESETS)
  return sorted(methods, key=lambda m: (known.index(m) if m in known
                                        else len(known), m))


def storage(rec: dict) -> str:
  """How the base weights were stored, e.g. "NF4", "gptq 3-bit", "float32"."""
  m = rec["config"]["method"]
  name, bits = m["name"], m["bits"]
  if rec["method"] == "zeroshot" or name in ("full", "lora", "hift"):
    return rec["config"]["dtype"]
  if name == "qlora":
    return "NF4"
  if name == "qft":
    return "int8 + 1 % float"
  if name == "modulora":
    return f"{m['quantizer']} {bits}-bit"
  return f"rtn {bits}-bit"


def mean_std(values: list[float]) -> str:
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return "—"
  mean = statistics.fmean(values)
  if len(values) == 1:
    return f"{mean:.2f}"
  return f"{mean:.2f} ± {statistics.stdev(values):.2f} ({len(values)})"


def task_table(task: str, methods: dict) -> str:
  metrics = METRICS.get(task, [])
  head = (["method", "base weights", "seeds"] + [t for t, _, _ in metrics]
          + ["train loss", "peak GiB", "tok/s (cells run alone)"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for method in method_order(methods):
    recs = methods[method]
    row = [method, storage(recs[0]), str(len(recs))]
    for _, key, scale in metrics:
      row.append(mean_std([r["task_metrics"].get(key, math.nan) * scale
                           for r in recs]))
    row.append(mean_std([r["summary"].get("train_loss") for r in recs]))
    row.append(mean_std([r["summary"]["peak_bytes"] / GIB for r in recs]))
    row.append(mean_std([r.get("tok_per_s") for r in recs
                         if r.get("concurrent_cells", 1) == 1]))
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def overview_table(records: dict) -> str:
  tasks = [t for t in METRICS if t in records] + sorted(
      t for t in records if t not in METRICS)
  methods = method_order({m for t in tasks for m in records[t]})
  head = ["method"] + [
      f"{t} {METRICS[t][0][0]}" if t in METRICS else t for t in tasks]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for method in methods:
    row = [method]
    for t in tasks:
      recs = records[t].get(method, [])
      if not recs or t not in METRICS:
        row.append("—")
        continue
      _, key, scale = METRICS[t][0]
      row.append(mean_std([r["task_metrics"].get(key, math.nan) * scale
                           for r in recs]))
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _headline(task: str, recs: list[dict]) -> list[float]:
  _, key, scale = METRICS[task][0]
  return [r["task_metrics"][key] * scale for r in recs]


def welch_t(a: list[float], b: list[float]) -> float | None:
  """Welch's t of mean(a) - mean(b); None with fewer than 2 values a side."""
  if len(a) < 2 or len(b) < 2:
    return None
  se = math.sqrt(statistics.variance(a) / len(a)
                 + statistics.variance(b) / len(b))
  diff = statistics.fmean(a) - statistics.fmean(b)
  return math.inf if se == 0 and diff else (diff / se if se else 0.0)


def claims_table(records: dict) -> str:
  """Each claim on each task where both cells ran, and whether it holds."""
  head = ["claim", "task", "method", "baseline", "shortfall", "Welch t",
          "holds"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for claim, method, base, kind, threshold in CLAIMS:
    for task in [t for t in METRICS if t in records]:
      if method not in records[task] or base not in records[task]:
        continue
      m, b = (_headline(task, records[task][x]) for x in (method, base))
      sign = -1.0 if METRICS[task][0][1] in LOWER_IS_BETTER else 1.0
      short = sign * (statistics.fmean(b) - statistics.fmean(m))
      if kind == "rel":
        gap, holds = f"{100 * short / statistics.fmean(b):.2f} %", (
            short <= threshold * statistics.fmean(b))
      elif kind == "points":
        gap, holds = f"{short:.2f}", short <= threshold
      else:
        gap, holds = f"{short:.2f}", short < 0
      t = welch_t(m, b)
      lines.append("| " + " | ".join([
          claim, f"{task} {METRICS[task][0][0]}",
          f"{method} {mean_std(m)}", f"{base} {mean_std(b)}", gap,
          "—" if t is None else f"{sign * t:.1f}",
          "yes" if holds else "**no**"]) + " |")
  return "\n".join(lines)


def plot_task(task: str, methods: dict, out_dir: pathlib.Path) -> list[str]:
  """Loss curves, memory bars and (QFT) code-change plots; returns files."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  files = []
  trained = {m: recs[0] for m, recs in methods.items()
             if recs[0].get("curve", {}).get("train", {}).get("loss")}
  if trained:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in method_order(trained):
      cur = trained[m]["curve"]["train"]
      ax.plot(cur["step"], cur["loss"], label=m, lw=1.2)
    ax.set(xlabel="step", ylabel="training loss (nats/token)",
           title=f"{task}: training loss (seed {trained[m]['seed']})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    files.append(_save(fig, out_dir / f"loss_{task}.png"))
  order = method_order(methods)
  fig, ax = plt.subplots(figsize=(7, 4))
  peaks = [statistics.fmean(r["summary"]["peak_bytes"] for r in methods[m])
           / GIB for m in order]
  ax.bar(range(len(order)), peaks)
  ax.set_xticks(range(len(order)), order, rotation=45, ha="right", fontsize=8)
  backend = methods[order[0]][0]["summary"].get("backend", "")
  ax.set(ylabel="GiB", title=f"{task}: peak memory per method "
         f"({'process RSS' if backend == 'cpu' else 'device peak'})")
  files.append(_save(fig, out_dir / f"memory_{task}.png"))
  qft = {m: recs[0] for m, recs in methods.items()
         if "codes_changed" in recs[0].get("curve", {}).get("train", {})}
  if qft:
    fig, ax = plt.subplots(figsize=(7, 4))
    positive = True
    for m, rec in qft.items():
      cur = rec["curve"]["train"]
      ax.plot(cur["step"], cur["codes_changed"], label=m)
      positive &= min(cur["codes_changed"]) > 0
    ax.set(xlabel="step", ylabel="fraction of int8 codes changed",
           yscale="log" if positive else "linear",
           title=f"{task}: QFT codes changed per step")
    ax.legend()
    ax.grid(alpha=0.3)
    files.append(_save(fig, out_dir / f"codes_changed_{task}.png"))
  return files


def _save(fig, path: pathlib.Path) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.close(fig)
  return path.name


def provenance(task: str, methods: dict) -> str:
  """Devices and commits (with cell counts) and one command for the table."""
  recs = [r for rs in methods.values() for r in rs]
  count = lambda key, n=None: ", ".join(
      f"{k} ({v})" for k, v in collections.Counter(
          str(r.get(key, "?"))[:n] for r in recs).most_common())
  seeds = sorted({r["seed"] for r in recs})
  cmd = ("python experiments/reproduce.py "
         "--config=experiments/configs/reproduce.py "
         f"--config.tasks={task} --config.methods={','.join(method_order(methods))} "
         f"--config.seeds={','.join(map(str, seeds))}")
  return (f"Devices: {count('device')}; commits: {count('commit', 7)} "
          f"(cells per value). Command (add `--config.base.model=<gguf>`; "
          f"each cell's JSON holds the exact command that made it): `{cmd}`")


def make_report(results_dir: pathlib.Path, out_dir: pathlib.Path) -> str:
  """Writes tables.md and the plots; returns the markdown."""
  records = load_records(results_dir)
  if not records:
    raise ValueError(f"no successful cell JSON under {results_dir}")
  out_dir.mkdir(parents=True, exist_ok=True)
  parts = ["# Reproduction results", "",
           f"From `{results_dir}` by `python experiments/make_tables.py "
           f"--results_dir={results_dir}`. Mean ± sample std (seeds).", "",
           "## Overview (headline metric per task)", "",
           overview_table(records), "",
           "## The papers' claims",
           "",
           "Shortfall: how far the method's mean falls below the baseline's "
           "(above it, for perplexity), relative or in points as the claim "
           "states; negative is better than the baseline. Welch t of the "
           "method against the baseline (positive: better), from the seeds.",
           "", claims_table(records)]
  for task in sorted(records):
    parts += ["", f"## {task}", "", provenance(task, records[task]), "",
              task_table(task, records[task]), ""]
    parts += [f"![{f}]({f})" for f in plot_task(task, records[task], out_dir)]
  text = "\n".join(parts) + "\n"
  (out_dir / "tables.md").write_text(text)
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  results = pathlib.Path(_RESULTS.value)
  print(make_report(results, pathlib.Path(_OUT.value) if _OUT.value
                    else results))


if __name__ == "__main__":
  app.run(main)
