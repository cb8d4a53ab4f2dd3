"""experiments/check_pallas_training.py's logic on the CPU (interpreter)."""

import pathlib
import sys

import pytest

from conftest import shared_path

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import pallas_vs_xla as check  # pylint: disable=g-import-not-at-top
from pallas_kernels import qmatmul as kernels  # pylint: disable=g-import-not-at-top


def test_qlora_training_through_the_interpreted_kernels(monkeypatch):
  text = str(shared_path("text", "tinyshakespeare_input.txt"))
  calls = {"fwd": 0, "dx": 0}
  for name in calls:
    real = getattr(kernels, name)

    def counted(*args, _real=real, _name=name, **kwargs):
      calls[_name] += 1
      assert kwargs.get("interpret")
      return _real(*args, **kwargs)

    monkeypatch.setattr(kernels, name, counted)
  finished = []
  rec = check.run(tiny=True, steps=4, layers=2, batch=2, seq_len=32,
                  lr=1e-3, tol=1e-2, text=text,
                  on_run=lambda done: finished.append(sorted(done["loss"])))
  assert finished == [["xla"], ["pallas_interpret", "xla"],
                      ["pallas_interpret", "xla", "xla_noise"],
                      ["pallas_interpret", "pallas_interpret_noise", "xla",
                       "xla_noise"]]
  # 7 projections x (scanned layer body) traced for forward and backward.
  assert calls["fwd"] >= 7 and calls["dx"] >= 7, calls
  assert rec["match"] and rec["finite"], rec["rel_diff"]
  assert 0 < rec["grad_rel_err"] < 1e-2
  assert len(rec["loss_xla_noise"]) == 4 and rec["loss_xla_noise"] != rec[
      "loss_xla"]  # the one-ulp start is a different run
  assert rec["pallas_implementation"] == "pallas_interpret"
  assert len(rec["loss_xla"]) == len(rec["loss_pallas"]) == 4
  assert rec["loss_xla"][-1] < rec["loss_xla"][0]  # it trains
  assert rec["loss_xla"] != rec["loss_pallas"]  # two different paths
  assert rec["loss_pallas_noise"] not in (rec["loss_pallas"],
                                          rec["loss_xla_noise"])
  assert abs(rec["noise_pair_mean_signed_rel_diff"]) <= rec[
      "noise_pair_max_rel_diff"]


def test_verdict_bound_and_refusals():
  same = check.compare([2.0, 1.0], [2.0, 1.0])
  off = check.compare([2.0, 1.0], [2.0, 1.05])  # 5 % at step 1
  small_noise = check.compare([2.0, 1.0], [2.0, 1.001])
  big_noise = check.compare([2.0, 1.0], [2.0, 1.04])
  assert check.verdict(off, small_noise, 1e-3, 1e-2, 1e-2)["match"] is False
  # Twice a 4 % noise floor covers a 5 % difference.
  got = check.verdict(off, big_noise, 1e-3, 1e-2, 1e-2)
  assert got["match"] is True and abs(got["bound"] - 0.08) < 1e-9
  # A wrong first gradient fails whatever the curves do.
  assert check.verdict(same, same, 0.5, 1e-2, 1e-2)["match"] is False
  below = check.compare([2.0, 1.0], [1.9, 1.05])  # -5 %, then +5 %
  assert abs(below["mean_signed_rel_diff"]) < 1e-12
  assert abs(off["mean_signed_rel_diff"] - 0.025) < 1e-12
  nan = check.compare([2.0, float("nan")], [2.0, float("nan")])
  assert nan["finite"] is False
  assert check.verdict(nan, same, 1e-3, 1e-2, 1e-2)["match"] is False


def test_one_ulp_perturbation_moves_every_float_by_one_ulp():
  import jax
  import jax.numpy as jnp
  import numpy as np
  tree = {"a": jnp.linspace(-1, 1, 64, dtype=jnp.bfloat16),
          "codes": jnp.arange(4, dtype=jnp.uint8)}
  got = check.one_ulp_perturbation(tree, jax.random.PRNGKey(0), jnp.bfloat16)
  assert (got["codes"] == tree["codes"]).all()
  a = np.asarray(tree["a"].astype(jnp.float32))
  b = np.asarray(got["a"].astype(jnp.float32))
  up = np.asarray(jnp.nextafter(tree["a"], jnp.bfloat16(np.inf)), np.float32)
  down = np.asarray(jnp.nextafter(tree["a"], jnp.bfloat16(-np.inf)),
                    np.float32)
  assert ((b == up) | (b == down)).all() and (b != a).all()
  assert 0 < (b > a).mean() < 1  # both directions occur
  # float32 leaves move by the compute dtype's ulp, not their own.
  f32 = {"a": jnp.asarray(tree["a"], jnp.float32)}
  moved = check.one_ulp_perturbation(f32, jax.random.PRNGKey(0), jnp.bfloat16)
  assert (moved["a"].astype(jnp.bfloat16) != tree["a"]).all()


def test_missing_text_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    check.byte_batches(str(tmp_path / "nope.txt"), 1, 2, 8)


def test_resume_skips_the_finished_runs_and_refuses_another_setup(
    monkeypatch):
  """A check cut after two runs resumes from what `on_run` saved: the two
  runs are not trained again (only their first gradients recomputed), and
  the record equals a check's on those curves."""
  text = str(shared_path("text", "tinyshakespeare_input.txt"))
  args = dict(tiny=True, steps=2, layers=1, batch=2, seq_len=32, lr=1e-3,
              tol=1e-2, text=text, quant="int4")
  saved = []

  def cut_after_two(done):
    saved.append(done)
    if len(done["loss"]) == 2:
      raise TimeoutError("the call's time limit")

  with pytest.raises(TimeoutError):
    check.run(**args, on_run=cut_after_two)
  done = saved[-1]
  assert sorted(done["loss"]) == ["pallas_interpret", "xla"]
  assert list(done["grad_errs"]) == ["grad_rel_err"]
  trained, recomputed = [], []
  for name, log in (("train_curve", trained), ("first_gradient", recomputed)):
    real = getattr(check, name)
    monkeypatch.setattr(check, name, lambda *a, _real=real, _log=log, **k: (
        _log.append(a[1] + ("_noise" if k.get("perturb") else "")),
        _real(*a, **k))[1])
  rec = check.run(**args, done=done)
  assert trained == ["xla_noise", "pallas_interpret_noise"]
  # Only XLA's start is needed again (for the noise comparison).
  assert recomputed == ["xla"]
  assert rec["grad_rel_err"] == done["grad_errs"]["grad_rel_err"]
  assert rec["loss_xla"] == done["loss"]["xla"]
  assert rec["step_s_xla"] == done["step_s"]["xla"]
  assert rec["quant"] == "int4" and 0 < rec["grad_rel_err"] < 1e-2
  with pytest.raises(ValueError, match="made with"):
    check.run(**dict(args, steps=3), done=done)
