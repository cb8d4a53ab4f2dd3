"""PEQA: only QArray scales train; codes and zero points stay bit-identical."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qft_jax._src import qarray as qa
from qft_jax._src.models import llama
from qft_jax._src.optim import masks
from qft_jax._src.optim import peqa

TEXT = (pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
        / "text" / "tinyshakespeare_input.txt")
CFG = llama.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                        matmul_trainable="scale")


def _quantized_model():
  params = llama.init_params(CFG, jax.random.PRNGKey(0))
  cfg = qa.QuantConfig(bits=4, group_size=16)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: qa.quantize(x, cfg) if p[-1].key == "kernel" else x, params)


def test_mask_selects_only_qarray_scales():
  params = _quantized_model()
  mask = peqa.peqa_mask(params)
  q = mask["layers"]["attn"]["q_proj"]["kernel"]
  assert q.scale is True and q.qvalue is False and q.zero_point is False
  assert mask["layers"]["input_norm"]["scale"] is False     # RMSNorm scale
  assert mask["embed"]["embedding"] is False
  n_true = sum(bool(x) for x in jax.tree.leaves(mask))
  assert n_true == 8                        # 7 decoder linears + lm_head
  with pytest.raises(ValueError, match="no QArray"):
    peqa.peqa_mask({"w": jnp.ones((2, 2))})


def _batches(n, batch=8, t=32):
  if not TEXT.exists():
    pytest.skip(f"{TEXT} not found (../shared/data beside the checkout)")
  text = np.frombuffer(TEXT.read_bytes()[:200_000], np.uint8)
  rng = np.random.default_rng(0)
  for _ in range(n):
    idx = rng.integers(0, len(text) - t - 1, batch)
    yield jnp.asarray(np.stack([text[i:i + t + 1] for i in idx]), jnp.int32)


def _nll(params, tokens):
  logits = llama.Llama(CFG).apply({"params": params}, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:]).mean()


def test_training_changes_only_scales_and_stays_a_valid_qarray():
  params = _quantized_model()
  scales, frozen = peqa.peqa_split(params)
  tx = optax.adam(3e-2)
  opt = tx.init(scales)

  @jax.jit
  def step(scales, opt, tokens):
    loss, g = jax.value_and_grad(
        lambda s: _nll(masks.combine(s, frozen), tokens))(scales)
    u, opt = tx.update(g, opt, scales)
    return optax.apply_updates(scales, u), opt, loss

  # A fixed batch: the scales alone must be able to fit it.
  tokens = next(_batches(1))
  losses = []
  for _ in range(40):
    scales, opt, loss = step(scales, opt, tokens)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.1, losses

  tuned = masks.combine(scales, frozen)
  is_q = qa.is_qarray
  before = jax.tree.leaves(params, is_leaf=is_q)
  after = jax.tree.leaves(tuned, is_leaf=is_q)
  n_q = 0
  for b, a in zip(before, after):
    if not is_q(b):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      continue
    n_q += 1
    qa.validate(a)
    assert (a.bits, a.group_size, a.shape) == (b.bits, b.group_size, b.shape)
    np.testing.assert_array_equal(np.asarray(a.qvalue), np.asarray(b.qvalue))
    np.testing.assert_array_equal(np.asarray(a.zero_point),
                                  np.asarray(b.zero_point))
    assert a.qvalue.dtype == jnp.uint8 and a.scale.dtype == b.scale.dtype
    assert not np.array_equal(np.asarray(a.scale), np.asarray(b.scale))
  assert n_q == 8
  # The tuned model is the quantized model with new scales: its float
  # reference (dequantized weights, float kernels) gives the same loss.
  deq = jax.tree.map(lambda x: qa.dequantize(x, jnp.float32) if is_q(x) else x,
                     tuned, is_leaf=is_q)
  np.testing.assert_allclose(_nll(deq, tokens), _nll(tuned, tokens),
                             rtol=1e-5)
