"""LoRA / QLoRA / ModuLoRA as param-tree transforms: init, split, merge."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qft_jax._src import lora
from qft_jax._src import qarray as qa
from qft_jax._src.models import llama

SPEC = lora.LoraSpec(rank=4, alpha=8.0, targets=(r"attn/(q|v)_proj$",
                                                 r"mlp/down_proj$"))
CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                        lora_alpha=SPEC.alpha)
TOKENS = jax.random.randint(jax.random.PRNGKey(9), (2, 12), 0, 64)


def _params(quant: qa.QuantConfig | None = None):
  params = llama.init_params(CFG, jax.random.PRNGKey(0))
  if quant is None:
    return params
  return jax.tree_util.tree_map_with_path(
      lambda p, x: qa.quantize(x, quant) if (
          p[-1].key == "kernel" and p[0].key == "layers") else x, params)


@jax.jit
def _logits(params):
  return llama.Llama(CFG).apply({"params": params}, TOKENS)


def test_init_shapes_bounds_and_zero_b():
  params = _params()
  out = lora.init_lora(params, SPEC, jax.random.PRNGKey(1))
  assert "lora_a" not in params["layers"]["attn"]["q_proj"]   # not mutated
  for block, name, n, k in [("attn", "q_proj", 32, 32),
                            ("attn", "v_proj", 16, 32),
                            ("mlp", "down_proj", 32, 64)]:
    m = out["layers"][block][name]
    assert m["lora_a"].shape == (2, 4, k) and m["lora_b"].shape == (2, n, 4)
    assert m["lora_a"].dtype == jnp.float32
    a = np.asarray(m["lora_a"])
    bound = 1 / np.sqrt(k)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert np.all(np.asarray(m["lora_b"]) == 0)
  assert "lora_a" not in out["layers"]["attn"]["k_proj"]
  assert "lora_a" not in out["lm_head"]
  # A is Kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in)) has std bound / sqrt(3).
  big = lora.init_lora({"x": {"kernel": jnp.zeros((64, 256))}},
                       lora.LoraSpec(rank=64, targets=("x",)),
                       jax.random.PRNGKey(2))["x"]["lora_a"]
  assert np.std(np.asarray(big)) == pytest.approx(1 / 16 / np.sqrt(3),
                                                  rel=0.03)


def test_unmatched_target_and_double_init_raise():
  params = _params()
  with pytest.raises(ValueError, match=r"matched no linear module: \['w_q'\]"):
    lora.init_lora(params, lora.LoraSpec(targets=("q_proj", "w_q")),
                   jax.random.PRNGKey(0))
  once = lora.init_lora(params, SPEC, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="already has LoRA"):
    lora.init_lora(once, SPEC, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="rank"):
    lora.LoraSpec(rank=0)


def _with_random_b(params):
  out = lora.init_lora(params, SPEC, jax.random.PRNGKey(1))
  keys = iter(jax.random.split(jax.random.PRNGKey(3), 8))

  def fill(path, x):
    if path[-1].key == "lora_b":
      return 0.1 * jax.random.normal(next(keys), x.shape)
    return x
  return jax.tree_util.tree_map_with_path(fill, out, is_leaf=qa.is_qarray)


@pytest.mark.parametrize("quant", [
    None,                                                      # LoRA
    qa.QuantConfig(bits=4, group_size=16, codebook="nf4", symmetric=True),
    qa.QuantConfig(bits=3, group_size=16),                     # ModuLoRA-style
], ids=["float", "qlora_nf4", "modulora_3bit"])
def test_merged_float_model_matches_lora_model(quant):
  base = _params(quant)
  tuned = _with_random_b(base)
  # At init (B = 0) LoRA leaves the function unchanged.
  np.testing.assert_allclose(
      _logits(lora.init_lora(base, SPEC, jax.random.PRNGKey(1))),
      _logits(base), rtol=1e-6, atol=1e-6)
  merged = lora.merge_lora(tuned, SPEC)
  assert not any(qa.is_qarray(x) for x in jax.tree.leaves(
      merged, is_leaf=qa.is_qarray))
  assert "lora_a" not in merged["layers"]["attn"]["q_proj"]
  # Independent reference for one kernel: W + alpha/r * B @ A in numpy.
  m = tuned["layers"]["attn"]["v_proj"]
  w = m["kernel"]
  w = np.asarray(qa.dequantize(w, jnp.float32) if qa.is_qarray(w) else w)
  ref = w + SPEC.alpha / SPEC.rank * np.einsum(
      "lor,lri->loi", np.asarray(m["lora_b"], np.float64),
      np.asarray(m["lora_a"], np.float64))
  np.testing.assert_allclose(merged["layers"]["attn"]["v_proj"]["kernel"],
                             ref, rtol=1e-5, atol=1e-6)
  ours, want = _logits(tuned), _logits(merged)
  assert float(jnp.abs(ours - _logits(base)).max()) > 1e-3   # LoRA matters
  np.testing.assert_allclose(ours, want, rtol=2e-4, atol=2e-4)


def test_training_lora_over_nf4_base_touches_only_lora():
  base = _params(qa.QuantConfig(bits=4, group_size=16, codebook="nf4",
                                symmetric=True))
  params = lora.init_lora(base, SPEC, jax.random.PRNGKey(1))
  train, frozen = lora.split_lora(params)
  assert {"/".join(k.key for k in p)
          for p, _ in jax.tree_util.tree_flatten_with_path(train)[0]} == {
              f"layers/{b}/{n}/lora_{ab}" for b, n in
              [("attn", "q_proj"), ("attn", "v_proj"), ("mlp", "down_proj")]
              for ab in "ab"}

  def nll(t):
    logits = _logits(lora.combine(t, frozen))
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], TOKENS[:, 1:]).mean()

  tx = optax.adam(1e-2)
  opt = tx.init(train)

  @jax.jit
  def step(t, opt):
    loss, g = jax.value_and_grad(nll)(t)
    u, opt = tx.update(g, opt, t)
    return optax.apply_updates(t, u), opt, loss

  losses = []
  for _ in range(15):
    train, opt, loss = step(train, opt)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.05
  tuned = lora.combine(train, frozen)
  for a, b in zip(jax.tree.leaves(lora.split_lora(tuned)[1]),
                  jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
