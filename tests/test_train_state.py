"""Building the training state: the weights are not copied."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qft_jax._src import methods
from qft_jax._src import train


def test_jit_init_state_reuses_the_params_buffers():
  key = jax.random.PRNGKey(0)
  params = {"w": jax.random.normal(key, (64, 96)), "b": jnp.zeros((96,))}
  expected = np.asarray(params["w"])
  method = methods.make_method(methods.MethodConfig(name="full"), params)
  build = train.jit_init_state(method, optax.adam(1e-3), seed=3)
  analysis = build.lower(params).compile().memory_analysis()
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  # Every params buffer is an input/output alias: no second copy.
  assert analysis.alias_size_in_bytes >= param_bytes
  state = build(params)
  np.testing.assert_array_equal(state.params["w"], expected)
  assert int(state.step) == 0
  np.testing.assert_array_equal(state.rng, jax.random.PRNGKey(3))
