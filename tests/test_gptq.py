"""GPTQ: against an independent float64 port of the reference algorithm,
below RTN's proxy loss, RTN layout under act-order, and bad input."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from qft_jax._src import qarray as qa
from qft_jax._src.quantizers import gptq
from qft_jax._src.quantizers import protocol


def reference_gptq(w, h, bits, group_size, block=128, damp=0.01,
                   act_order=False):
  """Float64 numpy port of IST-DASLab/gptq `GPTQ.fasterquant` (min-max
  asymmetric quantizer, params of a group read from the running weight when
  the group starts, per-channel params read once up front)."""
  w = np.array(w, np.float64)
  h = np.array(h, np.float64)
  k = w.shape[1]
  qmax = 2**bits - 1

  def params(x):
    lo = np.minimum(x.min(1), 0)
    hi = np.maximum(x.max(1), 0)
    scale = (hi - lo) / qmax
    return scale, np.round(-lo / scale)

  if group_size == -1:
    scale, zero = params(w)
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
  w, h = w[:, perm], h[perm][:, perm]
  h += damp * np.mean(np.diag(h)) * np.eye(k)
  hinv = np.linalg.cholesky(np.linalg.inv(h)).T
  q = np.zeros_like(w)
  for i1 in range(0, k, block):
    i2 = min(i1 + block, k)
    w1 = w[:, i1:i2].copy()
    err1 = np.zeros_like(w1)
    for i in range(i2 - i1):
      col = w1[:, i]
      if group_size != -1 and (i1 + i) % group_size == 0:
        scale, zero = params(w[:, i1 + i:i1 + i + group_size])
      qc = (np.clip(np.round(col / scale) + zero, 0, qmax) - zero) * scale
      q[:, i1 + i] = qc
      e = (col - qc) / hinv[i1 + i, i1 + i]
      w1[:, i:] -= np.outer(e, hinv[i1 + i, i1 + i:i2])
      err1[:, i] = e
    w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
  return q[:, np.argsort(perm)]


def correlated_inputs(seed, n, k):
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((k, k)) / np.sqrt(k)
  x = rng.standard_normal((n, k)) @ mix + 0.5 * rng.standard_normal((1, k))
  return x.astype(np.float32)


@pytest.fixture(scope="module")
def layer():
  rng = np.random.default_rng(0)
  w = (0.05 * rng.standard_normal((48, 256))).astype(np.float32)
  stats = protocol.layer_stats(jnp.asarray(correlated_inputs(1, 1024, 256)))
  return w, stats


def test_layer_stats_is_twice_the_second_moment():
  x = correlated_inputs(2, 100, 16)
  stats = protocol.layer_stats(jnp.asarray(x).reshape(4, 25, 16))
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(np.asarray(stats.hessian),
                             2 * x64.T @ x64 / 100, rtol=1e-5, atol=1e-6)
  assert stats.num_tokens == 100


@pytest.mark.parametrize("group_size,act_order", [(-1, False), (128, False),
                                                  (-1, True)])
def test_matches_reference_port(layer, group_size, act_order):
  w, stats = layer
  cfg = gptq.GPTQConfig(bits=3, group_size=group_size, act_order=act_order)
  got = np.asarray(qa.dequantize(gptq.gptq_quantize(w, stats.hessian, cfg)))
  want = reference_gptq(w, stats.hessian, 3, group_size, act_order=act_order)
  h = np.asarray(stats.hessian, np.float64)
  loss = lambda wh: np.sum(((wh - w) @ h) * (wh - w))
  # float32 vs float64 rounding flips a few codes; the objective agrees.
  assert np.mean(np.isclose(got, want, atol=1e-6)) > 0.97
  assert loss(got) == pytest.approx(loss(want), rel=0.02)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_proxy_loss_below_rtn(layer, bits):
  w, stats = layer
  for act_order in (False, True):
    cfg = gptq.GPTQConfig(bits=bits, group_size=64, act_order=act_order)
    q = gptq.gptq_quantize(w, stats.hessian, cfg)
    qa.validate(q)
    rtn = qa.quantize(jnp.asarray(w), cfg.quant_config)
    got = protocol.proxy_loss(w, qa.dequantize(q), stats.hessian)
    base = protocol.proxy_loss(w, qa.dequantize(rtn), stats.hessian)
    assert float(got) < 0.8 * float(base), (bits, act_order)


def test_uncoupled_hessian_reduces_to_rtn_in_rtn_layout():
  """A diagonal H propagates no error, so GPTQ must return RTN's codes, also
  under act-order (columns visited out of order, groups and layout kept)."""
  rng = np.random.default_rng(3)
  w = rng.standard_normal((16, 128)).astype(np.float32)
  h = jnp.diag(jnp.asarray(rng.uniform(0.1, 5.0, 128), jnp.float32))
  rtn = qa.quantize(jnp.asarray(w), qa.QuantConfig(bits=4, group_size=32))
  for act_order in (False, True):
    q = gptq.gptq_quantize(w, h, gptq.GPTQConfig(bits=4, group_size=32,
                                                  act_order=act_order))
    assert (q.bits, q.group_size, q.shape) == (4, 32, (16, 128))
    np.testing.assert_array_equal(qa.as_numpy_codes(q),
                                  qa.as_numpy_codes(rtn))
    np.testing.assert_allclose(np.asarray(q.scale), np.asarray(rtn.scale),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.zero_point),
                                  np.asarray(rtn.zero_point))


def test_symmetric_and_quantizer_protocol(layer):
  w, stats = layer
  quantizer = gptq.GPTQ(gptq.GPTQConfig(bits=4, symmetric=True))
  assert isinstance(quantizer, protocol.Quantizer)
  assert quantizer.needs_calibration
  q = quantizer(jnp.asarray(w), stats)
  assert q.zero_point is None
  rtn = qa.quantize(jnp.asarray(w), qa.QuantConfig(bits=4, symmetric=True))
  assert float(protocol.proxy_loss(w, qa.dequantize(q), stats.hessian)) < (
      float(protocol.proxy_loss(w, qa.dequantize(rtn), stats.hessian)))
  with pytest.raises(ValueError, match="needs calibration"):
    quantizer(jnp.asarray(w))


def test_dead_inputs_and_rank_deficient_hessian():
  """Few samples (rank < K) and all-zero inputs: finite output, dead columns
  quantize to zero."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((8, 64)).astype(np.float32)
  x[:, :5] = 0
  w = rng.standard_normal((8, 64)).astype(np.float32)
  stats = protocol.layer_stats(jnp.asarray(x))
  q = gptq.gptq_quantize(w, stats.hessian, gptq.GPTQConfig(bits=2))
  wh = np.asarray(qa.dequantize(q))
  assert np.all(np.isfinite(wh))
  np.testing.assert_allclose(wh[:, :5], 0, atol=1e-6)


def test_non_positive_definite_fallback_and_error(caplog):
  rng = np.random.default_rng(5)
  w = rng.standard_normal((8, 32)).astype(np.float32)
  # Eigenvalues 1..2 and one at -0.05 * mean(diag): damping 0.01 is not
  # enough, 0.1 is (the documented fallback multiplies it by 10).
  basis, _ = np.linalg.qr(rng.standard_normal((32, 32)))
  eig = np.linspace(1, 2, 32)
  eig[0] = -0.05 * eig[1:].sum() / 32
  h = (basis * eig) @ basis.T
  with caplog.at_level(logging.WARNING):
    _, _, _, used = gptq.prepare_hessian(w, h, gptq.GPTQConfig())
    q = gptq.gptq_quantize(w, h, gptq.GPTQConfig(bits=3, group_size=32))
  assert used == pytest.approx(0.1)
  assert "not positive definite" in caplog.text
  assert np.all(np.isfinite(np.asarray(qa.dequantize(q))))
  # Strongly indefinite: no damping up to max_damp helps -> clear error.
  with pytest.raises(ValueError, match="not positive definite"):
    gptq.gptq_quantize(w, -np.eye(32, dtype=np.float32) + 0.01 * h,
                       gptq.GPTQConfig(bits=3, group_size=32))
  bad = np.array(h, np.float32)
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    gptq.gptq_quantize(w, bad, gptq.GPTQConfig(bits=3, group_size=32))


def test_bad_configs():
  with pytest.raises(ValueError, match="unsupported bit width"):
    gptq.GPTQConfig(bits=5)
  with pytest.raises(ValueError, match="does not divide"):
    gptq.gptq_quantize(np.ones((4, 96), np.float32), np.eye(96),
                       gptq.GPTQConfig(group_size=64))
  with pytest.raises(ValueError, match="hessian has shape"):
    gptq.gptq_quantize(np.ones((4, 64), np.float32), np.eye(32))
  with pytest.raises(ValueError, match="multiple of 8"):
    gptq.gptq_quantize(np.ones((4, 60), np.float32), np.eye(60),
                       gptq.GPTQConfig(bits=3, group_size=-1))



def test_static_groups_keep_the_rtn_grid(layer):
  w, stats = layer
  cfg = gptq.GPTQConfig(bits=3, group_size=64, static_groups=True,
                        act_order=True)
  q = gptq.gptq_quantize(w, stats.hessian, cfg)
  rtn = qa.quantize(jnp.asarray(w), cfg.quant_config)
  np.testing.assert_allclose(np.asarray(q.scale), np.asarray(rtn.scale))
  np.testing.assert_array_equal(np.asarray(q.zero_point),
                                np.asarray(rtn.zero_point))
  assert float(protocol.proxy_loss(w, qa.dequantize(q), stats.hessian)) < (
      float(protocol.proxy_loss(w, qa.dequantize(rtn), stats.hessian)))
