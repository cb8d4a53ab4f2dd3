"""experiments/peer_torch_finetune.py feeds torch exactly our task pipelines.

The peer re-implements (without jax) the rows, batches, schedule, eval
batching and ROUGE scoring of `qft_jax._src.data` / `methods.schedule` /
`tasks` for SST-2 and DialogSum; these tests check each against ours on the
real task files and SmolLM2 tokenizer.
"""

import numpy as np
import pytest

from conftest import shared_path, smollm2_gguf
from experiments import peer_torch_finetune as peer
from qft_jax._src import data as data_lib
from qft_jax._src import methods
from qft_jax._src import tasks


@pytest.fixture(scope="module")
def tokenizer():
  smollm2_gguf()
  from qft_jax._src.models import loading  # pylint: disable=g-import-not-at-top
  return loading.load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def peer_tokenizer():
  return peer.load_tokenizer(smollm2_gguf())


def test_training_rows_are_ours(tokenizer):
  """The 4,000 rows, tokens and loss masks of reproduce.py's sst2 task."""
  path = shared_path("tasks", "sst2", "train.tsv")
  ours = data_lib.build_dataset("sst2", path, tokenizer, 96, split="train",
                                limit=4000, seed=0, sampler="python",
                                add_bos=False)
  examples = peer.sample_rows(peer.train_examples("sst2", path), 4000, 0)
  rows, mask = peer.tokenize_examples(examples, tokenizer, 96, add_bos=False)
  np.testing.assert_array_equal(rows, ours.rows)
  np.testing.assert_array_equal(mask, ours.mask)
  assert rows.shape == (4000, 97)
  # Each row's loss covers the label token and EOS.
  assert set(mask.sum(1).tolist()) == {2.0}
  label_rows, label_mask = peer.tokenize_examples(
      examples, tokenizer, 96, add_bos=False, loss_on="label")
  np.testing.assert_array_equal(label_rows, rows)
  assert set(label_mask.sum(1).tolist()) == {1.0}
  first = np.argmax(mask > 0, axis=1)
  np.testing.assert_array_equal(label_mask[np.arange(4000), first], 1.0)


def test_batches_schedule_and_eval_order_are_ours():
  ds = data_lib.TokenDataset(np.arange(4000 * 3).reshape(4000, 3),
                             np.ones((4000, 3), np.float32))
  for seed in (0, 1):
    for step in list(range(0, 260, 7)) + [249, 250]:
      b = ds.batch(step, 16, seed=seed)
      idx = peer.batch_indices(step, 4000, 16, seed)
      np.testing.assert_array_equal(ds.rows[idx][:, :-1], b.tokens)
  sched = methods.schedule("linear", 2e-4, 250, 20)
  for step in range(0, 260):
    assert peer.lr_factor(step, 250, 20) * 2e-4 == pytest.approx(
        float(sched(step)), rel=0, abs=2e-4 * 1e-6), step  # float32
  lengths = np.random.default_rng(0).integers(5, 60, 100)
  for (a, na), (b, nb) in zip(peer.length_batches(lengths, 32),
                              tasks._length_batches(lengths, 32)):  # pylint: disable=protected-access
    np.testing.assert_array_equal(a, b)
    assert na == nb


def test_dev_prompts_are_ours():
  path = shared_path("tasks", "sst2", "dev.tsv")
  rows = peer.read_sst2(path)
  assert rows == data_lib.read_sst2(path) and len(rows) == 872
  assert [peer.sst2_prompt(s) for s, _ in rows[:50]] == [
      data_lib.sst2_prompt(s) for s, _ in rows[:50]]
  assert peer.SST2_LABELS == data_lib.SST2_LABELS


def test_gguf_special_ids_are_ours(tokenizer, peer_tokenizer):
  assert (peer_tokenizer.bos_id, peer_tokenizer.eos_id) == (
      tokenizer.bos_id, tokenizer.eos_id) == (1, 2)


def test_dialogsum_rows_are_ours(tokenizer, peer_tokenizer):
  """reproduce.py's dialogsum training rows: all 500 dev dialogues, 640."""
  path = shared_path("tasks", "dialogsum", "dialogsum.dev.jsonl")
  ours = data_lib.build_dataset("dialogsum", path, tokenizer, 640,
                                split="train", add_bos=False)
  examples = peer.sample_rows(peer.train_examples("dialogsum", path), 0, 0)
  assert examples == [(e.prompt, e.completion) for e in
                      data_lib.load_examples("dialogsum", path)]
  # The peer's own (transformers) tokenizer gives the same rows as ours.
  for tok in (tokenizer, peer_tokenizer):
    rows, mask = peer.tokenize_examples(examples, tok, 640)
    np.testing.assert_array_equal(rows, ours.rows)
    np.testing.assert_array_equal(mask, ours.mask)
  assert rows.shape == (500, 641)
  assert peer_tokenizer.decode(rows[0]) == tokenizer.decode(rows[0])


def test_dialogsum_eval_is_ours(tokenizer):
  """Test prompts (cut to 1,024 tokens), references, predictions, ROUGE."""
  path = shared_path("tasks", "dialogsum", "dialogsum.test.jsonl")
  records = peer.read_json_records(path)
  assert records == data_lib.read_json_records(path) and len(records) == 500
  prompts = [peer.dialogsum_prompt(r["dialogue"]) for r in records]
  assert prompts == [data_lib.dialogsum_prompt(r["dialogue"])
                     for r in records]
  for limit in (None, 1024, 64):
    assert peer.encode_prompts(tokenizer, prompts, False, limit) == (
        tasks._encode_prompts(tokenizer, prompts, False, limit))  # pylint: disable=protected-access
  refs = [peer.dialogsum_references(r) for r in records]
  assert {len(r) for r in refs} == {3}
  for text in ["\n\n #Person1# asks.\nDialogue: x", " a b \n", "", "\n",
               "one line<|im_end|>"]:
    ours = tasks._cut(text.lstrip(), ("\n",)).strip()  # pylint: disable=protected-access
    assert peer.summary_line(text) == ours
  preds = [r["summary1"][:40] for r in records[:20]] + ["", "Ms. Dawson"]
  np.testing.assert_equal(peer.rouge(preds, refs[:22], peer.rouge_scorer()),
                          tasks.rouge(preds, refs[:22]))
