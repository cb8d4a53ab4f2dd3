"""The methods, as (storage, trainable set, update rule) choices.

| method   | decoder linears stored as            | trainable          | update       |
|----------|--------------------------------------|--------------------|--------------|
| full     | float                                | every float leaf   | add          |
| lora     | float                                | LoRA factors       | add          |
| qlora    | NF4 QArray (block 64, double quant)  | LoRA factors       | add          |
| modulora | any quantizer's QArray (gptq/rtn/nf4) | LoRA factors       | add          |
| apiq     | ApiQ-bw QArray + jointly fit LoRA    | LoRA factors       | add          |
| loftq    | RTN QArray + LoftQ LoRA              | LoRA factors       | add          |
| peqa     | RTN QArray                           | QArray scales      | add          |
| qft      | int8 + 1 % float outliers            | every weight       | requantize   |
| hift     | float                                | one unit group/step| add          |

Embeddings, norms and the head stay float in every method (QFT trains them
in float with the same optimizer).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qft_jax._src import lora as lora_lib
from qft_jax._src import qarray as qa
from qft_jax._src import train
from qft_jax._src.models import llama
from qft_jax._src.optim import lion_int8 as lion_int8_lib
from qft_jax._src.optim import masks
from qft_jax._src.optim import peqa
from qft_jax._src.optim import qft

METHODS = ("full", "lora", "qlora", "modulora", "apiq", "loftq", "peqa",
           "qft", "hift")
LORA_METHODS = ("lora", "qlora", "modulora", "apiq", "loftq")
QUANTIZERS = ("rtn", "nf4", "gptq")
ALL_LINEARS = (r"attn/(q|k|v|o)_proj$", r"mlp/(gate|up|down)_proj$")
DECODER_LINEAR = r"^layers/(attn|mlp)/\w+_proj/kernel$"


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """What a method needs to know (the launcher fills it from flags/config).

  Attributes:
    name: one of METHODS.
    bits, group_size: the base quantizer (ignored by full/lora/hift; QFT is
      always int8 per row).
    quantizer: ModuLoRA's black-box quantizer: "gptq", "rtn" or "nf4".
    lora_rank, lora_alpha, lora_targets: LoRA (LoRA-family methods).
    outlier_fraction, rounding: QFT's sparse float part and requantization.
    calib_segments, calib_seq_len, apiq_epochs: calibration (gptq, apiq).
  """
  name: str = "lora"
  bits: int = 4
  group_size: int = 64
  quantizer: str = "gptq"
  lora_rank: int = 16
  lora_alpha: float = 32.0
  lora_targets: tuple[str, ...] = ALL_LINEARS
  outlier_fraction: float = 0.01
  rounding: str = "stochastic"
  calib_segments: int = 32
  calib_seq_len: int = 256
  apiq_epochs: int = 2

  def __post_init__(self):
    if self.name not in METHODS:
      raise ValueError(f"unknown method {self.name!r}; choose one of "
                       f"{METHODS}")
    if self.quantizer not in QUANTIZERS:
      raise ValueError(f"unknown quantizer {self.quantizer!r}; choose one "
                       f"of {QUANTIZERS}")
    if self.name in ("qlora",) and self.bits != 4:
      raise ValueError(f"qlora is NF4: bits must be 4, got {self.bits}")
    qa.QuantConfig(bits=self.bits, group_size=self.group_size)

  @property
  def lora_spec(self) -> lora_lib.LoraSpec:
    return lora_lib.LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha,
                             targets=self.lora_targets)

  @property
  def uses_calibration(self) -> bool:
    return self.name == "apiq" or (self.name == "modulora"
                                   and self.quantizer == "gptq")


def _map_decoder_linears(params: dict, fn: Callable[[jax.Array], Any]
                         ) -> dict:
  """Applies `fn` to every stacked decoder linear kernel `(L, out, in)`."""
  def visit(keypath, x):
    if masks.path_str(keypath).endswith("_proj/kernel") and masks.path_str(
        keypath).startswith("layers/"):
      return fn(x)
    return x
  return jax.tree_util.tree_map_with_path(visit, params)


def _per_layer(fn: Callable[[jax.Array], Any]) -> Callable[[jax.Array], Any]:
  """Quantizes a stacked `(L, out, in)` kernel one layer at a time."""
  def apply(w):
    outs = [fn(w[i]) for i in range(w.shape[0])]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  return apply


def _calibrated_layers(cfg: MethodConfig, params: dict,
                       config: llama.LlamaConfig, calib_tokens: np.ndarray,
                       log) -> dict:
  """GPTQ or ApiQ-bw over the decoder on calibration segments."""
  from qft_jax._src.quantizers import apiq  # pylint: disable=g-import-not-at-top
  from qft_jax._src.quantizers import calibration as cal  # pylint: disable=g-import-not-at-top
  from qft_jax._src.quantizers import gptq  # pylint: disable=g-import-not-at-top
  x0 = cal.embed_tokens(params, calib_tokens)
  source = cal.layers_from_params(params)
  if cfg.name == "apiq":
    apiq_cfg = apiq.ApiQConfig(bits=cfg.bits, group_size=cfg.group_size,
                               rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                               epochs=cfg.apiq_epochs)
    layers, _ = apiq.apiq_blockwise_model(config, source, x0, apiq_cfg,
                                          log=log)
  else:
    quantizer = gptq.GPTQ(gptq.GPTQConfig(bits=cfg.bits,
                                          group_size=cfg.group_size))
    layers, _ = cal.sequential(config, source, x0,
                               cal.quantize_layer_with(config, quantizer),
                               log=log)
  return {**params, "layers": layers}


def prepare_params(cfg: MethodConfig, params: dict, config: llama.LlamaConfig,
                   key: jax.Array, *, calib_tokens: np.ndarray | None = None,
                   log: Callable[[str], None] | None = None
                   ) -> tuple[dict, llama.LlamaConfig]:
  """Float model params -> the method's storage (+ LoRA), and its config.

  Args:
    cfg: the method.
    params: float params of `config` (decoder linears stacked).
    config: the model config.
    key: PRNG key (LoRA init).
    calib_tokens: int `(S, T)` calibration segments (gptq, apiq).
    log: optional progress printer.

  Returns:
    `(params, config)`; the config carries the LoRA scale and, for PEQA, the
    scale-trainable matmul mode.
  """
  name = cfg.name
  config = dataclasses.replace(config, lora_alpha=cfg.lora_alpha)
  if cfg.uses_calibration and calib_tokens is None:
    raise ValueError(f"{name} with {cfg.quantizer} needs calibration tokens")
  if name == "qlora" or (name == "modulora" and cfg.quantizer == "nf4"):
    from qft_jax._src.quantizers import nf4  # pylint: disable=g-import-not-at-top
    quantizer = nf4.NF4(nf4.NF4Config(block_size=cfg.group_size,
                                      double_quant=True))
    params = _map_decoder_linears(params, _per_layer(quantizer))
  elif name in ("peqa",) or (name == "modulora" and cfg.quantizer == "rtn"):
    qcfg = qa.QuantConfig(bits=cfg.bits, group_size=cfg.group_size)
    params = _map_decoder_linears(params, lambda w: qa.quantize(w, qcfg))
  elif cfg.uses_calibration:
    params = _calibrated_layers(cfg, params, config, calib_tokens, log)
  elif name == "loftq":
    from qft_jax._src.quantizers import loftq  # pylint: disable=g-import-not-at-top
    lcfg = loftq.LoftQConfig(
        quant=qa.QuantConfig(bits=cfg.bits, group_size=cfg.group_size),
        rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    params = _loftq_layers(params, lcfg, cfg.lora_targets)
  elif name == "qft":
    params = _map_decoder_linears(
        params, lambda w: qft.qft_quantize(w, cfg.outlier_fraction))
  if name in ("lora", "qlora", "modulora"):
    params = lora_lib.init_lora(params, cfg.lora_spec, key)
  if name == "peqa":
    config = dataclasses.replace(config, matmul_trainable="scale")
  return params, config


def _loftq_layers(params: dict, lcfg, targets) -> dict:
  """LoftQ on every targeted linear: QArray kernel + LoRA factors."""
  from qft_jax._src.quantizers import loftq  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  regexes = [re.compile(t) for t in targets]
  layers = dict(params["layers"])
  for group in ("attn", "mlp"):
    mods = dict(layers[group])
    for name, mod in mods.items():
      w = mod["kernel"]
      if any(r.search(f"layers/{group}/{name}") for r in regexes):
        outs = [loftq.loftq(w[i], lcfg) for i in range(w.shape[0])]
        q = jax.tree.map(lambda *xs: jnp.stack(xs), *[o[0] for o in outs])
        lo = jax.tree.map(lambda *xs: jnp.stack(xs), *[o[1] for o in outs])
        mods[name] = {**mod, "kernel": q, **lo}
      else:
        qcfg = lcfg.quant
        mods[name] = {**mod, "kernel": qa.quantize(w, qcfg)}
    layers[group] = mods
  return {**params, "layers": layers}


def trainable_mask(cfg: MethodConfig, params: dict) -> Any:
  """Boolean mask of what trains (LoRA factors, scales, or every float)."""
  if cfg.name in LORA_METHODS:
    return lora_lib.lora_mask(params)
  if cfg.name == "peqa":
    return peqa.peqa_mask(params)
  return masks.trainable_mask(params, [(r".*", True)])


def masked_method(mask: Any) -> train.Method:
  """Differentiate the masked floats; apply updates by addition."""

  def view(params):
    trainable, frozen = masks.split(params, mask)
    return trainable, lambda t: masks.combine(t, frozen)

  def apply(params, trainable, updates, key, step):
    del key, step
    _, frozen = masks.split(params, mask)
    return masks.combine(optax.apply_updates(trainable, updates), frozen), {}

  return train.Method(view=view, apply=apply)


def qft_method(rounding: str = "stochastic", weight_decay: float = 0.0,
               learning_rate: optax.ScalarOrSchedule = 0.0) -> train.Method:
  """QFT: gradients through weight probes, requantizing apply.

  The trainable view holds a zero probe `(L, N, K)` in place of each
  `QFTWeight` (its gradient is the dense dL/dW, in the weight's compute
  dtype: bf16 for a bf16 model, half of a float32 gradient's memory) and
  every other float leaf as is; the apply rule requantizes integer weights
  with stochastic rounding and reports the fraction of int8 codes that
  changed. The optimizer sees
  zero probes as the "params" of QFT weights, so decoupled weight decay for
  them is applied here, `u <- u - lr_t * weight_decay * W`, with `W`
  dequantized one matrix at a time (the optimizer's own decay still covers
  the float leaves).
  """

  def view(params):
    def leaf_view(p):
      if qft.is_qft_weight(p):  # gradient dtype = the compute dtype
        return jnp.zeros((*p.batch_shape, *p.shape), p.dense.dtype)
      return p if masks.is_float_leaf(p) else None
    trainable = jax.tree.map(leaf_view, params, is_leaf=qft.is_qft_weight)

    def rebuild(t):
      return jax.tree.map(
          lambda p, x: qft.QFTWithProbe(p, x) if qft.is_qft_weight(p) else x,
          params, t, is_leaf=lambda v: qft.is_qft_weight(v) or v is None)
    return trainable, rebuild

  def apply(params, trainable, updates, key, step):
    del trainable
    if weight_decay:
      lr = learning_rate(step) if callable(learning_rate) else learning_rate
      updates = jax.tree.map(
          lambda p, u: u - lr * weight_decay * qft.qft_dequantize(
              p, jnp.float32) if qft.is_qft_weight(p) else u,
          params, updates, is_leaf=qft.is_qft_weight)
    new, changed = qft.qft_apply_updates(params, updates, key,
                                         rounding=rounding)
    return new, {"codes_changed": changed}

  return train.Method(view=view, apply=apply)


def make_method(cfg: MethodConfig, params: dict, *, weight_decay: float = 0.0,
                learning_rate: optax.ScalarOrSchedule = 0.0) -> train.Method:
  """The view/apply pair of `cfg` (weight decay and lr matter for QFT)."""
  if cfg.name == "qft":
    return qft_method(cfg.rounding, weight_decay, learning_rate)
  if cfg.name == "hift":
    raise ValueError("hift trains through optim.hift.HiFT.make_step, not "
                     "make_method")
  return masked_method(trainable_mask(cfg, params))


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, *,
                   weight_decay: float = 0.0, b1: float | None = None,
                   b2: float | None = None) -> optax.GradientTransformation:
  """`adamw`, `lion` (float32 momentum), `lion_int8` or `sgd`."""
  if name == "adamw":
    return optax.adamw(learning_rate, b1=b1 or 0.9, b2=b2 or 0.999,
                       weight_decay=weight_decay)
  if name == "lion":
    return optax.lion(learning_rate, b1=b1 or 0.9, b2=b2 or 0.99,
                      weight_decay=weight_decay)
  if name == "lion_int8":
    return lion_int8_lib.lion_int8(learning_rate, b1=b1 or 0.9, b2=b2 or 0.99,
                                   weight_decay=weight_decay)
  if name == "sgd":
    return optax.sgd(learning_rate)
  raise ValueError(f"unknown optimizer {name!r}: choose adamw, lion, "
                   "lion_int8 or sgd")


def schedule(kind: str, peak: float, steps: int, warmup: int
             ) -> optax.Schedule:
  """`constant`, `linear` (warm-up then linear decay to 0) or `cosine`."""
  warmup = min(warmup, max(steps - 1, 0))
  if kind == "constant":
    return optax.linear_schedule(0.0, peak, warmup) if warmup else (
        lambda _: peak)
  if kind == "linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)),
         optax.linear_schedule(peak, 0.0, max(steps - warmup, 1))], [warmup])
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1),
                                              max(steps, warmup + 1))
  raise ValueError(f"unknown schedule {kind!r}: constant, linear or cosine")


def trainable_count(cfg: MethodConfig, params: dict) -> int:
  """Number of trained scalars (QFT: every weight; HiFT: all, over a cycle)."""
  if cfg.name in ("qft",):
    total = 0
    for leaf in jax.tree.leaves(params, is_leaf=qft.is_qft_weight):
      if qft.is_qft_weight(leaf):
        total += int(np.prod(leaf.batch_shape)) * leaf.shape[0] * leaf.shape[1]
      elif masks.is_float_leaf(leaf):
        total += leaf.size
    return total
  if cfg.name == "hift":
    return sum(x.size for x in jax.tree.leaves(params))
  mask = trainable_mask(cfg, params)
  return sum(x.size for x, m in zip(jax.tree.leaves(params),
                                    jax.tree.leaves(mask)) if m)
