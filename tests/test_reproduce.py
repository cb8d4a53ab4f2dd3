"""experiments/reproduce.py and make_tables.py on a CPU-sized grid."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from conftest import shared_path

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import make_tables  # pylint: disable=g-import-not-at-top
from experiments import reproduce  # pylint: disable=g-import-not-at-top
from experiments.configs import reproduce as configs  # pylint: disable=g-import-not-at-top


def test_cell_config_layers_task_then_method_then_seed():
  c = configs.get_config("gpu")
  f = reproduce.cell_config(c, "sst2", "qft", 2)
  assert (f.model, f.steps, f.batch_size, f.warmup_steps) == ("smollm2", 250,
                                                              16, 20)
  assert (f.data.limit, f.data.sampler, f.data.sample_seed) == (4000,
                                                                "python", 0)
  assert not f.data.add_bos and f.schedule == "linear"
  assert (f.method.name, f.optimizer, f.learning_rate) == ("qft", "lion_int8",
                                                           5e-6)
  assert f.seed == 2 and f.workdir.endswith("sst2/qft_s2")
  f = reproduce.cell_config(c, "dialogsum", "modulora_gptq3", 0)
  assert (f.method.name, f.method.quantizer, f.method.bits,
          f.method.group_size) == ("modulora", "gptq", 3, 64)
  assert f.data.kind == "dialogsum" and f.optimizer == "adamw"


def test_cells_reject_unknown_names():
  c = configs.get_config("cpu")
  c.methods = "lora,nope"
  with pytest.raises(ValueError, match="unknown method preset 'nope'"):
    reproduce.cells(c)


def test_steady_tokens_per_second_excludes_the_first_interval():
  # 100 tokens/step; the first logged step took 10 s (compile), the next
  # four 1 s each: the cumulative rate is logged, the steady rate is 100/s.
  steps, clock = [1, 2, 3, 4, 5], [10.0, 11.0, 12.0, 13.0, 14.0]
  rates = [s * 100 / t for s, t in zip(steps, clock)]
  got = reproduce.steady_tok_per_s({"step": steps, "tok_per_s": rates}, 100)
  assert got == pytest.approx(100.0)


def test_grid_runs_resumes_and_tabulates(tmp_path):
  shared_path("models", "stories260K", "stories260K.bin")
  c = configs.get_config("cpu")
  c.methods, c.tasks, c.seeds = "zeroshot,lora", "sst2", "0,1"
  c.results_dir, c.work_dir = str(tmp_path / "res"), str(tmp_path / "work")
  c.max_steps, c.eval_limit = 2, 8
  logs = []
  report = reproduce.run_grid(c, in_process=True, log=logs.append)
  assert report == {"done": ["sst2/zeroshot/0", "sst2/lora/0",
                             "sst2/lora/1"],
                    "skipped": [], "failed": [], "pending": [],
                    "retried_alone": []}
  rec = json.loads((tmp_path / "res" / "sst2" / "lora_s1.json").read_text())
  assert rec["task_metrics"]["n"] == 8 and rec["summary"]["steps"] == 2
  assert rec["curve"]["train"]["step"] == [1, 2] and rec["seed"] == 1
  again = reproduce.run_grid(c, in_process=True, log=logs.append)
  assert again["skipped"] == report["done"] and not again["done"]

  md = make_tables.make_report(tmp_path / "res", tmp_path / "out")
  accs = [json.loads((tmp_path / "res" / "sst2" / f"lora_s{s}.json")
                     .read_text())["task_metrics"]["accuracy"] * 100
          for s in (0, 1)]
  row = next(l for l in md.splitlines() if l.startswith("| lora | float32"))
  assert f"{sum(accs) / 2:.2f} ± " in row and "(2)" in row
  assert (tmp_path / "out" / "loss_sst2.png").stat().st_size > 1000
  assert (tmp_path / "out" / "memory_sst2.png").exists()


def _cli(tmp_path, *flags: str) -> list[str]:
  """reproduce.py on the CPU grid's sst2 cells, seeds 0 and 1, 2 workers."""
  shared_path("models", "stories260K", "stories260K.bin")
  repo = pathlib.Path(__file__).resolve().parents[1]
  return [sys.executable, str(repo / "experiments" / "reproduce.py"),
          "--config=" + str(repo / "experiments" / "configs" / "reproduce.py")
          + ":cpu", "--config.tasks=sst2", "--config.seeds=0,1",
          f"--config.results_dir={tmp_path / 'res'}",
          f"--config.work_dir={tmp_path / 'work'}", "--workers=2", *flags]


def test_workers_run_cells_side_by_side_in_subprocesses(tmp_path):
  cmd = _cli(tmp_path, "--config.methods=zeroshot,lora",
             "--config.max_steps=1", "--config.eval_limit=4")
  out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                       env=dict(os.environ, COMMIT="abc123"), timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {
      "done": 3, "skipped": 0, "failed": 0, "pending": 0, "retried_alone": 0}
  made = sorted(p.name for p in (tmp_path / "res" / "sst2").iterdir())
  assert made == ["lora_s0.json", "lora_s1.json", "zeroshot_s0.json"]
  for name in made:
    rec = json.loads((tmp_path / "res" / "sst2" / name).read_text())
    assert rec["concurrent_cells"] == 2 and rec["commit"] == "abc123"
    assert "error" not in rec


class _FakeCell:
  """Stands in for a cell subprocess: writes the cell's JSON at once.

  `sst2/lora/1` runs out of memory whenever it shares the accelerator;
  `sst2/lora/0` runs out of memory always.
  """
  started = []

  def __init__(self, cmd, env):
    cell_id = cmd[-1].removeprefix("--cell=")
    task, method, seed = cell_id.split("/")
    share = int(env[reproduce.CONCURRENT_ENV])
    _FakeCell.started.append((cell_id, share,
                              env.get("XLA_PYTHON_CLIENT_MEM_FRACTION")))
    oom = cell_id == "sst2/lora/0" or (cell_id == "sst2/lora/1" and share > 1)
    error = ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory "
             "while trying to allocate 9.70GiB")
    record = {"error": error} if oom else {}
    path = pathlib.Path(self.results) / task / f"{method}_s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    self.returncode = 1 if oom else 0

  def poll(self):
    return self.returncode


def test_cells_out_of_memory_beside_others_are_retried_alone(tmp_path,
                                                             monkeypatch):
  c = configs.get_config("cpu")
  c.methods, c.tasks, c.seeds = "zeroshot,lora", "sst2", "0,1,2"
  c.results_dir = str(tmp_path / "res")
  monkeypatch.setattr(_FakeCell, "results", c.results_dir, raising=False)
  monkeypatch.setattr(_FakeCell, "started", [])
  monkeypatch.setattr(reproduce.subprocess, "Popen", _FakeCell)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  report = reproduce.run_grid(c, in_process=False, workers=3,
                              log=lambda *_: None)
  assert sorted(report["done"]) == ["sst2/lora/1", "sst2/lora/2",
                                    "sst2/zeroshot/0"]
  assert report["failed"] == ["sst2/lora/0"]  # once alone, then it counts
  assert sorted(report["retried_alone"]) == ["sst2/lora/0", "sst2/lora/1"]
  alone = [(cell, frac) for cell, share, frac in _FakeCell.started
           if share == 1]
  assert sorted(alone) == [("sst2/lora/0", None), ("sst2/lora/1", None)]
  assert len(_FakeCell.started) == 6  # 4 cells, two of them twice
  # One worker: nothing shares the accelerator, so nothing is retried.
  monkeypatch.setattr(_FakeCell, "started", [])
  again = reproduce.run_grid(c, in_process=False, workers=1, force=True,
                             log=lambda *_: None)
  assert again["failed"] == ["sst2/lora/0"] and not again["retried_alone"]
  assert len(_FakeCell.started) == 4


def _cell_processes(marker: str) -> list[int]:
  pids = []
  for proc in pathlib.Path("/proc").iterdir():
    try:
      cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
      continue
    if "--cell=" in cmdline and marker in cmdline:
      pids.append(int(proc.name))
  return pids


@pytest.mark.skipif(not pathlib.Path("/proc").is_dir(), reason="needs /proc")
def test_sigterm_stops_the_running_cells(tmp_path):
  cmd = _cli(tmp_path, "--config.methods=lora", "--config.max_steps=100000")
  parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while len(_cell_processes(str(tmp_path))) < 2 and time.time() < deadline:
    time.sleep(0.5)
  assert len(_cell_processes(str(tmp_path))) == 2
  parent.send_signal(signal.SIGTERM)
  assert parent.wait(timeout=60) == 128 + signal.SIGTERM
  assert not _cell_processes(str(tmp_path))


def test_every_method_preset_trains_and_evaluates(tmp_path):
  """One step and a 4-sentence evaluation for every preset of the grid.

  stories260K's FFN width 172 is no multiple of 8, the codes in one 3-bit
  word: the 3-bit presets must refuse it by name.
  """
  shared_path("models", "stories260K", "stories260K.bin")
  c = configs.get_config("cpu")
  c.methods, c.tasks, c.seeds = ",".join(configs.PRESETS), "sst2", "0"
  c.results_dir, c.work_dir = str(tmp_path / "res"), str(tmp_path / "work")
  c.max_steps, c.eval_limit = 1, 4
  report = reproduce.run_grid(c, in_process=True, log=lambda _: None)
  record = lambda m: json.loads(
      (tmp_path / "res" / "sst2" / f"{m}_s0.json").read_text())
  three_bit = [m for m, p in configs.PRESETS.items()
               if p.get("method", {}).get("bits") == 3]
  assert sorted(three_bit) == ["apiq3", "modulora_gptq3", "peqa3"]
  assert sorted(report["failed"]) == sorted(f"sst2/{m}/0" for m in three_bit)
  for method in three_bit:
    assert ("input dimension 172 is not a multiple of 8, the number of 3-bit "
            "codes packed in one word") in record(method)["error"]
  for method in set(configs.PRESETS) - set(three_bit):
    rec = record(method)
    assert "error" not in rec, rec["error"][-2000:]
    assert rec["task_metrics"]["n"] == 4
    assert rec["summary"]["steps"] == (0 if method == "zeroshot" else 1)


def test_claims_table_computes_shortfalls_and_verdicts():
  rec = lambda task, key, v: {"task_metrics": {key: v}}
  records = {
      "sst2": {"full_adamw": [rec("sst2", "accuracy", v) for v in (.88, .90)],
               "qft": [rec("sst2", "accuracy", v) for v in (.87, .89)],
               "modulora_gptq3": [rec("sst2", "accuracy", .80)],
               "qlora4": [rec("sst2", "accuracy", .85)]},
      "shakespeare": {"full_adamw": [rec("shakespeare", "ppl", 20.0)],
                      "qft": [rec("shakespeare", "ppl", 21.0)]},
  }
  rows = {tuple(c.strip() for c in line.split("|")[1:3]): line
          for line in make_tables.claims_table(records).splitlines()[2:]}
  # 88 vs 89: 1.12 % short of full FT, within 2 %; t = -1 / sqrt(2) ...
  sst2 = rows[("QFT within 2 % of full FT", "sst2 acc %")]
  assert "| 1.12 % | -0.7 | yes |" in sst2
  # perplexity: higher is worse, 21 vs 20 is 5 % short.
  ppl = rows[("QFT within 2 % of full FT", "shakespeare ppl")]
  assert "| 5.00 % | — | **no** |" in ppl
  modu = rows[("ModuLoRA 3-bit within 1 point of QLoRA 4-bit", "sst2 acc %")]
  assert "| 5.00 | — | **no** |" in modu
  assert not any("PEQA" in k[0] for k in rows)  # no cells, no row
