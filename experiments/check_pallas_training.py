r"""4-bit LoRA training through the Pallas kernels against the XLA path.

  python experiments/check_pallas_training.py --out=$OUT             # GPU
  python experiments/check_pallas_training.py --tiny --out=/tmp/chk  # CPU

Each finished run is saved to `--out`'s pallas_training_partial.json;
`--resume` skips the runs it holds. At the 7B shape the four runs take
about 850 s on an H100 (session 11, `--quant=int4`), more than one device
call's 600 s: start it, then run it again with `--resume` (carrying that
file back in `--out`).

Builds one model of the LLaMA-7B shape (random weights; `--layers` decoder
layers; NF4 group-64 base with double-quantized scales and LoRA r16 on all
seven projections, as bench_models.py's "qlora" row; `--quant=int4`: a
uniform 4-bit group-64 base instead, which on Hopper runs the Mosaic GPU
kernels) and trains its LoRA
factors four times on the same batches of
TinyShakespeare bytes (token id = byte): with every quantized matmul,
forward and input gradient, through XLA's dequantize-then-matmul
(`matmul_implementation="xla"`); through the Pallas kernels ("pallas", which
raises if any layer's kernel refuses; `--tiny` runs them in the Pallas
interpreter on any backend); and through XLA again from a start whose LoRA
factors are each moved by one ulp (the noise floor: how far one rounding
decision alone carries the curve); and through Pallas from that perturbed
start (a second pair: an offset with the same sign in both pairs,
`mean_signed_rel_diff` and `noise_pair_mean_signed_rel_diff`, comes from
the kernels' rounding, not from chance). Writes
`pallas_training_<gpu>_<date>.json`: the four loss curves, the per-step
relative differences `|loss - loss_xla| / loss_xla`, the relative error of
the first batch's gradient (Pallas vs XLA), the median step times, and
`match`: finite, gradient error <= `--grad_tol`, and every step's loss
within `max(--tol, 2 x the noise run's largest difference)` of XLA's.

Every step of the runs sees the same batch, so the curves differ only by
rounding (the Pallas path accumulates in another order and applies some
group scales in float32), which the optimizer then carries forward: Adam's
first steps move every coordinate by about the learning rate whatever the
gradient's size, so rounding-level gradient differences grow into visible
loss differences. The noise run measures that growth instead of guessing it.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import pallas_vs_xla  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", "/tmp/check_pallas_training",
                           "Output folder.")
_TEXT = flags.DEFINE_string(
    "text", str(REPO.parent / "shared" / "data" / "text"
                / "tinyshakespeare_input.txt"), "Training text (bytes).")
_STEPS = flags.DEFINE_integer("steps", 50, "Training steps per run.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder layers (7B shape).")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
_LR = flags.DEFINE_float("learning_rate", 2e-4,
                          "AdamW learning rate (the LoRA presets' 2e-4).")
_TOL = flags.DEFINE_float(
    "tol", 1e-2, "Relative loss difference always accepted (the bound is "
    "the larger of this and twice the noise run's).")
_GRAD_TOL = flags.DEFINE_float(
    "grad_tol", 1e-2, "Largest relative error of the first gradient.")
_QUANT = flags.DEFINE_enum(
    "quant", "nf4", sorted(pallas_vs_xla.QUANTS),
    "The frozen base: QLoRA's NF4 (the Triton kernels) or uniform int4 "
    "(on Hopper with jax >= 0.11, the Mosaic GPU kernels at these shapes).")
_RESUME = flags.DEFINE_bool(
    "resume", False, "Skip the runs that --out's pallas_training_partial.json "
    "(written after each run) holds, e.g. after a time limit cut the check.")
_TINY = flags.DEFINE_bool(
    "tiny", False, "Tiny shapes and the Pallas interpreter (CPU check).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  partial = out / "pallas_training_partial.json"

  def save_partial(finished):  # kept if a time limit cuts the later runs
    tmp = partial.with_suffix(".tmp")
    tmp.write_text(json.dumps(finished) + "\n")
    tmp.replace(partial)  # never a half-written file

  done = None
  if _RESUME.value and partial.exists():
    try:
      done = json.loads(partial.read_text())
    except json.JSONDecodeError as e:
      raise app.UsageError(f"{partial} is not valid JSON ({e}); remove it "
                           "to start the check over") from e
    print(f"resuming: {sorted(done.get('loss', {}))} finished", flush=True)
  elif _RESUME.value:
    print(f"no {partial} to resume from: starting the check", flush=True)
  record = pallas_vs_xla.run(_TINY.value, _STEPS.value, _LAYERS.value,
                             _BATCH.value, _SEQ.value, _LR.value, _TOL.value,
                             _TEXT.value, _GRAD_TOL.value,
                             on_run=save_partial, quant=_QUANT.value,
                             done=done)
  partial.unlink(missing_ok=True)
  gpu = record["gpu"].split()[1].lower() if " " in record["gpu"] else (
      record["gpu"].lower())
  suffix = "" if _QUANT.value == "nf4" else f"_{_QUANT.value}"
  path = out / f"pallas_training{suffix}_{gpu}_{record['date']}.json"
  path.write_text(json.dumps(record, indent=1) + "\n")
  print(json.dumps({k: record[k] for k in (
      "max_rel_diff", "noise_max_rel_diff", "bound", "grad_rel_err",
      "mean_signed_rel_diff", "noise_mean_signed_rel_diff",
      "noise_pair_mean_signed_rel_diff", "match", "step_s_xla",
      "step_s_pallas")}))
  print(f"wrote {path}")
  if not record["match"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
