"""ApiQ: activation-preserving joint initialization of quantization and LoRA.

ApiQ quantizes a weight and initializes its LoRA factors together so that the
*quantized* network reproduces the float network's activations, on the
quantized network's own inputs (so errors do not accumulate with depth).

Quantizer with learnable weight clipping (LWC, from OmniQuant), per row `n`
and group `j` of `g` input columns, with logits `gamma, beta` (start 4.0):

    hi = max(sigmoid(gamma) * max_j(w), 0)
    lo = min(sigmoid(beta) * min_j(w), 0)
    s  = (hi - lo) / (2^b - 1),              z  = round(-lo / s)
    Q(w) = (clip(round_ste(w / s) + z, 0, 2^b - 1) - z) * s

`round_ste` rounds in the forward pass and is the identity in the backward
pass; `z` is rounded without gradient (as in the official code). The range is
widened to include 0 (as the library's RTN) so the zero point is a valid
unsigned code; `Q` is then exactly what `qarray.quantize_with_params` stores.

LoRA: `W_eff = Q(W) + (alpha / r) * B A`, `A` `(r, in)` Kaiming-uniform
(PEFT: bound `1 / sqrt(in)`), `B` `(out, r)` zero; both train.

Layer-wise (ApiQ-lw), per linear in forward order, minimizes
`||X_fp W^T - X_q W_eff^T||^2 / (n * out)`, computed exactly from the second
moments `H = 2 X_q^T X_q / n` and `C = 2 X_fp^T X_q / n`:

    L = [tr(W H_fp W^T) - 2 tr(W C W_eff^T) + tr(W_eff H W_eff^T)] / (2 out)

(full batch; `steps = epochs * num_segments` AdamW steps).

Block-wise (ApiQ-bw, the default), per decoder layer, minimizes

    MSE(block_fp(X_fp), block_q(X_q)) + MSE(block_fp(X_q), block_q(X_q))

over the clipping logits and LoRA factors of all its linears, batch 1.

Optimizer: AdamW, lr 5e-3 for the clipping logits and 5e-4 for LoRA, weight
decay 0.1 on both (the official code's single AdamW with two parameter
groups). Paper defaults (Llama-2): 128 segments of 2048 tokens of
WikiText-2 train, 20 epochs, rank 64, alpha 16 (`ApiQConfig()`);
`ApiQConfig.cpu_default()` is a small setting for CPU runs.

References: Liao et al., ApiQ (arXiv 2402.05147), sections 3-4 and the
official code BaohaoLiao/ApiQ; Shao et al., OmniQuant (arXiv 2308.13137).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qft_jax._src import qarray as qa
from qft_jax._src.models import llama
from qft_jax._src.quantizers import calibration as cal
from qft_jax._src.quantizers import protocol

_HP = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ApiQConfig:
  """ApiQ settings (paper defaults).

  Attributes:
    bits, group_size: the uniform quantizer (asymmetric, min-max with LWC).
    rank, alpha: LoRA rank and alpha (scale `alpha / rank`).
    lwc_lr, lora_lr, weight_decay: AdamW settings.
    epochs: passes over the calibration segments.
    batch_size: segments per step (block-wise).
    init_logit: initial `gamma = beta` (sigmoid(4) ~= 0.982).
    aug_loss: add the `MSE(block_fp(X_q), block_q(X_q))` term (block-wise).
    seed: LoRA initialization seed.
  """
  bits: int = 2
  group_size: int = 64
  rank: int = 64
  alpha: float = 16.0
  lwc_lr: float = 5e-3
  lora_lr: float = 5e-4
  weight_decay: float = 0.1
  epochs: int = 20
  batch_size: int = 1
  init_logit: float = 4.0
  aug_loss: bool = True
  seed: int = 0

  def __post_init__(self):
    qa.QuantConfig(bits=self.bits, group_size=self.group_size)
    for name in ("rank", "epochs", "batch_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ApiQ {name} must be positive, got "
                         f"{getattr(self, name)}")

  @classmethod
  def cpu_default(cls, **overrides) -> "ApiQConfig":
    """Few epochs, for CPU runs on small calibration sets."""
    return cls(**{"epochs": 2, **overrides})

  @property
  def quant_config(self) -> qa.QuantConfig:
    return qa.QuantConfig(bits=self.bits, group_size=self.group_size)

  @property
  def lora_scale(self) -> float:
    return self.alpha / self.rank


def init_clip(w: jax.Array, config: ApiQConfig) -> dict:
  """Clipping logits `{"gamma", "beta"}`, each `(N, K // g)` = init_logit."""
  n, k = w.shape[-2:]
  g = qa.resolve_group_size(config.group_size, k)
  full = jnp.full((n, k // g), config.init_logit, jnp.float32)
  return {"gamma": full, "beta": full}


def clip_params(w: jax.Array, clip: dict, config: ApiQConfig
                ) -> tuple[jax.Array, jax.Array]:
  """Scale `(N, G)` and float integer zero point `(N, G)` under clipping."""
  g = qa.resolve_group_size(config.group_size, w.shape[-1])
  wg = w.astype(jnp.float32).reshape(*w.shape[:-1], -1, g)
  qmax = 2**config.bits - 1
  hi = jnp.maximum(jax.nn.sigmoid(clip["gamma"]) * wg.max(-1), 0.0)
  lo = jnp.minimum(jax.nn.sigmoid(clip["beta"]) * wg.min(-1), 0.0)
  s = jnp.maximum((hi - lo) / qmax, 1e-8)
  z = jax.lax.stop_gradient(jnp.clip(jnp.round(-lo / s), 0, qmax))
  return s, z


def fake_quant(w: jax.Array, clip: dict, config: ApiQConfig) -> jax.Array:
  """`Q(w)` with straight-through rounding, differentiable in the logits."""
  s, z = clip_params(w, clip, config)
  g = qa.resolve_group_size(config.group_size, w.shape[-1])
  wg = w.astype(jnp.float32).reshape(*w.shape[:-1], -1, g)
  x = wg / s[..., None]
  x = x + jax.lax.stop_gradient(jnp.round(x) - x)
  c = jnp.clip(x + z[..., None], 0, 2**config.bits - 1)
  return ((c - z[..., None]) * s[..., None]).reshape(w.shape)


def quantize_clipped(w: jax.Array, clip: dict, config: ApiQConfig
                     ) -> qa.QArray:
  """The QArray whose dequantization equals `fake_quant(w, clip)`."""
  s, z = clip_params(w, clip, config)
  return qa.quantize_with_params(w, s, z.astype(jnp.uint8),
                                 config.quant_config)


def init_lora(key: jax.Array, n: int, k: int, rank: int) -> dict:
  """PEFT's LoRA init: `lora_a` Kaiming-uniform `(r, k)`, `lora_b` zero."""
  bound = 1.0 / math.sqrt(k)
  return {"lora_a": jax.random.uniform(key, (rank, k), jnp.float32, -bound,
                                       bound),
          "lora_b": jnp.zeros((n, rank), jnp.float32)}


def _optimizer(config: ApiQConfig) -> optax.GradientTransformation:
  """AdamW with lr `lwc_lr` on clipping logits and `lora_lr` on LoRA."""
  def labels(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: ("lora" if str(getattr(path[-1], "key", "")
                                       ).startswith("lora") else "lwc"), tree)
  return optax.multi_transform(
      {"lwc": optax.adamw(config.lwc_lr, weight_decay=config.weight_decay),
       "lora": optax.adamw(config.lora_lr,
                           weight_decay=config.weight_decay)}, labels)


def _effective(w, p, config):
  return fake_quant(w, p, config) + config.lora_scale * jnp.dot(
      p["lora_b"], p["lora_a"], precision=_HP)


# ----------------------------------------------------------- layer-wise -----


def layer_loss(w: jax.Array, w_eff: jax.Array, stats: protocol.LayerStats
               ) -> jax.Array:
  """Layer-wise loss up to the constant `tr(W H_fp W^T) / (2 out)`.

  `[tr(W_eff H W_eff^T) - 2 tr(W C W_eff^T)] / (2 out)`, i.e.
  `||X_fp W^T - X W_eff^T||^2 / (n out)` minus its value at `W_eff = 0`.
  """
  cross = stats.hessian if stats.cross is None else stats.cross
  quad = jnp.sum(jnp.dot(w_eff, stats.hessian, precision=_HP) * w_eff)
  lin = jnp.sum(jnp.dot(w, cross, precision=_HP) * w_eff)
  return (quad - 2.0 * lin) / (2.0 * w.shape[0])


@functools.partial(jax.jit, static_argnames=("config", "steps"))
def _train_layer(w, stats, params, config: ApiQConfig, steps: int):
  opt = _optimizer(config)
  grad_fn = jax.value_and_grad(
      lambda p: layer_loss(w, _effective(w, p, config), stats))

  def step(carry, _):
    p, s = carry
    loss, g = grad_fn(p)
    upd, s = opt.update(g, s, p)
    return (optax.apply_updates(p, upd), s), loss

  (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None,
                                     length=steps)
  return params, losses


def apiq_layer(w: jax.Array, stats: protocol.LayerStats, config: ApiQConfig,
               key: jax.Array, steps: int | None = None
               ) -> tuple[qa.QArray, dict, jax.Array]:
  """ApiQ-lw for one linear.

  Args:
    w: float weight `(N, K)`.
    stats: `H = 2 X_q^T X_q / n` and optionally `C = 2 X_fp^T X_q / n`.
    config: bits, group, rank, learning rates, epochs.
    key: LoRA init key.
    steps: AdamW steps (default `config.epochs * 128`, i.e. the paper's
      epochs over 128 segments).

  Returns:
    (QArray, {"lora_a" (r, K), "lora_b" (N, r)}, losses `(steps,)`).
  """
  w = jnp.asarray(w, jnp.float32)
  n, k = w.shape
  steps = config.epochs * 128 if steps is None else steps
  params = {**init_clip(w, config), **init_lora(key, n, k, config.rank)}
  params, losses = _train_layer(w, stats, params, config, steps)
  q = quantize_clipped(w, params, config)
  return q, {"lora_a": params["lora_a"], "lora_b": params["lora_b"]}, losses


@dataclasses.dataclass(frozen=True)
class ApiQLayerwise:
  """ApiQ-lw as a calibrating `Quantizer`.

  `__call__` returns the clipped QArray only; `quantize_with_lora` also
  returns the jointly trained LoRA factors (`sequential` drivers use it).
  The LoRA init key is `seed` folded with a CRC32 of the weight's bytes, so
  calls are reproducible and different layers get different inits.

  Attributes:
    config: ApiQ settings.
    steps: AdamW steps per linear (None: `epochs * 128`).
  """
  config: ApiQConfig = ApiQConfig()
  steps: int | None = None
  needs_calibration: bool = dataclasses.field(default=True, init=False)

  def _key(self, w):
    digest = zlib.crc32(np.asarray(w, np.float32).tobytes()) & 0x7FFFFFFF
    return jax.random.fold_in(jax.random.key(self.config.seed), digest)

  def quantize_with_lora(self, w, stats):
    protocol.check_call(self, w, stats)
    q, lora, _ = apiq_layer(w, stats, self.config, self._key(w), self.steps)
    return q, lora

  def __call__(self, w, stats=None):
    return self.quantize_with_lora(w, stats)[0]


# ----------------------------------------------------------- block-wise -----


def linear_names(layer: dict) -> tuple[str, ...]:
  """The "block/proj" names of every linear in a decoder layer dict."""
  return tuple(f"{b}/{p}" for b, projs in llama.LINEAR_NAMES.items()
               for p in projs if p in layer.get(b, {}))


def _fake_layer(layer_fp: dict, train: dict, config: ApiQConfig) -> dict:
  layer = layer_fp
  for name, p in train.items():
    w = cal.get_linear(layer_fp, name)["kernel"]
    layer = cal.set_linear(layer, name, {"kernel": fake_quant(w, p, config),
                                         "lora_a": p["lora_a"],
                                         "lora_b": p["lora_b"]})
  return layer


def block_loss(block_fn: Callable, layer_fp: dict, train: dict,
               config: ApiQConfig, x_q: jax.Array, y_fp: jax.Array,
               y_fp_q: jax.Array | None) -> jax.Array:
  """`MSE(y_fp, block_q(x_q)) [+ MSE(y_fp_q, block_q(x_q))]`."""
  y = block_fn(_fake_layer(layer_fp, train, config), x_q).astype(jnp.float32)
  loss = jnp.mean((y - y_fp) ** 2)
  if y_fp_q is not None:
    loss = loss + jnp.mean((y - y_fp_q) ** 2)
  return loss


@functools.partial(jax.jit, static_argnames=("block_fn", "config"))
def _block_step(train, state, layer_fp, xb, yb, yqb, block_fn, config):
  """One AdamW step on a batch (`yqb` None: no augmented term)."""
  loss, g = jax.value_and_grad(
      lambda t: block_loss(block_fn, layer_fp, t, config, xb, yb, yqb))(train)
  upd, state = _optimizer(config).update(g, state, train)
  return optax.apply_updates(train, upd), state, loss


def apiq_block(block_fn: Callable, layer_fp: dict, x_q: jax.Array,
               y_fp: jax.Array, y_fp_q: jax.Array | None, config: ApiQConfig,
               key: jax.Array) -> tuple[dict, np.ndarray]:
  """ApiQ-bw for one block: trains clipping + LoRA of all its linears.

  Args:
    block_fn: `(layer params, x (B, T, D)) -> y (B, T, D)`, where a linear's
      kernel may be a float array or QArray with `lora_a`/`lora_b` beside it
      and LoRA scale `config.alpha / config.rank`; hashable (a jit static
      argument: pass the same object for every block to compile once).
    layer_fp: the float layer params (device arrays).
    x_q: quantized-model inputs of the block `(S, T, D)`.
    y_fp: `block_fp(x_fp)` `(S, T, D)`, the target.
    y_fp_q: `block_fp(x_q)` (the augmented target), or None.
    config: ApiQ settings (epochs, batch size, learning rates).
    key: LoRA init key.

  Returns:
    (the layer params with QArray kernels and trained LoRA factors, the mean
    loss of each epoch `(epochs,)`).
  """
  names = linear_names(layer_fp)
  keys = jax.random.split(key, len(names))
  train = {}
  for name, k in zip(names, keys):
    w = cal.get_linear(layer_fp, name)["kernel"]
    train[name] = {**init_clip(w, config),
                   **init_lora(k, w.shape[0], w.shape[1], config.rank)}
  state = _optimizer(config).init(train)
  use_aug = config.aug_loss and y_fp_q is not None
  num, bs = x_q.shape[0], config.batch_size
  if num < bs:
    raise ValueError(f"ApiQ needs at least batch_size={bs} calibration "
                     f"segments, got {num}")
  epoch_losses = []
  for _ in range(config.epochs):
    total = 0.0
    for i in range(0, num - bs + 1, bs):
      yqb = y_fp_q[i:i + bs] if use_aug else None
      train, state, loss = _block_step(train, state, layer_fp, x_q[i:i + bs],
                                       y_fp[i:i + bs], yqb, block_fn, config)
      total += loss
    epoch_losses.append(float(total) / (num // bs))
  layer = layer_fp
  for name in names:
    w = cal.get_linear(layer_fp, name)["kernel"]
    p = train[name]
    layer = cal.set_linear(layer, name, {
        "kernel": quantize_clipped(w, p, config),
        "lora_a": p["lora_a"], "lora_b": p["lora_b"]})
  return layer, np.asarray(epoch_losses)


def apiq_blockwise_model(config: llama.LlamaConfig,
                         layer_source: Callable[[int], dict], x0: jax.Array,
                         apiq_config: ApiQConfig, *, batch_size: int = 8,
                         log: Callable[[str], None] | None = None
                         ) -> tuple[dict, list[dict]]:
  """ApiQ-bw over a whole decoder, layer by layer.

  Args:
    config: model config; `config.lora_alpha` must equal `apiq_config.alpha`
      (the model computes the LoRA scale as `lora_alpha / r`).
    layer_source: `l -> layer l's float params` (host).
    x0: embeddings of the calibration segments `(S, T, D)`.
    apiq_config: ApiQ settings.
    batch_size: segments per forward pass when propagating activations.
    log: optional progress printer.

  Returns:
    (stacked layers with QArray kernels + `lora_a`/`lora_b`, per-layer
    reports with the epoch losses).
  """
  if config.lora_alpha != apiq_config.alpha:
    raise ValueError(f"model lora_alpha {config.lora_alpha} differs from "
                     f"ApiQ alpha {apiq_config.alpha}")
  block_fn = functools.partial(cal.apply_layer, config)
  base_key = jax.random.key(apiq_config.seed)

  def quantize_layer(index, layer_fp, x_q, x_fp):
    y_fp = cal.run_layer(config, layer_fp, x_fp, batch_size)
    y_fp_q = (cal.run_layer(config, layer_fp, x_q, batch_size)
              if apiq_config.aug_loss else None)
    layer, losses = apiq_block(block_fn, layer_fp, x_q, y_fp, y_fp_q,
                               apiq_config, jax.random.fold_in(base_key,
                                                               index))
    return layer, {"epoch_loss": [round(float(v), 8) for v in losses]}, y_fp

  return cal.sequential(config, layer_source, x0, quantize_layer,
                        need_fp=True, batch_size=batch_size, log=log)
