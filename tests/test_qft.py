"""QFT integer weights: decomposition, forward/probe gradient, requantizing
update (unbiased, learns where round-to-nearest stalls), outliers, shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qft_jax._src import qarray as qa
from qft_jax._src import qmatmul
from qft_jax._src.models import llama
from qft_jax._src.optim import lion_int8 as li
from qft_jax._src.optim import qft

HIGHEST = jax.lax.Precision.HIGHEST


def _weight(shape=(2, 24, 64), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_quantize_keeps_top_entries_exact_and_rest_within_half_step():
  w = _weight()
  q = qft.qft_quantize(w, outlier_fraction=0.01)
  n_out = int(np.ceil(0.01 * 24 * 64))
  assert q.outlier_index.shape == (2, n_out) and q.outlier_index.dtype == jnp.int32
  assert q.dense.qvalue.dtype == jnp.uint8 and q.dense.bits == 8
  qa.validate(q.dense)
  wn, wd = np.asarray(w).reshape(2, -1), np.asarray(qft.qft_dequantize(q))
  wd = wd.reshape(2, -1)
  for b in range(2):
    top = set(np.argsort(-np.abs(wn[b]))[:n_out])
    assert set(np.asarray(q.outlier_index[b])) == top
    idx = np.asarray(q.outlier_index[b])
    np.testing.assert_array_equal(wd[b, idx], wn[b, idx])
    # Dense codes are the zero code at outlier positions.
    assert np.all(np.asarray(qa.codes(q.dense)).reshape(2, -1)[b, idx] == 128)
  half = np.repeat(np.asarray(q.dense.scale), 64, -1).reshape(2, -1) / 2
  assert np.all(np.abs(wd - wn) <= half * (1 + 1e-6))


def test_linear_and_probe_gradient_match_float_reference():
  q = jax.tree.map(lambda a: a[0], qft.qft_quantize(_weight(), 0.02))
  w = qft.qft_dequantize(q)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 64))
  cot = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 24))
  ref = jnp.einsum("...k,nk->...n", x, w, precision=HIGHEST)
  np.testing.assert_allclose(qmatmul.linear(x, q), ref, rtol=1e-5, atol=1e-5)

  def ours(probe, x):
    return jnp.sum(qmatmul.linear(x, qft.QFTWithProbe(q, probe)) * cot)

  def float_ref(w, x):
    return jnp.sum(jnp.einsum("...k,nk->...n", x, w, precision=HIGHEST) * cot)

  gp, gx = jax.grad(ours, argnums=(0, 1))(jnp.zeros((24, 64)), x)
  gw_ref, gx_ref = jax.grad(float_ref, argnums=(0, 1))(w, x)
  np.testing.assert_allclose(gp, gw_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-4)


def test_stochastic_requantization_is_unbiased():
  q = qft.qft_quantize(_weight((8, 32)), outlier_fraction=0.0)
  s = np.asarray(q.dense.scale)                       # (8, 1)
  u = jax.random.uniform(jax.random.PRNGKey(3), (8, 32), minval=-1.5,
                         maxval=1.5) * s             # mostly below a step
  keys = jax.random.split(jax.random.PRNGKey(4), 4000)
  outs = jax.vmap(lambda k: qft.qft_dequantize(
      qft.qft_apply_updates(q, u, k)[0]))(keys)
  target = qft.qft_dequantize(q) + u
  err = np.asarray(outs.mean(0) - target) / s
  # Unbiased inside the representable range [-128, 127] * s (row absmax sits
  # at +-127, so pushes beyond it clip).
  x = np.asarray(target) / s
  inside = (x <= 127) & (x >= -128)
  assert inside.mean() > 0.9
  assert np.abs(err[inside]).max() < 0.05, np.abs(err[inside]).max()
  # Round-to-nearest is biased: sub-half-step updates vanish.
  rtn = qft.qft_dequantize(qft.qft_apply_updates(
      q, u, keys[0], rounding="nearest")[0])
  small = np.abs(np.asarray(u) / s) < 0.5
  np.testing.assert_array_equal(np.asarray(rtn)[small],
                                np.asarray(qft.qft_dequantize(q))[small])


def test_outliers_take_float_updates_exactly():
  q = qft.qft_quantize(_weight(), outlier_fraction=0.02)
  u = jax.random.normal(jax.random.PRNGKey(5), (2, 24, 64)) * 1e-3
  new, _ = qft.qft_apply_updates(q, u, jax.random.PRNGKey(6))
  np.testing.assert_array_equal(new.outlier_index, q.outlier_index)
  u_at = np.take_along_axis(np.asarray(u).reshape(2, -1),
                            np.asarray(q.outlier_index), -1)
  np.testing.assert_array_equal(new.outlier_value,
                                np.asarray(q.outlier_value) + u_at)
  codes = np.asarray(qa.codes(new.dense)).reshape(2, -1)
  assert np.all(np.take_along_axis(codes, np.asarray(q.outlier_index), -1)
                == 128)
  np.testing.assert_array_equal(new.dense.scale, q.dense.scale)


def test_changed_fraction_and_static_shapes_under_jit():
  params = {"w": qft.qft_quantize(_weight(), 0.01), "norm": jnp.ones(4)}
  traces = []

  @jax.jit
  def apply(p, u, key):
    traces.append(1)
    return qft.qft_apply_updates(p, u, key)

  u = {"w": jnp.full((2, 24, 64), 0.3) * params["w"].dense.scale,
       "norm": jnp.full(4, 0.5)}
  p = params
  for t in range(3):
    new, frac = apply(p, u, jax.random.PRNGKey(t))
    changed = np.asarray(qa.codes(new["w"].dense)) != np.asarray(
        qa.codes(p["w"].dense))
    np.testing.assert_allclose(frac, changed.mean(), rtol=1e-6)
    assert 0.1 < float(frac) < 0.5          # about 30 % move up one code
    assert (jax.tree.map(lambda x: (x.shape, x.dtype), new)
            == jax.tree.map(lambda x: (x.shape, x.dtype), params))
    p = new
  np.testing.assert_allclose(p["norm"], 2.5)
  assert len(traces) == 1
  with pytest.raises(ValueError, match="rounding"):
    qft.qft_apply_updates(params, u, jax.random.PRNGKey(0), rounding="floor")


def _regression(rounding, steps=150):
  """Lion on a QFT layer with lr = 0.2 of the smallest quantization step."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
  w_star = jax.random.normal(k1, (16, 64)) * 0.1
  q = qft.qft_quantize(w_star, outlier_fraction=0.0)
  s = np.asarray(q.dense.scale)
  w0 = w_star + jax.random.normal(k2, w_star.shape) * 4 * s
  w = qft.qft_quantize(w0, outlier_fraction=0.0)
  lr = 0.2 * float(np.asarray(w.dense.scale).min())
  x = jax.random.normal(k3, (256, 64))
  y = x @ w_star.T

  def loss(w, probe):
    return jnp.mean((qmatmul.linear(x, qft.QFTWithProbe(w, probe)) - y) ** 2)

  tx = optax.chain(li.scale_by_lion_int8(), optax.scale_by_learning_rate(lr))
  state = tx.init(jnp.zeros((16, 64)))

  @jax.jit
  def step(w, state, key):
    l, g = jax.value_and_grad(loss, argnums=1)(w, jnp.zeros((16, 64)))
    u, state = tx.update(g, state)
    w, frac = qft.qft_apply_updates(w, u, key, rounding=rounding)
    return w, state, l, frac

  losses, fracs = [], []
  for t in range(steps):
    w, state, l, frac = step(w, state, jax.random.PRNGKey(t))
    losses.append(float(l))
    fracs.append(float(frac))
  return losses, fracs


def test_stochastic_rounding_learns_where_nearest_stalls():
  near_losses, near_fracs = _regression("nearest")
  sto_losses, sto_fracs = _regression("stochastic")
  assert max(near_fracs) == 0.0                 # every update rounded away
  assert near_losses[-1] == near_losses[0]      # no learning at all
  assert min(sto_fracs) > 0.0
  assert sto_losses[-1] < 0.3 * sto_losses[0], (sto_losses[0], sto_losses[-1])


def test_reselect_outliers_refits_from_current_weight():
  q = qft.qft_quantize(_weight(), 0.01)
  # Shrink every outlier to 0: the top set must move to other entries.
  u = jnp.zeros((2, 24 * 64))
  u = u.at[jnp.arange(2)[:, None], q.outlier_index].set(-q.outlier_value)
  u = u.reshape(2, 24, 64)
  moved, _ = qft.qft_apply_updates(q, u, jax.random.PRNGKey(0),
                                   rounding="nearest")
  w = np.asarray(qft.qft_dequantize(moved)).reshape(2, -1)
  r = qft.reselect_outliers({"a": moved, "b": jnp.ones(3)})["a"]
  assert r.outlier_index.shape == q.outlier_index.shape
  n_out = q.outlier_index.shape[-1]
  for b in range(2):
    top = set(np.argsort(-np.abs(w[b]))[:n_out])
    assert set(np.asarray(r.outlier_index[b])) == top
    assert not top & set(np.asarray(q.outlier_index[b]))
  half = np.repeat(np.asarray(r.dense.scale), 64, -1).reshape(2, -1) / 2
  err = np.abs(np.asarray(qft.qft_dequantize(r)).reshape(2, -1) - w)
  assert np.all(err <= half * (1 + 1e-4))   # ties: w sits on the old grid
  assert np.all(np.asarray(r.dense.scale) <= np.asarray(q.dense.scale))
  # The jit-friendly schedule re-fits only on due steps.
  sched = jax.jit(qft.reselect_on_schedule, static_argnums=2)
  for step, due in [(0, False), (3, False), (4, True), (8, True)]:
    out = sched(moved, jnp.asarray(step), 4)
    np.testing.assert_array_equal(out.outlier_index, (r if due else moved
                                                      ).outlier_index)


def test_probe_gradients_through_the_llama_model():
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                          num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=8)
  params = llama.init_params(cfg, jax.random.PRNGKey(0))
  qparams = jax.tree_util.tree_map_with_path(
      lambda p, x: qft.qft_quantize(x, 0.02) if p[-1].key == "kernel" else x,
      params)
  fparams = jax.tree.map(
      lambda x: qft.qft_dequantize(x) if qft.is_qft_weight(x) else x,
      qparams, is_leaf=qft.is_qft_weight)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 64)
  model = llama.Llama(cfg)

  def nll(p):
    logits = model.apply({"params": p}, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, tokens[..., None], -1)[..., 0])

  probes = qft.qft_probes(qparams)
  loss, g = jax.jit(jax.value_and_grad(
      lambda pr: nll(qft.with_probes(qparams, pr))))(probes)
  loss_ref, g_ref = jax.jit(jax.value_and_grad(nll))(fparams)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  pairs = jax.tree.leaves(
      jax.tree.map(lambda a, b: None if a is None else (a, b), g, g_ref,
                   is_leaf=lambda x: x is None),
      is_leaf=lambda x: isinstance(x, tuple))
  assert len(pairs) == 8                      # 7 decoder linears + lm_head
  for a, b in pairs:
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
