"""experiments/ncu_summary.py: regions of an Nsight Compute source page."""

import pathlib

import pytest

from experiments import ncu_summary

REPO = pathlib.Path(__file__).resolve().parents[1]
PROFILE = REPO / "experiments/results/ncu/h100_s12_ptx_dx_mgpu_sass.csv"


def _write(path, rows):
  header = ["Address", "Source", ncu_summary.SAMPLES, "# Samples",
            ncu_summary.EXECUTED, "stall_wait", "stall_wait (Not Issued)",
            "stall_barrier"]
  lines = ['"Kernel Name","toy_kernel",', ",".join(f'"{h}"' for h in header)]
  for i, (source, executed, samples, wait, barrier) in enumerate(rows):
    lines.append(",".join(f'"{v}"' for v in (
        hex(i), source, samples, samples, executed, wait, wait, barrier)))
  path.write_text("\n".join(lines) + "\n")


def test_regions_split_at_changes_of_the_execution_count(tmp_path):
  csv_path = tmp_path / "toy.csv"
  _write(csv_path, [
      ("MOV R1, R2", 1, 1, 0, 0),
      ("LDS.U16 R2, [R3]", 64, 10, 6, 1),
      ("@!P3  BRA 0x10", 64, 30, 20, 5),
      ("STSM.16.M88.4 [R1], R2", 32, 59, 9, 40),
  ])
  name, instructions = ncu_summary.read_source_page(str(csv_path))
  assert name == "toy_kernel" and len(instructions) == 4
  got = ncu_summary.regions(instructions)
  assert [(r.first, r.last, r.executed, r.samples) for r in got] == [
      (0, 0, 1, 1), (1, 2, 64, 40), (3, 3, 32, 59)]
  assert got[1].opcodes == {"LDS": 1, "BRA": 1}
  assert got[1].stalls == {"wait": 26, "barrier": 6}  # not-issued excluded
  report = ncu_summary.summary(str(csv_path), min_share=0.05)
  lines = report.splitlines()
  assert lines[0] == "toy_kernel: 4 instructions, 100 samples"
  assert len(lines) == 3  # the 1 % region is left out
  assert lines[1].startswith("[1, 2] x64: 40.0 % of samples")
  assert "barrier 40" in lines[2]


def test_the_committed_dx_profile_shows_its_dequantization():
  """Session 12's H100 profile of the input gradient: the loop's wgmma
  region (8 HGMMA per warp and step) and the two planes' dequantization
  branches (20 shared loads each) are among the regions reported."""
  name, instructions = ncu_summary.read_source_page(str(PROFILE))
  assert name.startswith("qmatmul_dx_mgpu")
  parts = ncu_summary.regions(instructions)
  assert sum(r.last - r.first + 1 for r in parts) == len(instructions)
  (mma,) = [r for r in parts if r.opcodes["HGMMA"] == 8]
  # Each plane's branch runs in one of the two warpgroups, at every step
  # but a tile's last (tile 0's conversion, before the loop, runs rarely).
  branches = [r for r in parts
              if r.opcodes["LDS"] == 20 and r.executed > mma.executed // 4]
  assert len(branches) == 2
  for b in branches:
    assert 0.9 * mma.executed < 2 * b.executed < mma.executed


def test_refuses_a_file_that_is_not_a_source_page(tmp_path):
  bad = tmp_path / "details.csv"
  bad.write_text('"ID","Kernel Name","Metric Name"\n"0","k","Duration"\n')
  with pytest.raises(ValueError, match="not an ncu source page"):
    ncu_summary.read_source_page(str(bad))
  with pytest.raises(SystemExit, match="not found"):
    ncu_summary.main([str(tmp_path / "missing.csv")])
