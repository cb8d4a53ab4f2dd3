r"""Fine-tune a LLaMA-family model with any qft_jax method.

  python experiments/finetune.py                                 # CPU default
  python experiments/finetune.py --config.method.name=qft --config.optimizer=lion_int8
  python experiments/finetune.py --config=experiments/configs/finetune.py:sst2

Prints the run's memory plan (`qft_jax.memory.plan` of this config: total
and parts in GiB) and, on an accelerator that reports its `bytes_limit`,
refuses to start when the plan does not fit, before anything is loaded or
saved (`--config.memory_check=False` starts anyway). Then loads the model,
prepares the method's storage (quantize, add LoRA, int8
QFT weights...), trains with a progress bar, evaluates on held-out data,
writes metrics to `<workdir>/metrics.jsonl` and TensorBoard, checkpoints
with orbax (resuming from the newest intact checkpoint), and writes a final
summary (with the memory plan) to `--output_json`.
"""

import json
import os
import pathlib
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import training_loop  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).parent / "configs" / "finetune.py"),
    "Fine-tuning config file (`path[:variant]`).", lock_config=True)
_OUTPUT_JSON = flags.DEFINE_string(
    "output_json", "", "Where to write the final summary JSON.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start = time.time()
  summary, _ = training_loop.run(_CONFIG.value)
  summary["seconds"] = round(time.time() - start, 1)
  print(json.dumps(summary, indent=1))
  if _OUTPUT_JSON.value:
    out = pathlib.Path(_OUTPUT_JSON.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
