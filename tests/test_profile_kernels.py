"""experiments/profile_kernels.py (the Nsight Compute driver) in the
Pallas interpreter: it runs the requested kernel and checks its output."""

import json

import pytest

from experiments import profile_kernels


@pytest.mark.parametrize("op,bits,config", [
    ("fwd", "4", None),
    ("dx", "nf4", None),
    ("dx", "4", "auto"),  # qmatmul's own choice: the table on the CPU
    ("fwd", "4", json.dumps(dict(block_m=1, block_n=16, block_k=64,
                                 num_warps=1, split_k=2,
                                 scale_mode="weights", contraction="fma"))),
])
def test_runs_the_kernel_and_checks_it(op, bits, config, capsys):
  argv = ["--op", op, "--m", "2", "--n", "48", "--k", "256", "--bits", bits,
          "--launches", "1", "--interpret"]
  report = profile_kernels.main(argv + (["--config", config] if config else []))
  assert report["rel_err"] <= 1e-2
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
  if config == "auto":
    assert report["config"] == "auto"
  elif config:
    assert report["config"]["contraction"] == "fma"
