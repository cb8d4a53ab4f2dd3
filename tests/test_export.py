"""Export round trips: tuned models load in transformers with equal logits,
and our quantized checkpoint reloads bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_path
from experiments import export as export_script
from experiments import training_loop
from experiments.configs import finetune as finetune_configs
from qft_jax._src import export as export_lib
from qft_jax._src import qarray as qa
from qft_jax._src.models import llama
from qft_jax._src.optim import qft

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _train(tmp_path, method, optimizer="adamw", lr=3e-3):
  shared_path("models", "stories260K", "stories260K.bin")
  c = finetune_configs.get_config("cpu")
  c.method.name, c.optimizer, c.learning_rate = method, optimizer, lr
  c.steps, c.data.seq_len, c.eval_batches = 12, 32, 1
  c.eval_interval, c.checkpoint_interval = 1000, 6
  c.checkpoint_dir = str(tmp_path / "ckpt")
  c.workdir = str(tmp_path / "run")
  _, state = training_loop.run(c, log=lambda *_: None)
  return c, state


def _ours(params, config, tokens):
  return np.asarray(llama.Llama(config).apply({"params": params},
                                              jnp.asarray(tokens)))


@pytest.mark.parametrize("method,optimizer,lr", [
    ("lora", "adamw", 3e-3), ("peqa", "adamw", 3e-3),
    ("qft", "lion_int8", 3e-4)])
def test_export_hf_matches_transformers(tmp_path, method, optimizer, lr):
  c, state = _train(tmp_path, method, optimizer, lr)
  info = export_script.export(c.checkpoint_dir, hf_dir=str(tmp_path / "hf"),
                              quantized_dir=str(tmp_path / "q"),
                              log=lambda *_: None)
  assert info["step"] == 12
  config, params = export_lib.load_quantized(tmp_path / "q")
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 24))
  ours = _ours(params, config, tokens)
  # Our quantized checkpoint equals the trained state bit for bit.
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  kinds = jax.tree.leaves(params, is_leaf=lambda x: qa.is_qarray(x)
                          or qft.is_qft_weight(x))
  if method == "peqa":
    assert any(qa.is_qarray(x) for x in kinds)
  if method == "qft":
    assert any(qft.is_qft_weight(x) for x in kinds)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "hf", torch_dtype=torch.float32)
  with torch.no_grad():
    theirs = model(torch.as_tensor(tokens)).logits.numpy()
  rel = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
  assert rel < 1e-4, rel


def test_load_quantized_rejects_other_dirs(tmp_path):
  with pytest.raises(ValueError, match="no spec.json"):
    export_lib.load_quantized(tmp_path)
