r"""Where a kernel's warps spend their time, from an Nsight Compute source page.

    ncu --import $OUT/dx_mgpu.ncu-rep --page source --print-source sass \
      --csv > dx_mgpu_sass.csv        # on the device machine (profile_kernels.py)
    python experiments/ncu_summary.py dx_mgpu_sass.csv   # here

Splits the SASS listing into regions, maximal runs of consecutive
instructions executed the same number of times (a loop body, one branch of
a `pl.when`, a warpgroup's prologue), and prints for each region holding at
least `--min_share` of the warp-stall samples: its instruction range, how
often it ran, its share of the samples, its most frequent opcodes and its
top stall reasons. Session 12 read the input-gradient kernel's
dequantization this way (WORKSPACE.md section 4, "Session 12").
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import pathlib

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


@dataclasses.dataclass
class Region:
  """Consecutive instructions executed `executed` times each."""
  first: int
  last: int
  executed: int
  samples: int = 0
  opcodes: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  stalls: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)


def opcode(source: str) -> str:
  """`@!P3 BRA 0x...` -> `BRA`; `HGMMA.64x128x16.F32.BF16 ...` -> `HGMMA`."""
  words = source.split()
  if words and words[0].startswith("@"):
    words = words[1:]
  return words[0].split(".")[0] if words else ""


def read_source_page(path: str) -> tuple[str, list[dict]]:
  """(kernel name, one dict per SASS instruction) of ncu's source page CSV."""
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  if len(rows) < 3 or rows[0][:1] != ["Kernel Name"] or SAMPLES not in rows[1]:
    raise ValueError(f"{path} is not an ncu source page (--page source "
                     "--print-source sass --csv)")
  header = rows[1]
  return rows[0][1], [dict(zip(header, r)) for r in rows[2:]]


def regions(instructions: list[dict]) -> list[Region]:
  """The listing split into runs of equal execution counts."""
  out: list[Region] = []
  stall_keys = [k for k in (instructions[0] if instructions else {})
                if k.startswith("stall_") and "Not Issued" not in k]
  for i, ins in enumerate(instructions):
    executed = int(ins.get(EXECUTED) or 0)
    if not out or out[-1].executed != executed:
      out.append(Region(i, i, executed))
    region = out[-1]
    region.last = i
    region.samples += int(ins.get(SAMPLES) or 0)
    region.opcodes[opcode(ins.get("Source", ""))] += 1
    for k in stall_keys:
      region.stalls[k.removeprefix("stall_")] += int(ins.get(k) or 0)
  return out


def summary(path: str, min_share: float = 0.02) -> str:
  """The report `main` prints."""
  name, instructions = read_source_page(path)
  parts = regions(instructions)
  total = sum(r.samples for r in parts) or 1
  lines = [f"{name}: {len(instructions)} instructions, {total} samples"]
  for r in parts:
    if r.samples / total < min_share:
      continue
    ops = ", ".join(f"{k} {v}" for k, v in r.opcodes.most_common(6))
    stalls = ", ".join(f"{k} {v}" for k, v in r.stalls.most_common(4))
    lines.append(f"[{r.first}, {r.last}] x{r.executed}: "
                 f"{100 * r.samples / total:.1f} % of samples; "
                 f"{r.last - r.first + 1} instructions ({ops}); "
                 f"stalls: {stalls}")
  return "\n".join(lines)


def main(argv=None) -> str:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("csv", help="ncu --page source --print-source sass --csv")
  ap.add_argument("--min_share", type=float, default=0.02,
                  help="smallest share of the samples a region is shown at")
  args = ap.parse_args(argv)
  if not pathlib.Path(args.csv).is_file():
    raise SystemExit(f"{args.csv} not found")
  report = summary(args.csv, args.min_share)
  print(report)
  return report


if __name__ == "__main__":
  main()
