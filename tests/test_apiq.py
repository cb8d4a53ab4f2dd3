"""ApiQ: clipping quantizer vs RTN, exact QArray export, the layer-wise loss
against token-level math, optimizer groups, and decreasing block loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qft_jax._src import qarray as qa
from qft_jax._src.models import llama
from qft_jax._src.quantizers import apiq
from qft_jax._src.quantizers import calibration as cal
from qft_jax._src.quantizers import gptq
from qft_jax._src.quantizers import protocol

TINY = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=16, lora_alpha=8.0)


def _w(seed=0, shape=(32, 128)):
  return jnp.asarray(0.05 * np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


def test_unclipped_fake_quant_is_rtn():
  w = _w()
  cfg = apiq.ApiQConfig(bits=3, group_size=32, init_logit=30.0)
  clip = apiq.init_clip(w, cfg)  # sigmoid(30) == 1 in float32: no clipping
  np.testing.assert_allclose(
      np.asarray(apiq.fake_quant(w, clip, cfg)),
      np.asarray(qa.dequantize(qa.quantize(w, cfg.quant_config))),
      rtol=1e-6, atol=1e-8)


def test_exported_qarray_equals_fake_quant_and_ste_gradients():
  w = _w(1)
  cfg = apiq.ApiQConfig(bits=2, group_size=64)
  rng = np.random.default_rng(2)
  clip = {k: jnp.asarray(rng.uniform(-1, 4, (32, 2)), jnp.float32)
          for k in ("gamma", "beta")}
  q = apiq.quantize_clipped(w, clip, cfg)
  qa.validate(q)
  assert (q.bits, q.group_size, q.zero_point.dtype) == (2, 64, jnp.uint8)
  np.testing.assert_allclose(np.asarray(qa.dequantize(q)),
                             np.asarray(apiq.fake_quant(w, clip, cfg)),
                             rtol=1e-6, atol=1e-8)
  g = jax.grad(lambda c: jnp.sum(apiq.fake_quant(w, c, cfg) * w))(clip)
  for leaf in jax.tree.leaves(g):
    assert np.all(np.isfinite(leaf)) and np.any(np.asarray(leaf) != 0)


def test_lora_init_and_optimizer_groups():
  cfg = apiq.ApiQConfig(rank=8, lwc_lr=5e-3, lora_lr=5e-4, weight_decay=0.0)
  lora = apiq.init_lora(jax.random.key(0), 16, 100, 8)
  assert np.all(np.asarray(lora["lora_b"]) == 0)
  a = np.asarray(lora["lora_a"])
  assert a.shape == (8, 100) and np.abs(a).max() <= 0.1 + 1e-7
  assert np.abs(a).max() > 0.09  # Kaiming-uniform(a=sqrt 5): bound 1/sqrt(K)
  params = {"gamma": jnp.ones((2, 2)), "lora_a": jnp.ones((2, 2))}
  opt = apiq._optimizer(cfg)  # pylint: disable=protected-access
  upd, _ = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params),
                      params)
  # Adam's first step moves every coordinate by its group's learning rate.
  np.testing.assert_allclose(np.asarray(upd["gamma"]), -5e-3, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(upd["lora_a"]), -5e-4, rtol=1e-4)


def test_layer_loss_matches_token_level_objective():
  rng = np.random.default_rng(3)
  x_fp = rng.standard_normal((200, 128)).astype(np.float32)
  x_q = x_fp + 0.1 * rng.standard_normal((200, 128)).astype(np.float32)
  w = np.asarray(_w(4))
  w_eff = w + 0.01 * rng.standard_normal(w.shape).astype(np.float32)
  stats = protocol.layer_stats(jnp.asarray(x_q), jnp.asarray(x_fp))
  x64, xf64 = x_q.astype(np.float64), x_fp.astype(np.float64)
  token = np.sum((xf64 @ w.T - x64 @ w_eff.T)**2) / (200 * 32)
  const = np.sum((xf64 @ w.T)**2) / (200 * 32)
  got = float(apiq.layer_loss(jnp.asarray(w), jnp.asarray(w_eff), stats))
  assert got == pytest.approx(token - const, rel=1e-4, abs=1e-6)


def test_layerwise_apiq_beats_rtn_and_gptq_at_2_bits():
  rng = np.random.default_rng(5)
  mix = rng.standard_normal((128, 128)) / np.sqrt(128)
  x = (rng.standard_normal((1024, 128)) @ mix).astype(np.float32)
  w = _w(6)
  stats = protocol.layer_stats(jnp.asarray(x))
  cfg = apiq.ApiQConfig(bits=2, group_size=64, rank=8)
  q, lora, losses = apiq.apiq_layer(w, stats, cfg, jax.random.key(0),
                                    steps=200)
  assert float(losses[-1]) < float(losses[0])
  w_eff = qa.dequantize(q) + cfg.lora_scale * lora["lora_b"] @ lora["lora_a"]
  ours = float(protocol.proxy_loss(w, w_eff, stats.hessian))
  rtn = float(protocol.proxy_loss(
      w, qa.dequantize(qa.quantize(w, cfg.quant_config)), stats.hessian))
  gq = float(protocol.proxy_loss(w, qa.dequantize(gptq.gptq_quantize(
      w, stats.hessian, gptq.GPTQConfig(bits=2, group_size=64))),
                                 stats.hessian))
  assert ours < 0.8 * gq < 0.8 * rtn
  quantizer = apiq.ApiQLayerwise(cfg, steps=5)
  assert isinstance(quantizer, protocol.Quantizer)
  assert quantizer.needs_calibration
  with pytest.raises(ValueError, match="needs calibration"):
    quantizer(w)


def test_blockwise_loss_decreases_and_export_is_consistent():
  params = llama.init_params(TINY, jax.random.key(1))
  tokens = np.random.default_rng(7).integers(0, 64, (4, 16))
  x = cal.embed_tokens(params, tokens)
  layer_fp = jax.tree.map(jnp.asarray, cal.layers_from_params(params)(0))
  block_fn = functools.partial(cal.apply_layer, TINY)
  y_fp = block_fn(layer_fp, x)
  cfg = apiq.ApiQConfig(bits=2, group_size=32, rank=4, alpha=8.0, epochs=6,
                        lwc_lr=1e-2, lora_lr=2e-3)
  layer, losses = apiq.apiq_block(block_fn, layer_fp, x, y_fp, y_fp, cfg,
                                  jax.random.key(0))
  assert losses.shape == (6,) and losses[-1] < 0.8 * losses[0]
  assert sorted(apiq.linear_names(layer)) == sorted(
      f"{b}/{p}" for b, ps in llama.LINEAR_NAMES.items() for p in ps)
  q_proj = layer["attn"]["q_proj"]
  assert isinstance(q_proj["kernel"], qa.QArray)
  assert q_proj["lora_a"].shape == (4, 64) and q_proj["lora_b"].shape == (64, 4)
  # The exported QArray + LoRA layer reproduces the trained objective, and
  # beats plain RTN of the same block.
  y = block_fn(layer, x)
  final = 2 * float(jnp.mean((y - y_fp)**2))
  assert final < losses[0]
  rtn = layer_fp
  for name in apiq.linear_names(layer_fp):
    w = cal.get_linear(layer_fp, name)["kernel"]
    rtn = cal.set_linear(rtn, name, {"kernel": qa.quantize(w,
                                                           cfg.quant_config)})
  assert float(jnp.mean((y - y_fp)**2)) < float(
      jnp.mean((block_fn(rtn, x) - y_fp)**2))


def test_blockwise_model_driver_and_bad_input():
  params = llama.init_params(TINY, jax.random.key(2))
  tokens = np.random.default_rng(8).integers(0, 64, (2, 16))
  x0 = cal.embed_tokens(params, tokens)
  cfg = apiq.ApiQConfig(bits=2, group_size=32, rank=4, alpha=8.0, epochs=1)
  layers, reports = apiq.apiq_blockwise_model(
      TINY, cal.layers_from_params(params), x0, cfg, batch_size=2)
  assert len(reports) == 2 and len(reports[0]["epoch_loss"]) == 1
  out = llama.forward({**params, "layers": layers}, TINY, jnp.asarray(tokens))
  assert np.all(np.isfinite(np.asarray(out)))
  with pytest.raises(ValueError, match="lora_alpha"):
    apiq.apiq_blockwise_model(TINY, cal.layers_from_params(params), x0,
                              apiq.ApiQConfig(alpha=16.0))
  with pytest.raises(ValueError, match="at least batch_size"):
    apiq.apiq_block(functools.partial(cal.apply_layer, TINY),
                    jax.tree.map(jnp.asarray,
                                 cal.layers_from_params(params)(0)),
                    x0, x0, None, apiq.ApiQConfig(batch_size=4),
                    jax.random.key(0))
  with pytest.raises(ValueError, match="unsupported bit width"):
    apiq.ApiQConfig(bits=5)
  with pytest.raises(ValueError, match="rank must be positive"):
    apiq.ApiQConfig(rank=0)
