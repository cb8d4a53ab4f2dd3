"""QArray: packing, RTN error bounds, validation, and pytree behaviour."""

import dataclasses

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qft_jax._src import qarray as qa

SETTINGS = hypothesis.settings(max_examples=25, deadline=None)


@st.composite
def codes_and_bits(draw):
  bits = draw(st.sampled_from(qa.SUPPORTED_BITS))
  rows = draw(st.integers(1, 5))
  k = qa.codes_per_word(bits) * draw(st.integers(1, 12))
  batch = draw(st.sampled_from([(), (2,), (2, 3)]))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 2**bits, size=batch + (rows, k), dtype=np.uint8)
  return codes, bits


@SETTINGS
@hypothesis.given(codes_and_bits())
def test_pack_unpack_identity(case):
  codes, bits = case
  packed = qa.pack(jnp.asarray(codes), bits)
  assert packed.dtype == jnp.uint8
  assert packed.shape[-1] * 8 == codes.shape[-1] * bits  # dense: no waste
  np.testing.assert_array_equal(
      np.asarray(qa.unpack(packed, bits, codes.shape[-1])), codes)


def test_packing_layout_is_planar():
  """Code of column k = i*Kw + j sits in bits [i*b, (i+1)*b) of word j."""
  codes = np.arange(16, dtype=np.uint8)[None] % 4  # 2-bit, K = 16, Kw = 4
  packed = np.asarray(qa.pack(jnp.asarray(codes), 2))
  for j in range(4):
    want = sum(int(codes[0, i * 4 + j]) << (2 * i) for i in range(4))
    assert packed[0, j] == want


@st.composite
def weights_and_config(draw):
  bits = draw(st.sampled_from(qa.SUPPORTED_BITS))
  group = draw(st.sampled_from([8, 16, 32, -1]))
  k = 32 * draw(st.integers(1, 3))
  n = draw(st.integers(1, 6))
  symmetric = draw(st.booleans())
  seed = draw(st.integers(0, 2**31 - 1))
  scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
  w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
  w *= scale
  return w, qa.QuantConfig(bits=bits, group_size=group, symmetric=symmetric)


@SETTINGS
@hypothesis.given(weights_and_config())
def test_rtn_error_bound(case):
  w, config = case
  q = qa.quantize(jnp.asarray(w), config)
  qa.validate(q)
  err = np.abs(np.asarray(qa.dequantize(q)) - w)
  scale = np.repeat(np.asarray(q.scale), q.group_size, axis=-1)
  if config.symmetric:
    # absmax maps to the largest positive code: rounding error only.
    bound = scale / 2
  else:
    # Range includes 0 and the integer zero point shifts the grid by at most
    # scale/2, which can clip a range end by another scale/2.
    bound = scale
  assert np.all(err <= bound * (1 + 1e-5) + 1e-7), float(np.max(err / bound))
  # Inside the grid (not clipped) the rounding error is at most scale / 2.
  if not config.symmetric:
    z = np.repeat(np.asarray(q.zero_point, np.float32), q.group_size, -1)
    x = w / scale + z
    inside = (x >= 0) & (x <= 2**config.bits - 1)
    assert np.all(err[inside] <= scale[inside] / 2 * (1 + 1e-5) + 1e-7)


def test_nf4_dequantizes_to_codebook_levels():
  w = jax.random.normal(jax.random.PRNGKey(1), (8, 128))
  q = qa.quantize(w, qa.QuantConfig(bits=4, group_size=64, codebook="nf4"))
  qa.validate(q)
  assert q.zero_point is None
  levels = np.asarray(qa.NF4_LEVELS)
  s = np.repeat(np.asarray(q.scale), 64, axis=-1)
  ratio = np.asarray(qa.dequantize(q)) / s
  assert np.all(np.min(np.abs(ratio[..., None] - levels), -1) < 1e-6)
  # Each value snaps to its nearest level: error <= half the largest gap.
  gap = np.max(np.diff(levels))
  assert np.all(np.abs(np.asarray(w) - np.asarray(qa.dequantize(q)))
                <= s * gap / 2 + 1e-6)


def test_eight_bit_is_accurate():
  w = jax.random.normal(jax.random.PRNGKey(2), (16, 256))
  q = qa.quantize(w, qa.QuantConfig(bits=8, group_size=64))
  rel = jnp.linalg.norm(qa.dequantize(q) - w) / jnp.linalg.norm(w)
  assert rel < 1e-2  # uniform rounding: (range / 255) / sqrt(12) ~ 0.006


def test_round_half_to_even_and_zero_group():
  w = jnp.zeros((2, 64)).at[0, :32].set(jnp.linspace(-1.0, 1.0, 32))
  q = qa.quantize(w, qa.QuantConfig(bits=4, group_size=32))
  out = np.asarray(qa.dequantize(q))
  np.testing.assert_array_equal(out[1], 0.0)  # zero groups stay exactly 0
  np.testing.assert_array_equal(out[0, 32:], 0.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=5), "unsupported bit width 5"),
    (dict(bits=1), "unsupported bit width 1"),
    (dict(group_size=0), "group size must be positive"),
    (dict(codebook="nf3"), "unknown codebook"),
    (dict(bits=3, codebook="nf4"), "does not match bits=3"),
])
def test_bad_config(kwargs, message):
  with pytest.raises(ValueError, match=message):
    qa.QuantConfig(**kwargs)


def test_bad_inputs():
  with pytest.raises(ValueError, match="does not divide the input dimension"):
    qa.quantize(jnp.ones((4, 96)), qa.QuantConfig(bits=4, group_size=64))
  with pytest.raises(ValueError, match="rank >= 2"):
    qa.quantize(jnp.ones((64,)), qa.QuantConfig())
  with pytest.raises(ValueError, match="not a multiple of 8"):
    qa.quantize(jnp.ones((4, 12)), qa.QuantConfig(bits=3, group_size=-1))
  with pytest.raises(ValueError, match="float array"):
    qa.quantize(jnp.ones((4, 64), jnp.int32), qa.QuantConfig())


def test_validate_catches_inconsistencies():
  q = qa.quantize(jnp.ones((4, 64)), qa.QuantConfig(bits=4, group_size=32))
  with pytest.raises(ValueError, match="qvalue has shape"):
    qa.validate(dataclasses.replace(q, qvalue=q.qvalue[:, :-1]))
  with pytest.raises(ValueError, match="scale has shape"):
    qa.validate(dataclasses.replace(q, scale=q.scale[:, :1]))
  with pytest.raises(ValueError, match="qvalue must be uint8"):
    qa.validate(dataclasses.replace(q, qvalue=q.qvalue.astype(jnp.int32)))
  with pytest.raises(ValueError, match="expected a QArray"):
    qa.validate(jnp.ones(3))


def test_pytree_transforms_and_stacking():
  cfg = qa.QuantConfig(bits=3, group_size=16)
  ws = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 64))
  stacked = qa.quantize(ws, cfg)  # leading layer axis
  qa.validate(stacked)
  assert stacked.batch_shape == (4,) and stacked.shape == (8, 64)
  per_layer = jax.vmap(qa.dequantize)(stacked)
  np.testing.assert_allclose(per_layer, qa.dequantize(stacked))
  jitted = jax.jit(lambda q: q)(stacked)
  assert jitted.bits == 3 and jitted.shape == (8, 64)

  def body(carry, q):
    qa.validate(q)
    return carry + qa.dequantize(q).sum(), None

  total, _ = jax.lax.scan(body, 0.0, stacked)
  np.testing.assert_allclose(total, qa.dequantize(stacked).sum(), rtol=1e-5)
  for i in range(4):
    one = jax.tree.map(lambda x, i=i: x[i], stacked)
    np.testing.assert_array_equal(
        qa.dequantize(one), qa.dequantize(qa.quantize(ws[i], cfg)))


def test_orbax_roundtrip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  q = qa.quantize(jax.random.normal(jax.random.PRNGKey(4), (2, 8, 64)),
                  qa.QuantConfig(bits=2, group_size=32))
  tree = {"layer": {"kernel": q}}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", tree)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "ckpt", jax.eval_shape(lambda: tree))
  r = restored["layer"]["kernel"]
  assert isinstance(r, qa.QArray) and r.bits == 2 and r.group_size == 32
  np.testing.assert_array_equal(r.qvalue, q.qvalue)
  np.testing.assert_array_equal(r.scale, q.scale)
  np.testing.assert_array_equal(r.zero_point, q.zero_point)


def test_random_qarray_is_valid_without_float_weights():
  for cfg in [qa.QuantConfig(bits=b) for b in qa.SUPPORTED_BITS] + [
      qa.QuantConfig(bits=4, codebook="nf4"),
      qa.QuantConfig(bits=8, group_size=-1, symmetric=True)]:
    q = qa.random_qarray(jax.random.PRNGKey(0), (3, 16, 128), cfg)
    qa.validate(q)
    assert bool(jnp.all(jnp.isfinite(qa.dequantize(q))))
    spec = qa.abstract_qarray((3, 16, 128), cfg)
    assert jax.tree.map(lambda a: a.shape, spec) == jax.tree.map(
        lambda a: a.shape, q)
