"""experiments/decode_breakdown.py's per-kernel aggregation on the CPU, with
the CUPTI profiler replaced by canned timings (the script itself needs a
GPU)."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import decode_breakdown  # pylint: disable=g-import-not-at-top


def test_per_kernel_us_sums_names_then_takes_medians(monkeypatch):
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
  # 3 iterations of a call that launches the fused kernel twice (two
  # weight copies) and the reduction twice; milliseconds.
  iters = [[("fused", 0.007), ("reduce", 0.001), ("fused", 0.009),
            ("reduce", 0.003)],
           [("fused", 0.006), ("reduce", 0.001), ("fused", 0.006),
            ("reduce", 0.001)],
           [("fused", 0.008), ("reduce", 0.002), ("fused", 0.008),
            ("reduce", 0.002)]]

  def fake_measure(f, *, aggregate, iterations):
    assert not aggregate and iterations == 3
    return lambda *args: (f(*args), iters)

  monkeypatch.setattr(profiler, "measure", fake_measure)
  got = decode_breakdown.per_kernel_us(lambda a: a + 1, (jnp.ones(3),),
                                       calls=2, iters=3)
  # per-iteration sums: fused 16, 12, 16 us; reduce 4, 2, 4 us
  assert got == pytest.approx({"fused": 16.0 / 2, "reduce": 4.0 / 2})
  compiled = jax.jit(lambda a: a + 1).lower(jnp.ones(3)).compile()
  again = decode_breakdown.per_kernel_us(compiled, (jnp.ones(3),), calls=2,
                                         iters=3)
  assert again == got
