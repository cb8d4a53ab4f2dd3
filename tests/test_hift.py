"""HiFT: units, visit orders, one group differentiated per step, optimizer
state of inactive groups in host memory, learning-rate modes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qft_jax._src import qarray as qa
from qft_jax._src.models import llama
from qft_jax._src.optim import hift
from qft_jax._src.optim import lion_int8 as li

V, D, L = 16, 8, 3


def _toy_params(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  return {"embed": {"embedding": jax.random.normal(k[0], (V, D))},
          "layers": {"mlp": {"kernel": jax.random.normal(k[1], (L, D, D))
                                       / np.sqrt(D)},
                     "input_norm": {"scale": jnp.ones((L, D))}},
          "final_norm": {"scale": jnp.ones((D,))},
          "lm_head": {"kernel": jax.random.normal(k[2], (V, D)) * 0.1}}


def _toy_loss(params, tokens):
  h = params["embed"]["embedding"][tokens[:, :-1]]
  for l in range(L):
    w = params["layers"]["mlp"]["kernel"][l]
    h = h + jnp.tanh(h @ w.T) * params["layers"]["input_norm"]["scale"][l]
  logits = (h * params["final_norm"]["scale"]) @ params["lm_head"]["kernel"].T
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:]).mean()


def _tokens(seed):
  return jax.random.randint(jax.random.PRNGKey(seed), (4, 9), 0, V)


def _unit_of(path: str, row=None):
  for regex, kind in hift.LLAMA_UNIT_RULES:
    if path.startswith(regex[1:]):
      return kind if kind != "layers" else f"layers/{row}"


@pytest.mark.parametrize("tied", [True, False])
def test_units_of_the_llama_tree(tied):
  cfg = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                          num_layers=2, num_heads=2, num_kv_heads=1,
                          head_dim=8, tie_word_embeddings=tied)
  shapes = jax.eval_shape(llama.init_params, cfg, jax.random.PRNGKey(0))
  units = hift.hift_units(shapes)
  want = ("embedding", "layers/0", "layers/1", "final_norm")
  assert units == (want if tied else want + ("head",))


@pytest.mark.parametrize("order", hift.ORDERS)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_each_order_visits_every_unit_once_per_cycle(order, m):
  units = hift.hift_units(_toy_params())
  assert units == ("embedding", "layers/0", "layers/1", "layers/2",
                   "final_norm", "head")
  s = hift.HiFTSchedule(units, group_size=m, order=order, seed=3)
  k = math.ceil(len(units) / m)
  assert s.num_groups == k
  for cycle in range(3):
    visited = [u for t in range(cycle * k, (cycle + 1) * k)
               for u in s.groups[s.group(t)]]
    assert sorted(visited) == sorted(units)
  first = s.groups[0][0]
  if order == "bottom-up":
    assert first == "embedding" and s.visit_order == units
  elif order == "top-down":
    assert first == "head" and s.visit_order == units[::-1]
  else:
    assert s.visit_order == hift.HiFTSchedule(units, order="random",
                                              seed=3).visit_order
    perms = {hift.HiFTSchedule(units, order="random", seed=i).visit_order
             for i in range(5)}
    assert len(perms) > 1


def test_inactive_groups_get_no_gradient_and_hold_no_device_state():
  params = _toy_params()
  sched = hift.HiFTSchedule(hift.hift_units(params), group_size=2)
  h = hift.HiFT(sched, lambda lr: optax.adam(lr), 1e-2)
  state = h.init(params)
  step = h.make_step(_toy_loss)
  full_grad = jax.grad(_toy_loss)
  for t in range(2 * sched.num_groups):
    g = sched.group(t)
    active_units = set(sched.groups[g])
    part = h.partition(params, g)
    active, frozen = part.split(params)
    # Only the active units' leaves (rows, for stacked leaves) are
    # differentiated; their gradient equals the matching slice of the full one.
    grads = jax.grad(lambda a: _toy_loss(part.merge(a, frozen),
                                         _tokens(t)))(active)
    ref = full_grad(params, _tokens(t))
    rows = sorted(int(u.split("/")[1]) for u in active_units
                  if u.startswith("layers/"))
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
      name = "/".join(k.key for k in path)
      r = ref
      for k in path:
        r = r[k.key]
      if name.startswith("layers/"):
        assert leaf.shape[0] == len(rows)
        np.testing.assert_allclose(leaf, r[np.asarray(rows)], rtol=1e-5)
      else:
        assert _unit_of(name) in active_units
        np.testing.assert_allclose(leaf, r, rtol=1e-5)
    n_active = sum(x.size for x in jax.tree.leaves(grads))
    assert n_active < sum(x.size for x in jax.tree.leaves(params))

    new, state, _ = step(params, state, t, _tokens(t))
    for path, old in jax.tree_util.tree_flatten_with_path(params)[0]:
      name = "/".join(k.key for k in path)
      cur = new
      for k in path:
        cur = cur[k.key]
      if name.startswith("layers/"):
        for row in range(L):
          same = np.array_equal(np.asarray(cur[row]), np.asarray(old[row]))
          assert same == (f"layers/{row}" not in active_units), (name, row)
      else:
        same = np.array_equal(np.asarray(cur), np.asarray(old))
        assert same == (_unit_of(name) not in active_units), name
    params = new
    # Every group's optimizer state is host memory between steps.
    for gs in state.group_states:
      for leaf in jax.tree.leaves(gs):
        assert isinstance(leaf, np.ndarray) and not isinstance(leaf, jax.Array)


@pytest.mark.parametrize("mode", hift.LR_MODES)
def test_learning_rate_per_cycle_or_per_step(mode):
  params = {"a": jnp.zeros(2), "b": jnp.zeros(3), "c": jnp.zeros(1)}
  rules = ((r"^a", "a"), (r"^b", "b"), (r"^c", "c"))
  sched = hift.HiFTSchedule(hift.hift_units(params, rules), group_size=1,
                            lr_mode=mode, rules=rules)
  h = hift.HiFT(sched, optax.sgd, lambda c: 1.0 + c)   # lr(c) = 1 + c
  state, step = h.init(params), h.make_step(lambda p: sum(
      jnp.sum(x) for x in jax.tree.leaves(p)))        # dL/dx = 1
  for t in range(7):
    g = sched.group(t)
    unit = sched.groups[g][0]
    new, state, _ = step(params, state, t)
    delta = float(params[unit][0] - new[unit][0])
    expected = 1.0 + (t // 3 if mode == "per_cycle" else t)
    assert delta == pytest.approx(expected), (t, unit)
    params = new


def test_trains_with_lion_int8_and_compiles_once_per_group():
  params = _toy_params()
  sched = hift.HiFTSchedule(hift.hift_units(params), group_size=2,
                            order="random", seed=1)
  h = hift.HiFT(sched, lambda lr: li.lion_int8(lr, weight_decay=0.0), 3e-3)
  traces = []

  def loss_fn(p, tokens):
    traces.append(1)
    return _toy_loss(p, tokens)

  state, step = h.init(params), h.make_step(loss_fn)
  tokens = _tokens(0)
  start = float(_toy_loss(params, tokens))
  for t in range(6 * sched.num_groups):
    params, state, _ = step(params, state, t, tokens)
  assert float(_toy_loss(params, tokens)) < start - 0.05
  # One trace per jitted function: layer-only groups of one size share one.
  assert len(traces) == len(step.compiled) <= sched.num_groups
  for gs in state.group_states:
    (s,) = [x for x in gs if isinstance(x, li.ScaleByLionInt8State)]
    assert all(m.dtype == np.int8 and isinstance(m, np.ndarray)
               for m in jax.tree.leaves(s.mu))


@pytest.mark.parametrize("per_step", [False, True])
def test_layer_groups_share_one_compiled_step(per_step):
  """Groups of decoder layers run one jitted function (rows as an argument)
  and move exactly as SGD on the full gradient's rows says."""
  params = _toy_params()
  sched = hift.HiFTSchedule(hift.hift_units(params), group_size=1,
                            lr_mode="per_step" if per_step else "per_cycle")
  lr = (lambda c: 0.1 * (1.0 + c)) if per_step else 0.1
  h = hift.HiFT(sched, optax.sgd, lr)
  state, step = h.init(params), h.make_step(_toy_loss)
  for t in range(sched.num_groups):
    unit = sched.groups[sched.group(t)][0]
    grad = jax.grad(_toy_loss)(params, _tokens(t))
    new, state, _ = step(params, state, t, _tokens(t))
    if unit.startswith("layers/"):
      row = int(unit.split("/")[1])
      rate = 0.1 * (1.0 + t) if per_step else 0.1
      want = params["layers"]["mlp"]["kernel"][row] - rate * grad[
          "layers"]["mlp"]["kernel"][row]
      np.testing.assert_allclose(new["layers"]["mlp"]["kernel"][row], want,
                                 rtol=1e-5, atol=1e-6)
    params = new
  # 6 groups: embedding, 3 layers, final norm, head -> 4 functions.
  assert sched.num_groups == 6 and len(step.compiled) == 4


def test_integer_leaves_and_trainable_mask_never_train():
  params = _toy_params()
  params["layers"]["mlp"]["kernel"] = qa.quantize(
      params["layers"]["mlp"]["kernel"], qa.QuantConfig(bits=4, group_size=8))
  sched = hift.HiFTSchedule(hift.hift_units(params), group_size=6)
  active, _ = hift.partition(params, sched, 0).split(params)
  q = active["layers"]["mlp"]["kernel"]
  assert q.qvalue is None and q.zero_point is None and q.scale.shape[0] == L
  mask = jax.tree.map(lambda _: False, params)
  mask["final_norm"]["scale"] = True
  active, _ = hift.partition(params, sched, 0, trainable=mask).split(params)
  assert [x.shape for x in jax.tree.leaves(active)] == [(D,)]


def test_bad_schedule_arguments():
  with pytest.raises(ValueError, match="order"):
    hift.HiFTSchedule(("a",), order="sideways")
  with pytest.raises(ValueError, match="lr_mode"):
    hift.HiFTSchedule(("a",), lr_mode="per_epoch")
