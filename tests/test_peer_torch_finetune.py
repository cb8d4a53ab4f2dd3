"""experiments/peer_torch_finetune.py feeds torch exactly our SST-2 pipeline.

The peer re-implements (without jax) the rows, batches, schedule and eval
batching of `qft_jax._src.data` / `methods.schedule` / `tasks`; these tests
check each against ours on the real SST-2 files and SmolLM2 tokenizer.
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


def test_training_rows_are_ours(tokenizer):
  """The 4,000 rows, tokens and loss masks of reproduce.py's sst2 task."""
  path = shared_path("tasks", "sst2", "train.tsv")
  ours = data_lib.build_dataset("sst2", path, tokenizer, 96, split="train",
                                limit=4000, seed=0, sampler="python",
                                add_bos=False)
  rows, mask = peer.tokenize_rows(
      peer.sample_rows(peer.read_sst2(path), 4000, 0), tokenizer.encode,
      tokenizer.bos_id, tokenizer.eos_id, 96, add_bos=False)
  np.testing.assert_array_equal(rows, ours.rows)
  np.testing.assert_array_equal(mask, ours.mask)
  assert rows.shape == (4000, 97)
  # Each row's loss covers the label token and EOS.
  assert set(mask.sum(1).tolist()) == {2.0}
  label_rows, label_mask = peer.tokenize_rows(
      peer.sample_rows(peer.read_sst2(path), 4000, 0), tokenizer.encode,
      tokenizer.bos_id, tokenizer.eos_id, 96, add_bos=False, loss_on="label")
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
