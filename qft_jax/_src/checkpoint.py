"""Training checkpoints with orbax: atomic, keep-N, resume from the newest
intact one.

A checkpoint holds the whole training state pytree (float params, QArrays,
LoRA factors, int8 optimizer states, RNG keys) plus a small JSON of metadata
(step, data position, config). Orbax writes each step into a temporary folder
and renames it when complete, so a crash mid-save leaves the previous steps
untouched. On restore, a step that fails to load (truncated or corrupted
files) is reported with a warning and the next older step is tried.
"""

from __future__ import annotations

import pathlib
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """No intact checkpoint could be restored."""


class Checkpointer:
  """Saves and restores `(state, metadata)` under one directory.

  Args:
    directory: where step folders live (created if missing).
    keep: how many most recent checkpoints to keep.
  """

  def __init__(self, directory: str | pathlib.Path, keep: int = 3):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False),
        item_names=("state", "meta"))

  def steps(self) -> list[int]:
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Writes step `step` atomically (blocks until it is on disk).

    A step already on disk (e.g. an unreadable one that training resumed
    before) is replaced.
    """
    if step in self.steps():
      self._manager.delete(step)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                       force=True)
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state: Any
                     ) -> tuple[int, Any, dict] | None:
    """The newest step that restores cleanly, or None if there is none.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` (e.g. from
        `jax.eval_shape`) with the structure of the saved state, QArrays
        included; restored arrays take its shapes, dtypes and shardings.

    Returns:
      `(step, state, meta)`.
    """
    steps = self.steps()
    for step in reversed(steps):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore()))
        _check_finite_shapes(restored.state, abstract_state)
        return step, restored.state, dict(restored.meta)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); "
                        "trying the previous one", step, self.directory,
                        type(e).__name__, str(e)[:200])
        print(f"WARNING: checkpoint step {step} is unreadable "
              f"({type(e).__name__}); falling back to an older one")
    if steps:
      raise CheckpointError(
          f"none of the checkpoints {steps} in {self.directory} could be "
          "restored")
    return None

  def close(self) -> None:
    self._manager.close()


def _check_finite_shapes(state: Any, abstract_state: Any) -> None:
  got = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  want = jax.tree.map(lambda x: (x.shape, x.dtype), abstract_state)
  if got != want:
    raise CheckpointError("restored state does not match the expected "
                          "structure, shapes or dtypes")
