r"""Post-training quantization of a model, saved and scored by perplexity.

Quantizes every decoder linear with one quantizer, optionally calibrating on
a text file (never the evaluation text), saves the quantized parameter tree
(`protocol.save_params`: params.npz + spec.json, reloadable with
`protocol.load_params`) and scores perplexity with
`qft_jax._src.evaluate.perplexity` (non-overlapping windows from the start of
the file, no BOS).

Quantizers: none (float), rtn, nf4 (block = --group_size, --double_quant),
gptq (sequential, true-sequential within a layer, --act_order), apiq
(block-wise, LoRA applied), apiq_lw (layer-wise), loftq (LoRA applied).
With --merge=gptq|rtn the LoRA of apiq/apiq_lw/loftq is then folded into the
quantized base (`merge.merge_model`) and the merged model is scored too.

  python experiments/quantize.py --quantizer=rtn --bits=4 \
      --output_json=experiments/results/ptq_smollm2_rtn_b4_g64.json
  python experiments/quantize.py --quantizer=gptq --bits=2 --calib_segments=32
"""

import dataclasses
import json
import pathlib
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from qft_jax._src import evaluate
from qft_jax._src import qarray as qa
from qft_jax._src.models import llama
from qft_jax._src.models import loading
from qft_jax._src.quantizers import apiq
from qft_jax._src.quantizers import calibration as cal
from qft_jax._src.quantizers import gptq
from qft_jax._src.quantizers import loftq
from qft_jax._src.quantizers import merge
from qft_jax._src.quantizers import nf4
from qft_jax._src.quantizers import protocol

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "text"

QUANTIZERS = ["none", "rtn", "nf4", "gptq", "apiq", "apiq_lw", "loftq"]

_MODEL = flags.DEFINE_string(
    "model", "smollm2", "HF directory, .gguf, llama2.c .bin, 'smollm2', or "
    "'llama7b_random' (calibration benchmark, random weights, no eval).")
_QUANTIZER = flags.DEFINE_enum("quantizer", "rtn", QUANTIZERS,
                               "How decoder linears are quantized.")
_BITS = flags.DEFINE_integer("bits", 4, "Code bits (2, 3, 4, 8).")
_GROUP = flags.DEFINE_integer("group_size", 64,
                              "Input columns per scale (-1: per channel).")
_CALIB = flags.DEFINE_string(
    "calib", str(TEXT / "tinyshakespeare_input.txt"),
    "Calibration file(s), comma-separated (.txt, .json/.jsonl, .tsv; see "
    "calibration.read_calibration_text) for gptq, apiq, apiq_lw and merge; "
    "never the evaluation text.")
_CALIB_SEGMENTS = flags.DEFINE_integer("calib_segments", 32,
                                       "Calibration segments (paper: 128).")
_CALIB_SEQ_LEN = flags.DEFINE_integer("calib_seq_len", 512,
                                      "Tokens per segment (paper: 2048).")
_DATASET = flags.DEFINE_string("dataset", str(TEXT / "wikitext2_raw_test.txt"),
                               "Evaluation text, tokenized as one string.")
_WINDOWS = flags.DEFINE_integer("windows", 16, "Evaluation windows.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per window.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Result JSON path.")
_SAVE_DIR = flags.DEFINE_string("save_dir", None,
                                "Where to save the quantized params.")
_ACT_ORDER = flags.DEFINE_bool("act_order", False,
                                "GPTQ act-order (also for --merge=gptq).")
_DAMP = flags.DEFINE_float("damp", 0.01, "GPTQ relative damping.")
_STATIC_GROUPS = flags.DEFINE_bool(
    "static_groups", False, "GPTQ: group parameters from the original "
    "weights (RTN's grid) instead of when each group starts.")
_LOAD_DIR = flags.DEFINE_string(
    "load_dir", None, "Start from params saved by --save_dir (skips "
    "quantizing; use with --merge to fold a trained LoRA into its base).")
_DOUBLE_QUANT = flags.DEFINE_bool("double_quant", False,
                                  "NF4 double quantization of the scales.")
_RANK = flags.DEFINE_integer("rank", 64, "LoRA rank (apiq, apiq_lw, loftq).")
_ALPHA = flags.DEFINE_float("alpha", 16.0, "LoRA alpha.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "ApiQ epochs (paper: 20).")
_LW_STEPS = flags.DEFINE_integer("lw_steps", None,
                                 "ApiQ-lw AdamW steps per linear "
                                 "(default epochs * calib_segments).")
_LOFTQ_ITERS = flags.DEFINE_integer("loftq_iters", 5, "LoftQ iterations.")
_MERGE = flags.DEFINE_enum("merge", "none", ["none", "gptq", "rtn"],
                           "Fold the LoRA into the base after quantizing.")
_BATCH = flags.DEFINE_integer("batch_size", 4,
                              "Segments/windows per forward pass.")
_SEED = flags.DEFINE_integer("seed", 0, "Calibration draw and LoRA seed.")
_MAX_LAYERS = flags.DEFINE_integer(
    "max_layers", 32, "Layers to quantize of --model=llama7b_random.")


def _rel(path: str) -> str:
  """A path relative to the repository root when it lies beside it."""
  try:
    return str(pathlib.Path("..") / pathlib.Path(path).resolve().relative_to(
        REPO.parent))
  except ValueError:
    return path


def _rtn_config() -> qa.QuantConfig:
  return qa.QuantConfig(bits=_BITS.value, group_size=_GROUP.value)


def _calibration_inputs(params, tokenizer):
  segments = cal.text_segments(tokenizer, _CALIB.value, _CALIB_SEGMENTS.value,
                               _CALIB_SEQ_LEN.value, _SEED.value)
  return cal.embed_tokens(params, segments)


def _with_layers(params: dict, layers: dict) -> dict:
  return {**params, "layers": layers}


def quantize(config, params, tokenizer):
  """Returns (quantized params, extra JSON fields)."""
  name = _QUANTIZER.value
  if name in ("gptq", "apiq", "apiq_lw"):
    layers, extra = calibrate(config, cal.layers_from_params(params),
                              lambda: _calibration_inputs(params, tokenizer))
  elif name == "loftq":
    quantizer = loftq.LoftQ(loftq.LoftQConfig(
        quant=_rtn_config(), rank=_RANK.value, alpha=_ALPHA.value,
        iters=_LOFTQ_ITERS.value))
    layers = map_linears(params, quantizer.quantize_with_lora)
    extra = {"rank": _RANK.value, "alpha": _ALPHA.value,
             "loftq_iters": _LOFTQ_ITERS.value}
  elif name == "none":
    return params, {}
  else:
    quantizer = (protocol.RTN(_rtn_config()) if name == "rtn" else
                 nf4.NF4(nf4.NF4Config(block_size=_GROUP.value,
                                       double_quant=_DOUBLE_QUANT.value)))
    layers = map_linears(params, lambda w: (quantizer(w), {}))
    extra = {}
  return _with_layers(params, layers), extra


def calibrate(config, source, make_x0):
  """Runs gptq / apiq / apiq_lw layer by layer; returns (layers, extra)."""
  name = _QUANTIZER.value
  log = lambda s: print(s[:300], flush=True)
  if name == "gptq":
    quantizer = gptq.GPTQ(gptq.GPTQConfig(
        bits=_BITS.value, group_size=_GROUP.value, act_order=_ACT_ORDER.value,
        static_groups=_STATIC_GROUPS.value, damp=_DAMP.value))
    layers, reports = cal.sequential(
        config, source, make_x0(),
        cal.quantize_layer_with(config, quantizer, batch_size=_BATCH.value,
                                baseline=_rtn_config()),
        batch_size=_BATCH.value, log=log)
    extra = proxy_summary(reports)
  else:
    acfg = apiq.ApiQConfig(bits=_BITS.value, group_size=_GROUP.value,
                           rank=_RANK.value, alpha=_ALPHA.value,
                           epochs=_EPOCHS.value, seed=_SEED.value)
    x0 = make_x0()
    if name == "apiq":
      layers, reports = apiq.apiq_blockwise_model(
          config, source, x0, acfg, batch_size=_BATCH.value, log=log)
      extra = {"epoch_loss_first_last_layer": [reports[0]["epoch_loss"],
                                               reports[-1]["epoch_loss"]]}
    else:
      steps = _LW_STEPS.value or _EPOCHS.value * _CALIB_SEGMENTS.value
      quantizer = apiq.ApiQLayerwise(acfg, steps=steps)
      layers, reports = cal.sequential(
          config, source, x0,
          cal.quantize_layer_with(config, quantizer, batch_size=_BATCH.value,
                                  with_cross=True, baseline=_rtn_config()),
          need_fp=True, batch_size=_BATCH.value, log=log)
      extra = {**proxy_summary(reports), "lw_steps": steps}
    extra.update(epochs=_EPOCHS.value, rank=_RANK.value, alpha=_ALPHA.value)
  return layers, extra


LLAMA7B = llama.LlamaConfig(vocab_size=32000, hidden_size=4096,
                            intermediate_size=11008, num_layers=32,
                            num_heads=32, num_kv_heads=32, head_dim=128)


def random_llama7b_benchmark() -> dict:
  """Calibrating quantizers on a LLaMA-7B-shaped model with random weights.

  Layer `l` is drawn on the host (numpy, std 0.02, unit norms) only when the
  driver asks for it, so the float model (27 GB in float32) never exists on
  the device; calibration inputs are random hidden states `(S, T, 4096)`.
  Reports seconds per layer and the device's peak bytes in use.
  """
  config = dataclasses.replace(LLAMA7B, num_layers=_MAX_LAYERS.value)
  shapes = {k[len("layers/"):]: v[1:] for k, v in
            llama.param_shapes(LLAMA7B).items() if k.startswith("layers/")}

  def source(index):
    rng = np.random.default_rng(index)
    layer = {}
    for path, shape in shapes.items():
      value = (np.ones(shape, np.float32) if path.endswith("scale") else
               (0.02 * rng.standard_normal(shape, np.float32)))
      node = layer
      *parents, leaf = path.split("/")
      for key in parents:
        node = node.setdefault(key, {})
      node[leaf] = value
    return layer

  def make_x0():
    return jax.random.normal(jax.random.key(_SEED.value),
                             (_CALIB_SEGMENTS.value, _CALIB_SEQ_LEN.value,
                              config.hidden_size), jnp.float32)

  start = time.time()
  layers, extra = calibrate(config, source, make_x0)
  jax.block_until_ready(layers)
  seconds = time.time() - start
  stats = jax.devices()[0].memory_stats() or {}
  per_layer = sum(np.prod(s) for s in shapes.values()) * 4
  return {"model": "llama7b_random", "quantizer": _QUANTIZER.value,
          "bits": _BITS.value, "group_size": _GROUP.value,
          "calib": "random hidden states",
          "calib_segments": _CALIB_SEGMENTS.value,
          "calib_seq_len": _CALIB_SEQ_LEN.value,
          "layers_done": config.num_layers, "device": str(jax.devices()[0]),
          "seconds_per_layer": round(seconds / config.num_layers, 2),
          "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
          "float_layer_bytes": int(per_layer),
          "float_model_decoder_bytes": int(per_layer * LLAMA7B.num_layers),
          **{k: v for k, v in extra.items() if not k.startswith("epoch_loss")}}


def map_linears(params: dict, fn) -> dict:
  """Applies `fn(w) -> (QArray, extra entries)` to every layer's linears."""
  source = cal.layers_from_params(params)
  num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  out = []
  for index in range(num_layers):
    layer = source(index)
    for group in cal.LINEAR_GROUPS:
      for name in group:
        w = jnp.asarray(cal.get_linear(layer, name)["kernel"])
        q, entries = fn(w)
        layer = cal.set_linear(layer, name, {"kernel": q, **entries})
    out.append(jax.device_get(layer))
    print(f"layer {index} quantized", flush=True)
  return cal.stack_layers(out)


def proxy_summary(reports: list[dict]) -> dict:
  """How many linears have a proxy loss below RTN's, and the worst ratio."""
  ratios = [v["proxy"] / max(v["proxy_rtn"], 1e-30) for r in reports
            for k, v in r.items() if isinstance(v, dict) and "proxy" in v]
  below = sum(r < 1 for r in ratios)
  return {"proxy_below_rtn": f"{below}/{len(ratios)}",
          "proxy_ratio_max": float(np.max(ratios)),
          "proxy_ratio_median": float(np.median(ratios))}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  start = time.time()
  print(f"devices: {jax.devices()}", flush=True)
  if _MODEL.value == "llama7b_random":
    _write(random_llama7b_benchmark())
    return
  config, params = loading.load_model(_MODEL.value, dtype=jnp.float32)
  if _QUANTIZER.value in ("apiq", "apiq_lw", "loftq"):
    config = dataclasses.replace(config, lora_alpha=_ALPHA.value)
  tokenizer = loading.load_tokenizer(_MODEL.value)
  name = _QUANTIZER.value
  header = {"quantizer": name,
            "bits": None if name == "none" else (4 if name == "nf4"
                                                 else _BITS.value),
            "group_size": None if name == "none" else _GROUP.value}
  if _LOAD_DIR.value:
    loaded, meta = protocol.load_params(_LOAD_DIR.value)
    quantized = jax.tree.map(jnp.asarray, loaded)
    header = {k: meta.get(k) for k in header}
    if "config" in meta:
      # Written by experiments/export.py --quantized_dir
      # (`export.save_quantized`): the LoRA scale is in the model config and
      # the format has to be read off the kernels.
      meta.setdefault("alpha", meta["config"].get("lora_alpha"))
      q = quantized["layers"]["attn"]["q_proj"]["kernel"]
      if isinstance(q, qa.QArray):
        header.update(quantizer=header["quantizer"] or "export",
                      bits=header["bits"] or q.bits,
                      group_size=header["group_size"] or (
                          -1 if q.group_size == q.shape[-1] else q.group_size))
    name = header["quantizer"]
    if meta.get("alpha") is not None:
      config = dataclasses.replace(config, lora_alpha=meta["alpha"])
    extra = {"loaded_from": _rel(_LOAD_DIR.value)}
  else:
    quantized, extra = quantize(config, params, tokenizer)
  del params
  quantize_seconds = time.time() - start
  ids = evaluate.text_token_ids(tokenizer, _DATASET.value)
  result = evaluate.perplexity(quantized, config, ids, seq_len=_SEQ_LEN.value,
                               windows=_WINDOWS.value,
                               batch_size=_BATCH.value)
  print(f"ppl {result['ppl']:.4f}", flush=True)
  calibrated = not _LOAD_DIR.value and name in ("gptq", "apiq", "apiq_lw")
  out = {"model": _MODEL.value, **header,
         "calib": _rel(_CALIB.value) if calibrated or _MERGE.value != "none"
                  else None,
         "dataset": _rel(_DATASET.value), "windows": _WINDOWS.value,
         "seq_len": _SEQ_LEN.value, "ppl": result["ppl"]}
  if calibrated:
    out.update(calib_segments=_CALIB_SEGMENTS.value,
               calib_seq_len=_CALIB_SEQ_LEN.value)
  if name == "gptq" and not _LOAD_DIR.value:
    out.update(act_order=_ACT_ORDER.value, damp=_DAMP.value,
               static_groups=_STATIC_GROUPS.value)
  if name == "nf4" and not _LOAD_DIR.value:
    out["double_quant"] = _DOUBLE_QUANT.value
  out.update(extra)
  out["quantize_seconds"] = round(quantize_seconds, 1)
  if _MERGE.value != "none":
    x0 = _calibration_inputs(quantized, tokenizer)
    layers, reports = merge.merge_model(
        config, cal.layers_from_params(quantized), x0, _MERGE.value,
        batch_size=_BATCH.value, act_order=_ACT_ORDER.value,
        log=lambda s: print(s[:300], flush=True))
    quantized = _with_layers(quantized, layers)
    merged = evaluate.perplexity(quantized, config, ids,
                                 seq_len=_SEQ_LEN.value,
                                 windows=_WINDOWS.value,
                                 batch_size=_BATCH.value)
    errs = {k: [v[k] for r in reports for v in r.values()
                if isinstance(v, dict) and k in v]
            for k in ("err_rtn", "err_gptq")}
    out.update(merge=_MERGE.value, ppl_before_merge=result["ppl"],
               merge_act_order=_ACT_ORDER.value,
               ppl=merged["ppl"], calib_segments=_CALIB_SEGMENTS.value,
               calib_seq_len=_CALIB_SEQ_LEN.value,
               merge_err_rtn_sum=float(np.sum(errs["err_rtn"])))
    if errs["err_gptq"]:
      out["merge_err_gptq_sum"] = float(np.sum(errs["err_gptq"]))
      out["merge_layers_gptq_below_rtn"] = (
          f"{sum(g < r for g, r in zip(errs['err_gptq'], errs['err_rtn']))}"
          f"/{len(errs['err_rtn'])}")
    print(f"merged ppl {merged['ppl']:.4f}", flush=True)
  if _SAVE_DIR.value:
    protocol.save_params(_SAVE_DIR.value, quantized,
                         {k: v for k, v in out.items() if k != "ppl"})
  out["seconds"] = round(time.time() - start, 1)
  _write(out)


def _write(out: dict) -> None:
  print(json.dumps(out, indent=1))
  if _OUTPUT_JSON.value:
    path = pathlib.Path(_OUTPUT_JSON.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
