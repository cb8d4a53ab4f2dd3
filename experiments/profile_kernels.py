r"""Runs one qmatmul kernel a few times for Nsight Compute to profile.

On the device machine (Firecracker runtime: ncu reads hardware counters;
`--clock-control none` leaves the clocks alone, as the device tool asks):

  ncu --clock-control none --kernel-name regex:qmatmul --launch-skip 2 \
      --launch-count 1 --set full --export $OUT/fwd_table \
      python3 experiments/profile_kernels.py --op fwd --m 1 --n 4096 --k 4096
  ncu --import $OUT/fwd_table.ncu-rep --page details --csv > $OUT/fwd_table.csv
  ncu --import $OUT/fwd_table.ncu-rep --page source --print-source sass \
      --csv > $OUT/fwd_table_sass.csv   # per-instruction counts and stalls

(the committed experiments/results/ncu/*_ptx_sass.csv came from reports
taken with `--import-source yes` added to the first command).

The kernel runs with the tuning table's config for its shape (as the
benchmark's, with bf16 activations) unless
`--config` gives TuningConfig fields as JSON (or `auto`: qmatmul's own
choice, the Mosaic GPU kernels at training shapes on Hopper; their kernels
are named `qmatmul_{fwd,dx}_mgpu`, ncu's `--kernel-name regex:mgpu`), e.g.
'{"block_m": 1, "block_n": 16, "block_k": 128, "num_warps": 1, "split_k":
8, "scale_mode": "weights", "contraction": "fma"}'. Weights are random `--bits` codes in
group-128 asymmetric format (bench_kernels.py's), or NF4 group 64 with
`--bits nf4`; activations random normal bf16. Prints the config and the
relative error against the float32 reference, so a profile is never of a
wrong kernel. `--interpret` runs the Pallas interpreter (CPU tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import bench_kernels  # pylint: disable=g-import-not-at-top
from pallas_kernels import qmatmul as kq  # pylint: disable=g-import-not-at-top
from pallas_kernels import tuning as tuning_lib  # pylint: disable=g-import-not-at-top
from qft_jax._src import qarray as qa  # pylint: disable=g-import-not-at-top


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--op", choices=("fwd", "dx"), default="fwd")
  ap.add_argument("--m", type=int, default=1)
  ap.add_argument("--n", type=int, default=4096)
  ap.add_argument("--k", type=int, default=4096)
  ap.add_argument("--bits", default="4", help="2, 3, 4, 8 or nf4")
  ap.add_argument("--config", default=None,
                  help="TuningConfig fields as JSON, or 'auto' "
                  "(qmatmul's own choice); default: the table's")
  ap.add_argument("--launches", type=int, default=5,
                  help="kernel calls (ncu's --launch-skip picks one)")
  ap.add_argument("--interpret", action="store_true")
  return ap.parse_args(argv)


def tuning_for(args, bits) -> tuning_lib.TuningConfig | None:
  if args.config == "auto":
    return None
  if args.config:
    return tuning_lib.TuningConfig(**json.loads(args.config))
  return tuning_lib.choose(args.op, args.m, args.n, args.k,
                           4 if bits == "nf4" else bits,
                           codebook=bits == "nf4", dtype=jnp.bfloat16)


def main(argv=None) -> dict:
  args = parse_args(argv)
  bits = args.bits if args.bits == "nf4" else int(args.bits)
  cfg = tuning_for(args, bits)
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  w = qa.random_qarray(kw, (args.n, args.k), bench_kernels.quant_config(bits))
  a = jax.random.normal(kx, (args.m, args.k if args.op == "fwd" else args.n),
                        jnp.bfloat16)
  kernel, reference = ((kq.fwd, kq.reference) if args.op == "fwd"
                       else (kq.dx, kq.reference_dx))
  run = jax.jit(lambda a, w: kernel(a, w, tuning=cfg,
                                    interpret=args.interpret))
  for _ in range(args.launches):
    out = run(a, w)
  out.block_until_ready()
  ref = reference(a, w)
  rel_err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref)
                  / jnp.linalg.norm(ref))
  report = dict(op=args.op, M=args.m, N=args.n, K=args.k, bits=args.bits,
                config=dataclasses.asdict(cfg) if cfg else "auto",
                rel_err=rel_err)
  print(json.dumps(report), flush=True)
  if not rel_err <= 1e-2:
    raise SystemExit(f"relative error {rel_err} > 1e-2: wrong kernel")
  return report


if __name__ == "__main__":
  main()
