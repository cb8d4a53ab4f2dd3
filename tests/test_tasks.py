"""Task evaluations (qft_jax._src.tasks) against independent computations."""

import decimal
import json
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qft_jax._src import data
from qft_jax._src import methods
from qft_jax._src import tasks
from qft_jax._src.models import generate
from qft_jax._src.models import llama
from qft_jax._src.models import loading
from qft_jax._src.optim import qft
from conftest import shared_path


@pytest.fixture(scope="module")
def stories():
  path = shared_path("models", "stories260K", "stories260K.bin")
  config, params = loading.load_model(path)
  return config, params, loading.load_tokenizer(path)


PAD = 128  # one compiled shape for the per-example references


def _logits(params, config, ids, length=PAD):
  """Logits `(len(ids), V)` of one unbatched sequence, zero-padded on the
  right to `length` (causal attention: the padding cannot reach them)."""
  x = np.zeros((1, length), np.int32)
  x[0, :len(ids)] = ids
  return np.asarray(llama.forward(params, config, jnp.asarray(x))[0,
                                                                   :len(ids)])


def _last_logits(params, config, ids):
  return _logits(params, config, ids)[-1]


def test_label_accuracy_matches_per_example_loop(stories):
  config, params, tok = stories
  rows = data.read_sst2(shared_path("tasks", "sst2", "dev.tsv"))[:13]
  got = tasks.sst2_accuracy(params, config, tok,
                            shared_path("tasks", "sst2", "dev.tsv"),
                            limit=13, add_bos=True, batch_size=4)
  first = [tok.encode(w)[0] for w in data.SST2_LABELS]
  preds = []
  for sentence, _ in rows:
    z = _last_logits(params, config,
                     [tok.bos_id] + tok.encode(f"Review: {sentence.strip()}"
                                               "\nSentiment:"))
    preds.append(int(np.argmax(z[first])))
  labels = np.array([y for _, y in rows])
  assert got["predictions"] == preds
  assert got["n"] == 13
  assert got["accuracy"] == pytest.approx(np.mean(np.array(preds) == labels))


def test_label_accuracy_with_qft_weights_matches_dequantized(stories):
  config, params, tok = stories
  qparams, qconfig = methods.prepare_params(
      methods.MethodConfig(name="qft", group_size=-1), params, config,
      jax.random.PRNGKey(0))
  deq = jax.tree.map(
      lambda x: qft.qft_dequantize(x) if qft.is_qft_weight(x) else x,
      qparams, is_leaf=qft.is_qft_weight)
  prompts = ["Review: a fine film\nSentiment:", "Review: dull\nSentiment:",
             "Review: the best movie of the year , full of joy\nSentiment:"]
  words = (" sad", " happy")
  got = tasks.label_accuracy(qparams, qconfig, tok, prompts, [0, 1, 1], words,
                             add_bos=True, batch_size=2)
  first = [tok.encode(w)[0] for w in words]
  want = [int(np.argmax(_last_logits(deq, qconfig,
                                     [tok.bos_id] + tok.encode(p))[first]))
          for p in prompts]
  assert got["predictions"] == want


class _CharTokenizer:
  bos_id, eos_id = None, None

  def encode(self, text, add_bos=False):
    del add_bos
    return [ord(c) for c in text]


def test_label_words_sharing_a_first_token_are_rejected():
  with pytest.raises(ValueError, match="share a first token"):
    tasks.label_token_ids(_CharTokenizer(), [" good", " great"])


def test_greedy_generate_matches_unpadded_generation(stories):
  config, params, tok = stories
  prompts = [[tok.bos_id] + tok.encode(t) for t in
             ("Once upon a time", "The little dog ran to the park and saw")]
  outs = tasks.greedy_generate(params, config, prompts, 12, batch_size=2,
                               bucket=8)
  for prompt, out in zip(prompts, outs):
    ref = generate.generate(params, config, jnp.asarray([prompt]), 12)
    assert out == np.asarray(ref)[0, len(prompt):].tolist()
  # Stopping: make the 5th token of the first continuation the "EOS".
  eos = outs[0][4]
  cut = tasks.greedy_generate(params, config, prompts[:1], 12, eos_id=eos,
                              batch_size=2)
  assert cut[0] == outs[0][:outs[0].index(eos)]


@pytest.mark.parametrize("text,want", [
    ("She has 3 apples.\n#### 1,234", "1234"),
    ("So the cost is $18.00.", "18"),
    ("#### -3", "-3"),
    ("first 5, then 7.5 and finally 12", "12"),
    ("#### no number here but 42 earlier", "42"),
    ("#### 8\nQuestion: 99", "8"),
    ("nothing", None),
])
def test_extract_answer(text, want):
  got = tasks.extract_answer(text)
  assert (got is None) if want is None else got == decimal.Decimal(want)


def test_extract_answer_on_every_gsm8k_reference():
  path = shared_path("tasks", "gsm8k", "test.jsonl")
  for line in path.read_text().splitlines():
    answer = json.loads(line)["answer"]
    want = answer.split("####")[-1].strip().replace(",", "")
    assert tasks.extract_answer(answer) == decimal.Decimal(want), answer


def test_gsm8k_scoring(monkeypatch, stories):
  config, params, tok = stories
  path = shared_path("tasks", "gsm8k", "test.jsonl")
  golds = [json.loads(l)["answer"].split("####")[-1].strip()
           for l in path.read_text().splitlines()[:4]]
  replies = [f" so the answer is\n#### {golds[0]}", " it is 123456789",
             f" {golds[2]} plus 1 gives 77777", f" {golds[3]}\nQuestion: 5"]
  monkeypatch.setattr(tasks, "greedy_generate",
                      lambda *a, **k: [tok.encode(r) for r in replies])
  got = tasks.gsm8k_accuracy(params, config, tok, path, limit=4, samples=4)
  assert got["n"] == 4 and got["correct"] == 2  # the first and the last
  assert [s["correct"] for s in got["samples"]] == [True, False, False, True]


def test_rouge_against_hand_counts():
  same = tasks.rouge(["the cat sat on the mat"], [["the cat sat on the mat"]])
  assert all(same[k] == pytest.approx(100.0) for k in same)
  # unigrams: 2 of 3 predicted words match, 2 of 4 reference words.
  p, r = 2 / 3, 2 / 4
  got = tasks.rouge(["the cat sat"], [["the cat ran away"]])
  assert got["rouge1"] == pytest.approx(100 * 2 * p * r / (p + r))
  assert got["rouge2"] == pytest.approx(100 * 2 * (1 / 2) * (1 / 3)
                                        / (1 / 2 + 1 / 3))
  two = tasks.rouge(["blue sky"], [["blue sky", "green grass"]])
  assert two["rouge1"] == pytest.approx(50.0)
  assert two["rouge1_max"] == pytest.approx(100.0)


def test_dialogsum_rouge_uses_all_references(monkeypatch, stories):
  config, params, tok = stories
  path = shared_path("tasks", "dialogsum", "dialogsum.test.jsonl")
  recs = [json.loads(l) for l in path.read_text().splitlines()[:2]]
  monkeypatch.setattr(tasks, "greedy_generate", lambda *a, **k: [
      tok.encode(" " + r["summary1"] + "\nmore text") for r in recs])
  got = tasks.dialogsum_rouge(params, config, tok, path, limit=2,
                              max_prompt_tokens=64)
  assert got["n"] == 2
  assert got["rougeL_max"] == pytest.approx(100.0, abs=0.5)
  refs = [[r[f"summary{i}"] for i in (1, 2, 3)] for r in recs]
  assert got["rougeL"] == pytest.approx(tasks.rouge(
      [r["summary1"] for r in recs], refs)["rougeL"], abs=0.5)
  assert got["rougeL"] < got["rougeL_max"]


def test_dialogsum_rouge_summary_after_leading_newline(monkeypatch, stories):
  """A summary that opens with a newline is the next line, not empty."""
  config, params, tok = stories
  path = shared_path("tasks", "dialogsum", "dialogsum.test.jsonl")
  rec = json.loads(path.read_text().splitlines()[0])
  monkeypatch.setattr(tasks, "greedy_generate", lambda *a, **k: [
      tok.encode("\n\n " + rec["summary1"] + "\nmore text")])
  got = tasks.dialogsum_rouge(params, config, tok, path, limit=1,
                              max_prompt_tokens=64)
  assert got["samples"][0]["prediction"].startswith(rec["summary1"][:20])
  assert got["rougeL_max"] == pytest.approx(100.0, abs=0.5)


def _nll_loop(params, config, seqs_and_starts, length):
  """Mean -log p over completion tokens, one sequence at a time (float64)."""
  total = count = 0
  for ids, start in seqs_and_starts:
    z = _logits(params, config, ids, length).astype(np.float64)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1,
                                                              keepdims=True)) \
        - z.max(-1, keepdims=True)
    for t in range(start, len(ids)):
      total -= logp[t - 1, ids[t]]
      count += 1
  return total / count, count


def test_alpaca_heldout_loss_matches_per_example_loop(stories):
  config, params, tok = stories
  path = shared_path("tasks", "alpaca", "alpaca_subset_2k.json")
  got = tasks.alpaca_heldout_loss(params, config, tok, path, holdout=5,
                                  seq_len=256, add_bos=True, batch_size=2)
  records = json.loads(path.read_text())[-5:]
  seqs = []
  for r in records:
    prompt = [tok.bos_id] + tok.encode(data.alpaca_prompt(
        r["instruction"], r.get("input", "")))
    # Documented truncation: the completion keeps its first 256 tokens, the
    # prompt its last ones.
    completion = (tok.encode(r["output"]) + [tok.eos_id])[:256]
    prompt = prompt[-(257 - len(completion)):]
    seqs.append((prompt + completion, len(prompt)))
  want, count = _nll_loop(params, config, seqs, 257)
  assert got["n"] == 5 and got["tokens"] == count
  assert got["loss"] == pytest.approx(want, rel=1e-4)


def test_heldout_perplexity_is_the_last_tenth(stories):
  config, params, tok = stories
  path = shared_path("text", "tinyshakespeare_input.txt")
  got = tasks.heldout_perplexity(params, config, tok, path, seq_len=32,
                                 windows=2)
  text = path.read_text(encoding="utf-8")
  ids = tok.encode(text[int(len(text) * 0.9):])
  want, count = _nll_loop(params, config, [(ids[:32], 1), (ids[32:64], 1)],
                          32)
  assert got["tokens"] == count
  assert got["ppl"] == pytest.approx(math.exp(want), rel=1e-4)


def test_python_sampler_draws_the_random_shuffle_subset():
  path = shared_path("tasks", "sst2", "train.tsv")
  got = data.load_examples("sst2", path, limit=100, sampler="python", seed=0)
  rows = data.read_sst2(path)
  random.Random(0).shuffle(rows)
  want = {(data.sst2_prompt(s), data.SST2_LABELS[y]) for s, y in rows[:100]}
  assert {(e.prompt, e.completion) for e in got} == want


def test_dialogsum_examples():
  path = shared_path("tasks", "dialogsum", "dialogsum.dev.jsonl")
  first = json.loads(path.read_text().splitlines()[0])
  ex = data.load_examples("dialogsum", path)[0]
  assert ex.prompt == f"Dialogue:\n{first['dialogue']}\nSummary:"
  assert ex.completion == " " + first["summary"]


def _shapes(jaxpr) -> set:
  """Shapes of every value in a jaxpr and the jaxprs nested in it."""
  out = set()
  for eqn in jaxpr.eqns:
    out.update(tuple(v.aval.shape) for v in eqn.outvars)
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out |= _shapes(inner)
  return out


def test_evaluations_never_hold_logits_of_every_position(stories):
  """Label scoring and greedy prefill apply the head at one position only:
  no `(B, T, V)` value (7.7 GiB at 32 x 1,152 x 49,152 on SmolLM2)."""
  config, params, _ = stories
  b, t, v = 3, 40, config.vocab_size
  tokens = jnp.ones((b, t), jnp.int32)
  label = jax.make_jaxpr(tasks._label_logits, static_argnums=(1,))(
      params, config, tokens, tokens, jnp.full((b,), t - 1), jnp.arange(2))
  greedy = jax.make_jaxpr(tasks._greedy_padded, static_argnums=(1, 4, 5))(
      params, config, tokens, tokens, 4, None)
  sample = jax.make_jaxpr(generate._generate,
                          static_argnums=(1, 4, 5, 6, 7))(
      params, config, tokens, jax.random.key(0), 4, 0.0, None, None)
  for jaxpr in (label, greedy, sample):
    shapes = _shapes(jaxpr.jaxpr)
    assert (b, 1, v) in shapes or (b, v) in shapes  # the head did run
    assert not [s for s in shapes if len(s) == 3 and s[1] > 1 and s[2] == v]
