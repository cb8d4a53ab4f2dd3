"""The Flax LLaMA family against transformers (torch CPU), plus its loaders.

Tiny random LLaMA (llama-3 RoPE scaling, sharded safetensors), Mistral
(sliding window shorter than the sequence) and Qwen2 (q/k/v biases, tied
embeddings) checkpoints are written by transformers inside the test; our
float32 logits must match transformers' within 1e-4 relative.
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qft_jax._src import qarray as qa
from qft_jax._src.models import generate
from qft_jax._src.models import llama
from qft_jax._src.models import loading

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, T = 96, 12
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5)


def _hf_config(kind):
  if kind == "llama":
    return transformers.LlamaConfig(
        **COMMON, rope_theta=500.0, rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
  if kind == "llama_tied":
    return transformers.LlamaConfig(**COMMON, tie_word_embeddings=True)
  if kind == "mistral":
    return transformers.MistralConfig(**COMMON, sliding_window=5)
  if kind == "qwen2":
    return transformers.Qwen2Config(**COMMON, tie_word_embeddings=True)
  raise AssertionError(kind)


def _randomize(model, seed):
  """Random weights large enough for informative logits; norms near 1."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """{kind: (directory, torch model)} written with save_pretrained."""
  out = {}
  for seed, kind in enumerate(("llama", "llama_tied", "mistral", "qwen2")):
    cfg = _hf_config(kind)
    cfg._attn_implementation = "eager"  # pylint: disable=protected-access
    cls = {"mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}.get(
               kind, transformers.LlamaForCausalLM)
    model = cls(cfg).eval()
    _randomize(model, seed)
    d = tmp_path_factory.mktemp(kind)
    shard = {"max_shard_size": "20KB"} if kind == "llama" else {}
    model.save_pretrained(d, **shard)
    out[kind] = (d, model)
  return out


def _torch_logits(model, tokens, attention_mask=None):
  with torch.no_grad():
    kw = {} if attention_mask is None else {
        "attention_mask": torch.tensor(np.asarray(attention_mask))}
    return model(torch.tensor(np.asarray(tokens)), **kw).logits.numpy()


def _rel_err(ours, ref):
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _tokens(seed, batch=2, length=T):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length),
                                              dtype=np.int32)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_logits_match_transformers(hf_models, kind):
  d, model = hf_models[kind]
  if kind == "llama":
    assert (d / "model.safetensors.index.json").exists()  # sharded save
  config, params = loading.load_model(d)
  assert config.attention_bias == (kind == "qwen2")
  assert config.tie_word_embeddings == (kind == "qwen2")
  assert config.sliding_window == (5 if kind == "mistral" else None)
  assert (config.rope_scaling is not None) == (kind == "llama")
  tokens = _tokens(1)
  ref = _torch_logits(model, tokens)
  ours = llama.forward(params, config, tokens)
  assert ours.dtype == jnp.float32 and ours.shape == (2, T, VOCAB)
  assert _rel_err(ours, ref) < 1e-4


def test_padding_mask_matches_transformers(hf_models):
  d, model = hf_models["llama"]
  config, params = loading.load_model(d)
  tokens = _tokens(2)
  mask = np.ones_like(tokens)
  mask[0, :4] = 0  # left padding in the first row
  ref = _torch_logits(model, tokens, mask)
  ours = np.asarray(llama.forward(params, config, tokens,
                                  attention_mask=mask))
  real = mask.astype(bool)
  assert _rel_err(ours[real], ref[real]) < 1e-4


_quantize = jax.jit(qa.quantize, static_argnums=1)


def _rtn(path, w):
  del path
  return _quantize(jnp.asarray(w), qa.QuantConfig(bits=4, group_size=16))


def _map_kernels(params, fn):
  """Applies fn to every decoder linear kernel of a param tree."""
  out = jax.tree.map(lambda x: x, params, is_leaf=qa.is_qarray)
  for block, names in llama.LINEAR_NAMES.items():
    for name in names:
      node = dict(out["layers"][block][name])
      node["kernel"] = fn(node["kernel"])
      out["layers"][block][name] = node
  return out


def test_qarray_kernels_run_through_the_model(hf_models):
  d, _ = hf_models["qwen2"]
  config, qparams = loading.load_model(d, quantize_fn=_rtn)
  q = qparams["layers"]["mlp"]["down_proj"]["kernel"]
  assert isinstance(q, qa.QArray)
  assert q.batch_shape == (2,) and q.shape == (32, 48)
  # Reference: the same model with every kernel dequantized to float32.
  dense = _map_kernels(qparams, jax.jit(lambda k: qa.dequantize(k,
                                                                 jnp.float32)))
  tokens = _tokens(3)
  ours = llama.forward(qparams, config, tokens)
  ref = np.asarray(llama.forward(dense, config, tokens))
  assert _rel_err(ours, ref) < 1e-5
  _, fparams = loading.load_model(d)
  assert _rel_err(llama.forward(fparams, config, tokens), ref) > 1e-4


def test_lora_entries_are_applied(hf_models):
  d, _ = hf_models["mistral"]
  config, params = loading.load_model(d)
  config = dataclasses.replace(config, lora_alpha=8.0)
  rank, key = 4, jax.random.key(0)
  ka, kb = jax.random.split(key)
  node = params["layers"]["attn"]["v_proj"]
  a = 0.3 * jax.random.normal(ka, (2, rank, 32))
  b = 0.3 * jax.random.normal(kb, (2, 16, rank))
  with_lora = jax.tree.map(lambda x: x, params)
  with_lora["layers"]["attn"]["v_proj"] = {**node, "lora_a": a, "lora_b": b}
  merged = jax.tree.map(lambda x: x, params)
  merged["layers"]["attn"]["v_proj"] = {
      "kernel": node["kernel"] + (8.0 / rank) * jnp.einsum("lor,lri->loi",
                                                            b, a)}
  tokens = _tokens(4)
  ref = np.asarray(llama.forward(merged, config, tokens))
  assert _rel_err(llama.forward(with_lora, config, tokens), ref) < 1e-5
  assert _rel_err(llama.forward(params, config, tokens), ref) > 1e-3


def test_greedy_generation_equals_full_forward_argmax(hf_models):
  # Mistral: the 5-token sliding window is crossed while decoding.
  d, _ = hf_models["mistral"]
  config, params = loading.load_model(d)
  prompt = _tokens(5, batch=2, length=3)
  out = np.asarray(generate.generate(params, config, prompt, 9))
  assert out.shape == (2, 12) and (out[:, :3] == prompt).all()
  # Causal attention: position t-1 of one full forward sees exactly out[:, :t].
  logits = llama.forward(params, config, out)
  np.testing.assert_array_equal(np.argmax(logits[:, 2:-1], -1), out[:, 3:])


def test_sampling(hf_models):
  d, _ = hf_models["llama"]
  config, params = loading.load_model(d)
  prompt = _tokens(6, batch=2, length=4)
  greedy = generate.generate(params, config, prompt, 6)
  top1 = generate.generate(params, config, prompt, 6, rng=jax.random.key(3),
                           temperature=0.7, top_k=1)
  np.testing.assert_array_equal(greedy, top1)
  s1 = generate.generate(params, config, prompt, 6, rng=jax.random.key(4),
                         temperature=1.5)
  s2 = generate.generate(params, config, prompt, 6, rng=jax.random.key(4),
                         temperature=1.5)
  np.testing.assert_array_equal(s1, s2)
  assert ((np.asarray(s1) >= 0) & (np.asarray(s1) < VOCAB)).all()
  assert not np.array_equal(s1, greedy)
  eos = int(greedy[0, 5])
  stopped = np.asarray(generate.generate(params, config, prompt, 6,
                                         eos_id=eos))
  assert (stopped[0, 6:] == eos).all()


def test_gguf_with_llama_cpp_permutation(hf_models, tmp_path):
  """A GGUF written the way llama.cpp's converter does loads exactly."""
  gguf = pytest.importorskip("gguf")
  d, model = hf_models["llama_tied"]
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  cfg = model.config

  def permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))

  path = tmp_path / "tiny.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(2)
  w.add_context_length(64)
  w.add_embedding_length(32)
  w.add_feed_forward_length(48)
  w.add_head_count(4)
  w.add_head_count_kv(2)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(1e-5)
  w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
  w.add_tensor("output_norm.weight", sd["model.norm.weight"])
  names = {"input_layernorm": "attn_norm", "post_attention_layernorm":
           "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj":
           "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj":
           "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj":
           "ffn_up", "mlp.down_proj": "ffn_down"}
  for i in range(2):
    for hf_name, g_name in names.items():
      t = sd[f"model.layers.{i}.{hf_name}.weight"]
      if g_name == "attn_q":
        t = permute(t, 4)
      elif g_name == "attn_k":
        t = permute(t, 2)
      w.add_tensor(f"blk.{i}.{g_name}.weight", np.ascontiguousarray(t))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  config, params = loading.load_model(path)
  assert config.tie_word_embeddings and config.num_kv_heads == 2
  tokens = _tokens(7)
  assert _rel_err(llama.forward(params, config, tokens),
                  _torch_logits(model, tokens)) < 1e-4


def test_scan_stacks_layers_and_remat_keeps_gradients():
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32,
                             intermediate_size=48, num_layers=3, num_heads=4,
                             num_kv_heads=1, head_dim=8)
  params = llama.init_params(config, jax.random.key(0))
  flat = {"/".join(k.key for k in path): x.shape for path, x in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  assert flat == llama.param_shapes(config)
  assert flat["layers/attn/k_proj/kernel"] == (3, 8, 32)
  tokens = _tokens(8)[:, :6] % 64

  def grads(remat):
    cfg = dataclasses.replace(config, remat=remat)
    loss = lambda p: jnp.sum(jax.nn.log_softmax(
        llama.Llama(cfg).apply({"params": p}, tokens))[..., 0])
    return jax.jit(jax.grad(loss))(params)

  ref = grads("none")
  for policy in ("full", "dots_saveable"):
    got = grads(policy)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _attention_grads(attention: str, dtype, seed: int):
  """Loss and gradients of a small GQA model with the given attention."""
  config = llama.LlamaConfig(vocab_size=128, hidden_size=128,
                             intermediate_size=192, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=32, remat="full",
                             attention=attention, dtype=dtype)
  params = llama.init_params(config, jax.random.key(seed))
  tokens = jax.random.randint(jax.random.key(seed + 1), (2, 64), 0, 128)

  def loss(p):
    logits = llama.Llama(config).apply({"params": p}, tokens)
    return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1, 0])

  return jax.jit(jax.value_and_grad(loss))(params)


def test_attention_choice_is_validated():
  with pytest.raises(ValueError, match="attention must be one of"):
    llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                      num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                      attention="flash")
  with pytest.raises(ValueError, match="cudnn"):  # float32 has no cuDNN path
    _attention_grads("cudnn", jnp.float32, 0)
  assert llama.attention_mask_matrix(
      llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                        num_layers=1, num_heads=1, num_kv_heads=1,
                        head_dim=8), 4, 4, 0) is None


@pytest.mark.gpu
def test_cudnn_attention_matches_xla_on_gpu():
  """Fused cuDNN attention: same loss and gradients as the einsum path."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU (run with JAX_PLATFORMS=cuda)")
  seed = int(np.random.randint(1 << 20))
  loss_x, g_x = _attention_grads("xla", jnp.bfloat16, seed)
  loss_c, g_c = _attention_grads("cudnn", jnp.bfloat16, seed)
  assert jnp.isfinite(loss_c)
  np.testing.assert_allclose(loss_c, loss_x, rtol=2e-2)
  for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_x)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) <= 3e-2 * np.linalg.norm(b) + 1e-6


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
  """Copies a single-file HF dir, editing its tensors / config."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst)
  if edit_tensors:
    tensors = load_file(dst / "model.safetensors")
    edit_tensors(tensors)
    save_file(tensors, dst / "model.safetensors")
  if edit_config:
    cfg = json.loads((dst / "config.json").read_text())
    edit_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
  return dst


def test_bad_inputs_raise_value_error(hf_models, tmp_path):
  src, _ = hf_models["qwen2"]
  cases = {
      "unknown architecture": dict(edit_config=lambda c: c.update(
          architectures=["GPT2LMHeadModel"])),
      "missing tensors.*final_norm": dict(
          edit_tensors=lambda t: t.pop("model.norm.weight")),
      "unexpected tensors.*extra": dict(edit_tensors=lambda t: t.update(
          {"model.layers.0.extra.weight": np.zeros(3, np.float32)})),
      "shape": dict(edit_tensors=lambda t: t.update(
          {"model.norm.weight": np.zeros(7, np.float32)})),
  }
  for i, (message, edit) in enumerate(cases.items()):
    bad = _rewrite(src, tmp_path / f"bad{i}", **edit)
    with pytest.raises(ValueError, match=message):
      loading.load_model(bad)
  with pytest.raises(ValueError, match="does not exist"):
    loading.load_model(tmp_path / "nope")
  (tmp_path / "weights.txt").write_text("x")
  with pytest.raises(ValueError, match="unrecognized checkpoint"):
    loading.load_model(tmp_path / "weights.txt")
  header = np.array([8, 16, 1, 2, 2, 10, 4], np.int32)  # no weights follow
  (tmp_path / "short.bin").write_bytes(header.tobytes())
  with pytest.raises(ValueError, match="bytes, but its header"):
    loading.load_model(tmp_path / "short.bin")

  config, params = loading.load_model(src)
  with pytest.raises(ValueError, match="tokens must be"):
    llama.forward(params, config, np.zeros((4,), np.int32))
  broken = dict(params)
  del broken["final_norm"]
  with pytest.raises(ValueError, match="missing parameters.*final_norm"):
    llama.forward(broken, config, _tokens(0))
  with pytest.raises(ValueError, match="not a multiple"):
    llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                      num_layers=1, num_heads=3, num_kv_heads=2, head_dim=8)
  with pytest.raises(ValueError, match="remat"):
    dataclasses.replace(config, remat="sometimes")
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate.generate(params, config, _tokens(0), 0)
  with pytest.raises(ValueError, match="rng"):
    generate.generate(params, config, _tokens(0), 2, temperature=1.0)


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "[UNK]": 4}, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.decoder = tokenizers.decoders.WordPiece()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "config.json").write_text(json.dumps(
      {"architectures": ["LlamaForCausalLM"], "bos_token_id": 0,
       "eos_token_id": 1}))
  t = loading.load_tokenizer(tmp_path)
  assert (t.bos_id, t.eos_id) == (0, 1)
  assert t.encode("a b a", add_bos=True) == [0, 2, 3, 2]
  assert t.decode([2, 3]) == "a b"

