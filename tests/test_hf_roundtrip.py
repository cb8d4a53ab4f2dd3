"""`save_hf` -> transformers `from_pretrained` -> the same logits as ours."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qft_jax._src import qarray as qa
from qft_jax._src.models import hf
from qft_jax._src.models import llama
from qft_jax._src.models import loading

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
            max_position_embeddings=64)
CONFIGS = {
    "llama": llama.LlamaConfig(
        **BASE, rope_theta=500.0, rope_scaling=dict(
            factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16)),
    "qwen2": llama.LlamaConfig(**BASE, attention_bias=True,
                               tie_word_embeddings=True),
    "mistral": llama.LlamaConfig(**BASE, sliding_window=4),
}
ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
        "mistral": "MistralForCausalLM"}


def _random_params(config, seed):
  params = llama.init_params(config, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  new = []
  for (path, x), k in zip(leaves, keys):
    noise = jax.random.normal(k, x.shape)
    new.append(1.0 + 0.1 * noise if path[-1].key == "scale" else 0.15 * noise)
  return jax.tree.unflatten(treedef, new)


_quantize = jax.jit(qa.quantize, static_argnums=1)


def _hf_logits(directory, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, attn_implementation="eager", dtype=torch.float32).eval()
  with torch.no_grad():
    return model, model(torch.tensor(tokens)).logits.numpy()


def _rel_err(ours, ref):
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _tokens(config, seed=0):
  return np.random.default_rng(seed).integers(
      0, config.vocab_size, (2, 10), dtype=np.int32)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_save_hf_loads_in_transformers(kind, tmp_path):
  config = CONFIGS[kind]
  params = _random_params(config, seed=len(kind))
  hf.save_hf(params, config, tmp_path)
  tokens = _tokens(config)
  model, ref = _hf_logits(tmp_path, tokens)
  assert type(model).__name__ == ARCH[kind]
  assert _rel_err(llama.forward(params, config, tokens), ref) < 1e-4
  # And back into ours, unchanged.
  config2, params2 = loading.load_model(tmp_path)
  assert config2 == config
  for x, y in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)


def test_save_hf_dequantizes_and_merges_lora(tmp_path):
  config = dataclasses.replace(CONFIGS["llama"], lora_alpha=8.0)
  params = _random_params(config, seed=7)
  qcfg = qa.QuantConfig(bits=4, group_size=16)
  key = jax.random.key(11)
  for block, names in llama.LINEAR_NAMES.items():
    for name in names:
      node = params["layers"][block][name]
      node["kernel"] = _quantize(node["kernel"], qcfg)
      if name in ("q_proj", "up_proj"):
        out, inp = node["kernel"].shape
        ka, kb, key = jax.random.split(key, 3)
        node["lora_a"] = 0.2 * jax.random.normal(ka, (2, 4, inp))
        node["lora_b"] = 0.2 * jax.random.normal(kb, (2, out, 4))
  hf.save_hf(params, config, tmp_path)
  tokens = _tokens(config, seed=1)
  _, ref = _hf_logits(tmp_path, tokens)
  assert _rel_err(llama.forward(params, config, tokens), ref) < 1e-4


def test_save_hf_bfloat16(tmp_path):
  config = CONFIGS["qwen2"]
  params = _random_params(config, seed=3)
  hf.save_hf(params, config, tmp_path, dtype=ml_dtypes.bfloat16)
  config2, params2 = loading.load_model(tmp_path, dtype=jnp.bfloat16)
  assert params2["embed"]["embedding"].dtype == jnp.bfloat16
  tokens = _tokens(config, seed=2)
  _, ref = _hf_logits(tmp_path, tokens)  # bf16 weights, float32 compute
  f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params2)
  assert _rel_err(llama.forward(f32, dataclasses.replace(
      config2, dtype=jnp.float32), tokens), ref) < 1e-4
  assert _rel_err(llama.forward(params, config, tokens), ref) < 5e-2
