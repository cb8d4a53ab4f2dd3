"""Quantizer protocol, NF4 (+ double quantization), LoftQ, merge,
calibration plumbing and saving; a foreign quantizer through LoRA training."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qft_jax._src import evaluate
from qft_jax._src import qarray as qa
from qft_jax._src import qmatmul
from qft_jax._src.models import llama
from qft_jax._src.models import loading
from qft_jax._src.quantizers import calibration as cal
from qft_jax._src.quantizers import gptq
from qft_jax._src.quantizers import loftq
from qft_jax._src.quantizers import merge
from qft_jax._src.quantizers import nf4
from qft_jax._src.quantizers import protocol

from conftest import shared_path, smollm2_gguf

TINY = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=16, lora_alpha=8.0)


@pytest.fixture(scope="module")
def tiny_params():
  return llama.init_params(TINY, jax.random.key(0))


def _tensors(params):
  """Loader-style lazy per-layer tensors of a param tree."""
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  out = {}
  for path, v in flat.items():
    if path.startswith("layers/"):
      rest = path[len("layers/"):]
      for i in range(v.shape[0]):
        out[f"layers/{i}/{rest}"] = (lambda a=v[i]: a)
    else:
      out[path] = lambda a=v: a
  return out


# ------------------------------------------------------------- protocol ----


def test_rtn_quantizer_is_qarray_quantize():
  w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 64)),
                  jnp.float32)
  cfg = qa.QuantConfig(bits=3, group_size=32)
  rtn = protocol.RTN(cfg)
  assert isinstance(rtn, protocol.Quantizer) and not rtn.needs_calibration
  np.testing.assert_array_equal(qa.as_numpy_codes(rtn(w)),
                                qa.as_numpy_codes(qa.quantize(w, cfg)))
  with pytest.raises(ValueError, match="one matrix"):
    rtn(jnp.zeros((2, 8, 64)))


def test_as_quantize_fn_errors():
  with pytest.raises(ValueError, match="does not implement"):
    protocol.as_quantize_fn(lambda w: w)
  with pytest.raises(ValueError, match="needs calibration"):
    protocol.as_quantize_fn(gptq.GPTQ())
  fn = protocol.as_quantize_fn(gptq.GPTQ(), stats={})
  with pytest.raises(ValueError, match="no calibration statistics"):
    fn("layers/0/attn/q_proj/kernel", np.zeros((8, 64), np.float32))


@dataclasses.dataclass(frozen=True)
class SignMagnitude:
  """A foreign quantizer: 1 sign bit + (bits-1) magnitude bits, per-row
  power-of-two scale, magnitudes rounded half up. Builds its QArray by hand
  (offset-binary codes `2^(b-1) + sign * magnitude`, symmetric layout)."""
  bits: int = 4
  needs_calibration: bool = False

  def __call__(self, w, stats=None):
    w = np.asarray(w, np.float32)
    top = 2**(self.bits - 1) - 1
    absmax = np.abs(w).max(axis=1, keepdims=True)
    scale = 2.0**np.ceil(np.log2(np.maximum(absmax, 1e-12) / top))
    mag = np.minimum(np.floor(np.abs(w) / scale + 0.5), top)
    codes = (2**(self.bits - 1) + np.sign(w) * mag).astype(np.uint8)
    return qa.QArray(qvalue=qa.pack(jnp.asarray(codes), self.bits),
                     scale=jnp.asarray(scale, jnp.float32), zero_point=None,
                     bits=self.bits, group_size=w.shape[1], shape=w.shape,
                     dtype=jnp.float32)

  @staticmethod
  def reference(w, bits=4):
    top = 2**(bits - 1) - 1
    absmax = np.abs(w).max(axis=1, keepdims=True)
    scale = 2.0**np.ceil(np.log2(absmax / top))
    return np.sign(w) * np.minimum(np.floor(np.abs(w) / scale + 0.5),
                                   top) * scale


def test_foreign_quantizer_through_loader_qdot_and_lora_training(tiny_params):
  quantizer = SignMagnitude()
  assert isinstance(quantizer, protocol.Quantizer)
  params = loading.assemble_params(TINY, _tensors(tiny_params),
                                   quantize_fn=protocol.as_quantize_fn(
                                       quantizer))
  q = params["layers"]["attn"]["q_proj"]["kernel"]
  assert isinstance(q, qa.QArray) and q.batch_shape == (2,)
  qa.validate(q)
  # qdot on layer 1's weight against the sign-magnitude math in numpy.
  w1 = np.asarray(tiny_params["layers"]["attn"]["q_proj"]["kernel"][1])
  x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
  q1 = jax.tree.map(lambda a: a[1], q)
  np.testing.assert_allclose(
      np.asarray(qmatmul.qdot(jnp.asarray(x), q1)),
      x @ SignMagnitude.reference(w1).T, rtol=1e-5, atol=1e-5)
  # LoRA training: only lora_a / lora_b train; the codes stay untouched.
  key = jax.random.key(2)
  lora = {}
  for block, names in llama.LINEAR_NAMES.items():
    for name in names:
      kern = params["layers"][block][name]["kernel"]
      n, k = kern.shape
      key, sub = jax.random.split(key)
      lora[(block, name)] = {
          "lora_a": 0.1 * jax.random.normal(sub, (2, 4, k)),
          "lora_b": jnp.zeros((2, n, 4))}

  def combine(lora):
    p = jax.tree.map(lambda a: a, params, is_leaf=qa.is_qarray)
    p["layers"] = {b: dict(v) for b, v in params["layers"].items()}
    for (block, name), ab in lora.items():
      p["layers"][block][name] = {**params["layers"][block][name], **ab}
    return p

  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 96, (4, 16)))

  def loss_fn(lora):
    logits = llama.Llama(TINY).apply({"params": combine(lora)}, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  opt = optax.adam(1e-2)
  state = opt.init(lora)
  step = jax.jit(lambda l, s: (lambda v, g: (v, *opt.update(g, s, l)))(
      *jax.value_and_grad(loss_fn)(l)))
  first = None
  for _ in range(15):
    loss, upd, state = step(lora, state)
    lora = optax.apply_updates(lora, upd)
    first = loss if first is None else first
  assert float(loss) < float(first) - 0.05
  np.testing.assert_array_equal(
      np.asarray(combine(lora)["layers"]["attn"]["q_proj"]["kernel"].qvalue),
      np.asarray(q.qvalue))


# ------------------------------------------------------------------ NF4 ----


def _nf4_reference(w, block):
  levels = np.asarray(qa.NF4_LEVELS, np.float64)
  wb = w.astype(np.float64).reshape(w.shape[0], -1, block)
  absmax = np.abs(wb).max(-1, keepdims=True)
  x = wb / absmax
  idx = np.abs(x[..., None] - levels).argmin(-1)
  return (levels[idx] * absmax).reshape(w.shape), absmax[..., 0]


def test_nf4_matches_numpy_reference():
  w = np.random.default_rng(4).standard_normal((16, 256)).astype(np.float32)
  q = nf4.NF4(nf4.NF4Config(block_size=64))(jnp.asarray(w))
  qa.validate(q)
  want, _ = _nf4_reference(w, 64)
  np.testing.assert_allclose(np.asarray(qa.dequantize(q)), want, rtol=1e-6,
                             atol=1e-7)


def test_double_quantized_nf4_within_bound_and_smaller():
  rng = np.random.default_rng(5)
  # Rows of very different magnitude: the scales span two decades.
  w = (rng.standard_normal((40, 576)) * rng.uniform(0.01, 1.0, (40, 1))
       ).astype(np.float32)
  plain = nf4.quantize_nf4(jnp.asarray(w), nf4.NF4Config())
  dq = nf4.quantize_nf4(jnp.asarray(w), nf4.NF4Config(double_quant=True))
  qa.validate(dq)
  assert isinstance(dq.scale, qa.QArray) and dq.scale.bits == 8
  assert dq.scale.shape == (math.ceil(40 * 9 / 256), 256)
  _, absmax = _nf4_reference(w, 64)
  s_hat = np.asarray(qa.dense_scale(dq))
  # Second level: RTN 8-bit per block of 256 scales, range [0, max].
  flat = np.pad(absmax.ravel(), (0, 3 * 256 - absmax.size)).reshape(3, 256)
  step2 = flat.max(1) / 255
  err_s = np.abs(s_hat.ravel() - absmax.ravel())
  assert np.all(err_s <= np.repeat(step2, 256)[:absmax.size] / 2 + 1e-7)
  gap = np.max(np.diff(np.asarray(qa.NF4_LEVELS)))
  bound = np.repeat(absmax * gap / 2 + err_s.reshape(absmax.shape), 64, -1)
  err = np.abs(np.asarray(qa.dequantize(dq)) - w)
  assert np.all(err <= bound * (1 + 1e-5) + 1e-7)
  # Same codes as plain NF4 (the first level is unchanged).
  np.testing.assert_array_equal(qa.as_numpy_codes(dq),
                                qa.as_numpy_codes(plain))
  assert qa.bits_per_weight(dq) < 4.2 < qa.bits_per_weight(plain)


def test_double_quantized_stacked_layers_slice_and_jit():
  w = np.random.default_rng(6).standard_normal((3, 8, 128)).astype(np.float32)
  q = nf4.quantize_nf4(jnp.asarray(w), nf4.NF4Config(double_quant=True,
                                                     dq_block_size=8))
  qa.validate(q)
  full = np.asarray(jax.jit(qa.dequantize)(q))
  for i in range(3):
    qi = jax.tree.map(lambda a, i=i: a[i], q)
    qa.validate(qi)
    np.testing.assert_array_equal(np.asarray(qa.dequantize(qi)), full[i])
  with pytest.raises(ValueError, match="dq_block_size"):
    nf4.NF4Config(dq_bits=3, dq_block_size=12)


# ---------------------------------------------------------------- LoftQ ----


def test_loftq_residual_is_the_svd_tail():
  rng = np.random.default_rng(7)
  w = rng.standard_normal((48, 64)).astype(np.float32)
  cfg = loftq.LoftQConfig(quant=qa.QuantConfig(bits=2, group_size=32),
                          rank=8, alpha=16.0, iters=1, svd="exact")
  q, lora = loftq.loftq(jnp.asarray(w), cfg)
  approx = (np.asarray(qa.dequantize(q)) + cfg.alpha / cfg.rank
            * np.asarray(lora["lora_b"]) @ np.asarray(lora["lora_a"]))
  # One iteration: Q = RTN(W), and the best rank-8 fix leaves exactly the
  # tail of the residual's singular values (numpy SVD, float64).
  resid = w.astype(np.float64) - np.asarray(qa.dequantize(
      qa.quantize(jnp.asarray(w), cfg.quant)), np.float64)
  sv = np.linalg.svd(resid, compute_uv=False)
  assert np.sum((approx - w)**2) == pytest.approx(np.sum(sv[8:]**2),
                                                  rel=1e-4)
  # The randomized SVD (the default) finds the same leading subspace.
  qr_, lora_r = loftq.loftq(jnp.asarray(w), dataclasses.replace(
      cfg, svd="randomized"))
  approx_r = (np.asarray(qa.dequantize(qr_)) + cfg.alpha / cfg.rank
              * np.asarray(lora_r["lora_b"]) @ np.asarray(lora_r["lora_a"]))
  assert np.sum((approx_r - w)**2) == pytest.approx(np.sum(sv[8:]**2),
                                                    rel=1e-3)
  # More iterations do not hurt the fit.
  q5, lora5 = loftq.loftq(jnp.asarray(w), dataclasses.replace(cfg, iters=5))
  approx5 = (np.asarray(qa.dequantize(q5)) + cfg.alpha / cfg.rank
             * np.asarray(lora5["lora_b"]) @ np.asarray(lora5["lora_a"]))
  assert np.sum((approx5 - w)**2) <= np.sum((approx - w)**2) * 1.001
  with pytest.raises(ValueError, match="calibration-free"):
    loftq.loftq(jnp.asarray(w), cfg, quantizer=gptq.GPTQ())


# ---------------------------------------------------------------- merge ----


def test_gptq_merge_beats_rtn_merge_and_keeps_format():
  rng = np.random.default_rng(8)
  w = (0.05 * rng.standard_normal((32, 128))).astype(np.float32)
  q = qa.quantize(jnp.asarray(w), qa.QuantConfig(bits=3, group_size=64))
  a = jnp.asarray(0.05 * rng.standard_normal((4, 128)), jnp.float32)
  b = jnp.asarray(0.05 * rng.standard_normal((32, 4)), jnp.float32)
  mix = rng.standard_normal((128, 128)) / np.sqrt(128)
  x = (rng.standard_normal((512, 128)) @ mix).astype(np.float32)
  h = protocol.layer_stats(jnp.asarray(x)).hessian
  target = np.asarray(qa.dequantize(q), np.float64) + 2.0 * (
      np.asarray(b, np.float64) @ np.asarray(a, np.float64))
  errs = {}
  for method in merge.METHODS:
    m = merge.merge_linear(q, a, b, 2.0, method, h)
    qa.validate(m)
    assert (m.bits, m.group_size, m.shape, m.zero_point.dtype) == (
        3, 64, (32, 128), jnp.uint8)
    d = np.asarray(qa.dequantize(m), np.float64) - target
    errs[method] = np.sum((d @ np.asarray(h, np.float64)) * d)
  assert errs["gptq"] < 0.7 * errs["rtn"]
  with pytest.raises(ValueError, match="needs the layer's input Hessian"):
    merge.merge_linear(q, a, b, 2.0, "gptq")
  with pytest.raises(ValueError, match="merge method"):
    merge.merge_linear(q, a, b, 2.0, "svd", h)


def test_refit_scales_is_the_least_squares_solution():
  rng = np.random.default_rng(10)
  w = rng.standard_normal((6, 64)).astype(np.float32)
  q = qa.quantize(jnp.asarray(w), qa.QuantConfig(bits=2, group_size=16))
  x = rng.standard_normal((300, 64)).astype(np.float32)
  h = protocol.layer_stats(jnp.asarray(x)).hessian
  refit = merge.refit_scales(q, w, h, ridge=1e-9, chunk=4)
  c = np.asarray(qa.centered_codes(q), np.float64)
  x64 = x.astype(np.float64)
  for n in range(6):
    # Columns of the design matrix: X restricted to group a times codes.
    design = np.stack([x64[:, a * 16:(a + 1) * 16] @ c[n, a * 16:(a + 1) * 16]
                       for a in range(4)], 1)
    want = np.linalg.lstsq(design, x64 @ w[n], rcond=None)[0]
    np.testing.assert_allclose(np.asarray(refit.scale[n]), want, rtol=1e-3)
  before = protocol.proxy_loss(w, qa.dequantize(q), h)
  after = protocol.proxy_loss(w, qa.dequantize(refit), h)
  assert float(after) < float(before)
  np.testing.assert_array_equal(qa.as_numpy_codes(refit),
                                qa.as_numpy_codes(q))


# ---------------------------------------------------------- calibration ----


def test_calibration_segments_and_too_short_text():
  ids = np.arange(1000)
  seg = cal.calibration_segments(ids, 5, 100, seed=1)
  assert seg.shape == (5, 100)
  assert np.all(seg[:, 0] % 100 == 0)  # whole windows...
  assert len(set(seg[:, 0])) == 5       # ...all different
  np.testing.assert_array_equal(seg, cal.calibration_segments(ids, 5, 100, 1))
  with pytest.raises(ValueError, match="calibration text too short"):
    cal.calibration_segments(ids, 11, 100)


class _CharTokenizer:
  def encode(self, text, add_bos=False):
    del add_bos
    return [ord(c) % 128 for c in text]


def test_calibration_files_formats_and_balanced_mix(tmp_path):
  (tmp_path / "a.txt").write_text("a" * 400)
  (tmp_path / "b.jsonl").write_text(
      '{"question": "' + "b" * 200 + '", "answer": "' + "c" * 200 + '"}\n')
  (tmp_path / "c.tsv").write_text("sentence\tlabel\n" + "d" * 100 + "\t1\n")
  text = cal.read_calibration_text(tmp_path / "b.jsonl")
  assert text == "b" * 200 + "\n" + "c" * 200
  assert cal.read_calibration_text(tmp_path / "c.tsv") == "d" * 100
  paths = f"{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}"
  seg = cal.text_segments(_CharTokenizer(), paths, 5, 100)
  # 3 segments from a.txt (only "a"), 2 from b.jsonl.
  assert seg.shape == (5, 100)
  assert [set(row.tolist()) == {ord("a")} for row in seg] == [True] * 3 + [
      False] * 2
  with pytest.raises(ValueError, match="calibration text too short"):
    cal.text_segments(_CharTokenizer(), tmp_path / "c.tsv", 2, 100)
  with pytest.raises(ValueError, match="not found"):
    cal.text_segments(_CharTokenizer(), tmp_path / "missing.txt", 1, 10)


def test_captured_hessian_matches_manual_rmsnorm(tiny_params):
  layer = jax.tree.map(jnp.asarray, cal.layers_from_params(tiny_params)(1))
  x = jax.random.normal(jax.random.key(3), (3, 8, 64))
  stats = cal.linear_stats(TINY, layer, x, ("attn/q_proj",), batch_size=2)
  xn = np.asarray(x, np.float64)
  xn = xn / np.sqrt(np.mean(xn**2, -1, keepdims=True) + TINY.rms_norm_eps)
  xn = (xn * np.asarray(layer["input_norm"]["scale"])).reshape(-1, 64)
  np.testing.assert_allclose(np.asarray(stats["attn/q_proj"].hessian),
                             2 * xn.T @ xn / 24, rtol=1e-4, atol=1e-5)


def test_sequential_gptq_beats_rtn_on_a_model(tiny_params):
  rng = np.random.default_rng(9)
  tokens = rng.integers(0, 96, (8, 32))
  x0 = cal.embed_tokens(tiny_params, tokens)
  rtn_cfg = qa.QuantConfig(bits=2, group_size=32)
  layers, reports = cal.sequential(
      TINY, cal.layers_from_params(tiny_params), x0,
      cal.quantize_layer_with(TINY, gptq.GPTQ(gptq.GPTQConfig(
          bits=2, group_size=32)), batch_size=4, baseline=rtn_cfg),
      batch_size=4)
  assert len(reports) == 2
  for r in reports:
    for name, v in r.items():
      if name != "layer":
        assert v["proxy"] < v["proxy_rtn"], (r["layer"], name)
  gq = {**tiny_params, "layers": layers}
  rtn = loading.assemble_params(
      TINY, _tensors(tiny_params),
      quantize_fn=protocol.as_quantize_fn(protocol.RTN(rtn_cfg)))
  held_out = jnp.asarray(rng.integers(0, 96, (4, 32)))
  ref = llama.forward(tiny_params, TINY, held_out)
  err = lambda p: float(jnp.mean((llama.forward(p, TINY, held_out) - ref)**2))
  assert err(gq) < err(rtn)


def test_save_and_load_roundtrip(tmp_path, tiny_params):
  dq = nf4.NF4(nf4.NF4Config(double_quant=True, dq_block_size=64))
  params = loading.assemble_params(TINY, _tensors(tiny_params),
                                   quantize_fn=protocol.as_quantize_fn(dq))
  params["layers"]["mlp"]["up_proj"]["lora_a"] = jnp.ones((2, 4, 64))
  params["layers"]["mlp"]["up_proj"]["lora_b"] = jnp.ones((2, 128, 4)) * 1e-3
  params["embed"]["embedding"] = params["embed"]["embedding"].astype(
      jnp.bfloat16)
  protocol.save_params(tmp_path / "ckpt", params, {"quantizer": "nf4"})
  loaded, meta = protocol.load_params(tmp_path / "ckpt")
  assert meta == {"quantizer": "nf4"}
  assert (jax.tree.structure(loaded, is_leaf=qa.is_qarray)
          == jax.tree.structure(params, is_leaf=qa.is_qarray))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="no spec.json"):
    protocol.load_params(tmp_path)
  params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(
      jnp.nan)
  with pytest.raises(ValueError, match="non-finite values in final_norm"):
    protocol.save_params(tmp_path / "bad", params)


# ------------------------------------------- real model (slow, opt-in) ----


@pytest.mark.slow
def test_smollm2_rtn4_and_nf4_perplexity_reference():
  """Issue 4's independent reference (16 windows x 512, WikiText-2)."""
  smollm2_gguf()
  text = shared_path("text", "wikitext2_raw_test.txt")
  tok = loading.load_tokenizer("smollm2")
  ids = evaluate.text_token_ids(tok, text)
  for quantizer, want in ((protocol.RTN(qa.QuantConfig(bits=4)), 47.89),
                          (nf4.NF4(), 45.48)):
    config, params = loading.load_model(
        "smollm2", quantize_fn=protocol.as_quantize_fn(quantizer))
    ppl = evaluate.perplexity(params, config, ids, seq_len=512,
                              windows=16)["ppl"]
    assert ppl == pytest.approx(want, rel=0.01)
