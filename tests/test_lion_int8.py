"""int8-momentum Lion: quantizer, agreement with optax.lion, optax battery."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qft_jax._src.optim import lion_int8 as li

TEXT = (pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
        / "text" / "tinyshakespeare_input.txt")


def _params(dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"w": jax.random.normal(k1, (37, 29), dtype),   # 1073: padded block
          "b": jnp.zeros((5,), dtype),
          "s": jnp.ones((), dtype)}


def _grads(params, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return jax.tree.map(lambda p, k: jax.random.normal(k, p.shape, p.dtype),
                      params, dict(zip(sorted(params), keys)))


@pytest.mark.parametrize("size,block", [(1000, 256), (7, 256), (512, 64)])
def test_blockwise_round_trip_within_half_step(size, block):
  x = jax.random.normal(jax.random.PRNGKey(size), (size,)) * 3
  codes, scale = li.quantize_blockwise(x, block)
  assert codes.dtype == jnp.int8 and codes.shape == x.shape
  assert scale.shape == (li.num_blocks(size, block),)
  err = np.abs(np.asarray(li.dequantize_blockwise(codes, scale, block) - x))
  per_entry_half_step = np.repeat(np.asarray(scale), block)[:size] / 2
  assert np.all(err <= per_entry_half_step * (1 + 1e-5))
  # Each block's absmax is represented exactly (code +-127).
  blocks = np.pad(np.asarray(x), (0, scale.size * block - size)).reshape(
      -1, block)
  np.testing.assert_allclose(scale * 127, np.abs(blocks).max(1), rtol=1e-6)


def test_stochastic_rounding_is_unbiased():
  x = jax.random.uniform(jax.random.PRNGKey(0), (256,), minval=-1, maxval=1)
  x = x.at[0].set(1.0)  # pins the block scale to 1/127
  keys = jax.random.split(jax.random.PRNGKey(1), 4000)
  deq = jax.vmap(lambda k: li.dequantize_blockwise(
      *li.quantize_blockwise(x, 256, k), 256))(keys)
  step = 1.0 / 127
  np.testing.assert_allclose(deq.mean(0), x, atol=0.06 * step)
  rtn = li.dequantize_blockwise(*li.quantize_blockwise(x, 256), 256)
  assert np.abs(np.asarray(rtn - x)).max() > 0.3 * step  # RTN is biased


def test_momentum_and_updates_track_float_lion():
  params = _params()
  ref, ours = optax.scale_by_lion(), li.scale_by_lion_int8(block_size=64)
  rs, qs = ref.init(params), ours.init(params)
  agree = []
  for t in range(30):
    g = _grads(params, t)
    ru, rs = ref.update(g, rs, params)
    qu, qs = ours.update(g, qs, params)
    agree.append(np.mean(np.asarray(ru["w"] == qu["w"])))
  for name in params:
    m = li.dequantize_blockwise(qs.mu[name], qs.mu_scale[name], 64)
    bound = np.abs(np.asarray(rs.mu[name])).max()
    np.testing.assert_allclose(m, rs.mu[name], atol=0.05 * bound)
  assert min(agree) > 0.95


def _battery(tx, params, steps=3):
  """Runs `tx` jitted; checks no retrace, stable state and update dtypes."""
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, u

  state = tx.init(params)
  spec0 = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  for t in range(steps):
    params, state, updates = step(params, state, _grads(params, t))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == spec0
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.dtype == p.dtype
  assert len(traces) == 1
  return params, state


def _int8_states(state):
  found = []

  def visit(x):
    if isinstance(x, li.ScaleByLionInt8State):
      found.append(x)
      return None
    return x
  jax.tree.map(visit, state, is_leaf=lambda x: isinstance(
      x, li.ScaleByLionInt8State))
  return found


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_battery_plain_and_chain(dtype, stochastic):
  params = _params(dtype)
  tx = li.lion_int8(1e-3, weight_decay=0.1, stochastic_rounding=stochastic)
  _, state = _battery(tx, params)
  (s,) = _int8_states(state)
  assert all(m.dtype == jnp.int8 for m in jax.tree.leaves(s.mu))
  assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(s.mu_scale))
  assert int(s.count) == 3


def test_battery_masked_leaves_untouched():
  params = _params()
  mask = {"w": True, "b": False, "s": False}
  tx = optax.chain(optax.masked(li.scale_by_lion_int8(), mask),
                   optax.scale(-1e-2))
  new, state = _battery(tx, params)
  (s,) = _int8_states(state)
  assert isinstance(s.mu["b"], optax.MaskedNode)
  assert s.mu["w"].dtype == jnp.int8
  assert not np.array_equal(np.asarray(new["w"]), np.asarray(params["w"]))
  # Masked-out leaves pass the raw gradient through (then -lr): no Lion sign.
  g = _grads(params, 0)
  u, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(u["b"], -1e-2 * g["b"], rtol=1e-6)
  np.testing.assert_allclose(np.abs(np.asarray(u["w"])), 1e-2, rtol=1e-6)


def test_battery_multisteps_updates_every_k():
  params = _params()
  tx = optax.MultiSteps(li.lion_int8(1e-2), every_k_schedule=2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  p = params
  for t in range(4):
    u, state = step(_grads(params, t), state, p)
    p_new = optax.apply_updates(p, u)
    moved = not np.array_equal(np.asarray(p_new["w"]), np.asarray(p["w"]))
    assert moved == (t % 2 == 1)
    p = p_new
  _battery(tx, params, steps=4)


def test_battery_inject_hyperparams():
  params = _params()
  tx = optax.inject_hyperparams(li.lion_int8, static_args=(
      "block_size", "seed"))(learning_rate=1e-2, b1=0.9, weight_decay=0.0,
                             block_size=64)
  _battery(tx, params)
  state = tx.init(params)
  state.hyperparams["learning_rate"] = jnp.asarray(0.5)
  u, _ = jax.jit(tx.update)(_grads(params, 0), state, params)
  # First Lion step: sign(g) scaled by the injected learning rate.
  np.testing.assert_allclose(np.abs(np.asarray(u["w"])), 0.5)


def test_rejects_bad_block_size():
  with pytest.raises(ValueError, match="block_size"):
    li.scale_by_lion_int8(block_size=0)


def _lm_problem():
  if not TEXT.exists():
    pytest.skip(f"{TEXT} not found (../shared/data beside the checkout)")
  text = np.frombuffer(TEXT.read_bytes(), np.uint8)
  ctx, dim, hidden, batch = 8, 32, 256, 128

  def init(key):
    k = jax.random.split(key, 3)
    return {"embed": jax.random.normal(k[0], (256, dim)) * 0.1,
            "w1": jax.random.normal(k[1], (hidden, ctx * dim))
                  / np.sqrt(ctx * dim),
            "w2": jax.random.normal(k[2], (256, hidden)) / np.sqrt(hidden)}

  def loss_fn(p, x, y):
    h = jax.nn.gelu(p["embed"][x].reshape(x.shape[0], -1) @ p["w1"].T)
    logits = h @ p["w2"].T
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def sample(rng, n):
    idx = rng.integers(0, len(text) - ctx - 1, n)
    return (np.stack([text[i:i + ctx] for i in idx]), text[idx + ctx])
  return init, loss_fn, sample, batch


def test_small_lm_final_loss_within_2pct_of_float_lion():
  init, loss_fn, sample, batch = _lm_problem()
  held_out = sample(np.random.default_rng(123), 2048)

  def train(tx, steps=200):
    p = init(jax.random.PRNGKey(0))
    s = tx.init(p)

    @jax.jit
    def step(p, s, x, y):
      g = jax.grad(loss_fn)(p, x, y)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    rng = np.random.default_rng(0)
    for _ in range(steps):
      p, s = step(p, s, *sample(rng, batch))
    return float(loss_fn(p, *held_out)), s

  ref, _ = train(optax.lion(1e-3, weight_decay=1e-3))
  ours, state = train(li.lion_int8(1e-3, weight_decay=1e-3))
  (s,) = _int8_states(state)
  assert all(m.dtype == jnp.int8 for m in jax.tree.leaves(s.mu))
  start = float(loss_fn(init(jax.random.PRNGKey(0)), *held_out))
  assert ref < start - 2.0          # the run really trains
  assert abs(ours - ref) / ref < 0.02, (ours, ref)
