"""Path rules, trainable masks and the trainable / frozen split."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qft_jax._src import qarray as qa
from qft_jax._src.optim import masks


def _params():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  return {
      "embed": {"embedding": jax.random.normal(k1, (16, 8))},
      "layers": {
          "input_norm": {"scale": jnp.ones((2, 8))},
          "attn": {"q_proj": {"kernel": qa.quantize(
              jax.random.normal(k2, (2, 8, 8)),
              qa.QuantConfig(bits=4, group_size=4))}},
      },
      "lm_head": {"kernel": jax.random.normal(k3, (16, 8))},
  }


def test_path_str_names_qarray_fields():
  paths = masks.leaf_paths(_params())
  assert "layers/attn/q_proj/kernel/scale" in paths
  assert "layers/attn/q_proj/kernel/qvalue" in paths
  assert "layers/attn/q_proj/kernel/zero_point" in paths
  assert "embed/embedding" in paths
  assert masks.path_str(("a", 0, "b")) == "a/0/b"


def test_first_match_wins_and_default():
  params = _params()
  labels = masks.mask_from_rules(
      params, [(r"kernel/scale$", "qscale"), (r"scale$", "norm"),
               (r"^embed/", "emb")], default="other")
  assert labels["layers"]["attn"]["q_proj"]["kernel"].scale == "qscale"
  assert labels["layers"]["input_norm"]["scale"] == "norm"
  assert labels["embed"]["embedding"] == "emb"
  assert labels["lm_head"]["kernel"] == "other"
  assert labels["layers"]["attn"]["q_proj"]["kernel"].qvalue == "other"


def test_uncovered_leaf_and_unused_rule_raise():
  params = _params()
  with pytest.raises(ValueError, match="matched no mask rule"):
    masks.mask_from_rules(params, [(r"^embed/", 1)])
  with pytest.raises(ValueError, match=r"matched no parameter: \['v_proj'\]"):
    masks.mask_from_rules(params, [("v_proj", 1), (".*", 0)])
  masks.mask_from_rules(params, [("v_proj", 1), (".*", 0)],
                        allow_unmatched=True)
  with pytest.raises(ValueError, match="invalid regex"):
    masks.mask_from_rules(params, [("(", 1)], default=0)


def test_trainable_mask_never_marks_integer_leaves():
  mask = masks.trainable_mask(_params(), [(".*", True)])
  q = mask["layers"]["attn"]["q_proj"]["kernel"]
  assert q.scale is True and q.qvalue is False and q.zero_point is False
  assert mask["embed"]["embedding"] is True


def test_split_combine_round_trip_and_integer_check():
  params = _params()
  mask = masks.trainable_mask(params, [(r"kernel/scale$", True),
                                       (r"^lm_head/", True)], default=False)
  train, frozen = masks.split(params, mask)
  assert len(jax.tree.leaves(train)) == 2
  assert len(jax.tree.leaves(frozen)) == len(jax.tree.leaves(params)) - 2
  back = masks.combine(train, frozen)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  bad = jax.tree.map(lambda _: True, params)
  with pytest.raises(ValueError, match="integer dtype"):
    masks.split(params, bad)


def test_grad_through_split_matches_full_grad():
  params = _params()
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 8))

  def loss(p):
    w = qa.dequantize(p["layers"]["attn"]["q_proj"]["kernel"], jnp.float32)
    h = jnp.einsum("bk,lnk->bn", x, w) * p["layers"]["input_norm"]["scale"][0]
    return jnp.sum(jnp.tanh(h @ p["lm_head"]["kernel"].T) ** 2)

  mask = masks.trainable_mask(params, [(r"kernel/scale$", True),
                                       (r"^lm_head/", True)], default=False)
  train, frozen = masks.split(params, mask)
  g = jax.grad(lambda t: loss(masks.combine(t, frozen)))(train)
  # Reference: differentiate the float function of the same two leaves.
  def ref(scale, head):
    p = jax.tree.map(lambda x: x, params)
    q = p["layers"]["attn"]["q_proj"]["kernel"]
    p["layers"]["attn"]["q_proj"]["kernel"] = dataclasses.replace(q,
                                                                  scale=scale)
    p["lm_head"]["kernel"] = head
    return loss(p)
  q = params["layers"]["attn"]["q_proj"]["kernel"]
  gs, gh = jax.grad(ref, argnums=(0, 1))(q.scale, params["lm_head"]["kernel"])
  np.testing.assert_allclose(g["layers"]["attn"]["q_proj"]["kernel"].scale,
                             gs, rtol=1e-5)
  np.testing.assert_allclose(g["lm_head"]["kernel"], gh, rtol=1e-5)
  # optax accepts the None-filled trainable tree.
  tx = optax.adam(1e-2)
  updates, _ = tx.update(g, tx.init(train), train)
  new = optax.apply_updates(train, updates)
  assert jax.tree.structure(new) == jax.tree.structure(train)
