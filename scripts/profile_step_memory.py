r"""Where a benchmark row's peak memory goes: XLA's buffer assignment.

  python scripts/profile_step_memory.py --row=qlora_streamed --top=25
  python scripts/profile_step_memory.py --row=qlora --tiny   # CPU smoke test

Runs one row of experiments/bench_train.py (one warm-up step) with XLA's HLO
dumps on, then prints the measured peak and, for the largest compiled module
(the training step), its biggest allocations from the buffer-assignment
dump: XLA's memory-usage report where the XLA version writes one (the
buffers live at the peak), and the largest HLO values. Use it to find what
holds memory at the peak.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import tempfile

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from experiments import bench_train  # pylint: disable=g-import-not-at-top  # defines --row, --tiny

_TOP = flags.DEFINE_integer("top", 25, "Allocations to print.")

_VALUE = re.compile(r"value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (\S+)")


def largest_values(text: str, top: int) -> list[tuple[int, str, str]]:
  """(size, HLO name, shape) of the `top` largest distinct values."""
  seen = {}
  for m in _VALUE.finditer(text):
    seen.setdefault(m.group(1), (int(m.group(2)), m.group(1), m.group(3)))
  return sorted(seen.values(), key=lambda v: -v[0])[:top]


def main(argv):
  del argv
  dump = tempfile.mkdtemp(prefix="xla_dump_")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_dump_to={dump}"
                             " --xla_dump_hlo_module_re=jit_step")
  name = bench_train._ROW.value or "qlora"  # pylint: disable=protected-access
  row = bench_train.run_row(name, bench_train._TINY.value, 1, 1)  # pylint: disable=protected-access
  print(f"{name}: peak {row['peak_gib']} GiB, planned "
        f"{row['planned_gib']} GiB", flush=True)
  files = sorted(pathlib.Path(dump).glob("*buffer-assignment.txt"),
                 key=lambda p: p.stat().st_size)
  if not files:
    raise SystemExit(f"no buffer-assignment dump in {dump}")
  print(f"module {files[-1].name}")
  reports = sorted(pathlib.Path(dump).glob("*memory-usage-report.txt"),
                   key=lambda p: p.stat().st_size)
  if reports:  # XLA's own summary, with the buffers live at the peak
    print("\n".join(reports[-1].read_text().splitlines()[:80]))
  for size, name, shape in largest_values(files[-1].read_text(), _TOP.value):
    print(f"{size / 2**20:9.1f} MiB  {shape:40s} {name}")

if __name__ == "__main__":
  app.run(main)
