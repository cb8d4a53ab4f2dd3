r"""Export a fine-tuning checkpoint as an HF directory and/or our quantized one.

  python experiments/export.py --checkpoint_dir=ckpt --hf_dir=out/hf \
      --quantized_dir=out/q

The run's config is read from the checkpoint itself; the model is rebuilt in
its method's storage (so the checkpoint's structure is known) and the newest
intact step is restored.
"""

import json
import pathlib
import sys

from absl import app
from absl import flags
import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import training_loop  # pylint: disable=g-import-not-at-top
from qft_jax._src import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
from qft_jax._src import export as export_lib  # pylint: disable=g-import-not-at-top

_CKPT = flags.DEFINE_string("checkpoint_dir", None, "Fine-tuning checkpoints.",
                            required=True)
_HF = flags.DEFINE_string("hf_dir", "", "Write an HF (transformers) dir here.")
_QUANT = flags.DEFINE_string("quantized_dir", "",
                             "Write our quantized checkpoint here.")


def config_from_checkpoint(directory: str) -> ml_collections.ConfigDict:
  """The fine-tuning config saved with the newest checkpoint step."""
  steps = ckpt_lib.Checkpointer(directory).steps()
  if not steps:
    raise ValueError(f"no checkpoints in {directory}")
  meta = json.loads((pathlib.Path(directory) / str(steps[-1]) / "meta"
                     / "metadata").read_text())
  return ml_collections.ConfigDict(json.loads(meta["config"]))


def export(directory: str, hf_dir: str = "", quantized_dir: str = "",
           log=print) -> dict:
  c = config_from_checkpoint(directory)
  c.checkpoint_dir = directory
  s = training_loop.setup(c, log=log)
  state, checkpointer = training_loop.restore(c, s.state, log=log)
  checkpointer.close()
  if hf_dir:
    export_lib.export_hf(state.params, s.config, hf_dir)
    log(f"wrote HF checkpoint to {hf_dir}")
  if quantized_dir:
    export_lib.save_quantized(state.params, s.config, quantized_dir)
    log(f"wrote quantized checkpoint to {quantized_dir}")
  return {"step": int(state.step), "method": c.method.name,
          "hf_dir": hf_dir, "quantized_dir": quantized_dir}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not (_HF.value or _QUANT.value):
    raise app.UsageError("pass --hf_dir and/or --quantized_dir")
  print(json.dumps(export(_CKPT.value, _HF.value, _QUANT.value)))


if __name__ == "__main__":
  app.run(main)
