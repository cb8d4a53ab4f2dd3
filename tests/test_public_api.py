"""The public surface: every exported name exists and the README snippet runs."""

import jax
import jax.numpy as jnp
import numpy as np

import qft_jax as qj


def test_all_names_resolve():
  assert len(set(qj.__all__)) == len(qj.__all__)
  for name in qj.__all__:
    assert getattr(qj, name) is not None, name


def test_readme_example():
  w = jax.random.normal(jax.random.PRNGKey(0), (256, 512))
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 512))
  q = qj.quantize(w, qj.QuantConfig(bits=4, group_size=64))
  y = qj.qdot(x, q)
  ref = x @ qj.dequantize(q).T
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
  tx = qj.lion_int8(1e-4)
  state = tx.init({"w": jnp.zeros((4, 256))})
  assert state[0].mu["w"].dtype == jnp.int8
