"""Predict peak accelerator memory of a training step before running it.

`plan(...)` adds up, in bytes,

  weights      decoder linears in the method's storage (float, `bits`-bit
               codes + scales/zero points per group, or QFT int8 + outliers)
               plus embedding, head and norms;
  trainable    the float leaves the optimizer updates (LoRA factors, scales,
               or every weight), when stored apart from the weights;
  gradients    the full trainable gradient (ordinary step), or one layer's
               dense gradient plus the non-layer units' (streamed step);
  optimizer    AdamW 2 states, Lion 1, int8 Lion 1 byte + 4 per 256 per
               trained scalar (HiFT: only the active layers);
  activations  with full remat: every layer's input `(B, T, D)` plus one
               layer's recomputation (attention scores `(B, H, T, T)` in
               float32 unless the attention is fused, MLP intermediates)
               plus float32 logits three times
               (logits, softmax, their gradient);
  workspace    the largest transient dequantized weight (twice: forward and
               input-gradient matmuls may overlap).

The benchmark (experiments/bench_train.py) prints this prediction next to
`memory_stats()["peak_bytes_in_use"]`; WORKSPACE.md records both.
"""

from __future__ import annotations

import dataclasses

from qft_jax._src.models import llama

GIB = 2**30
OPTIMIZER_BYTES = {"adamw": 8.0, "lion": 4.0, "lion_int8": 1.0 + 4.0 / 256,
                   "sgd": 0.0}


@dataclasses.dataclass(frozen=True)
class Plan:
  weights: int
  trainable: int
  gradients: int
  optimizer: int
  activations: int
  workspace: int

  @property
  def total(self) -> int:
    return sum(dataclasses.astuple(self))

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "total": self.total,
            "total_gib": round(self.total / GIB, 3)}


def linear_shapes(config: llama.LlamaConfig) -> list[tuple[int, int]]:
  """(out, in) of the seven linears of one decoder layer."""
  d, f, dh = config.hidden_size, config.intermediate_size, config.head_dim
  q, kv = config.num_heads * dh, config.num_kv_heads * dh
  return [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]


def _quantized_bytes(n: int, k: int, bits: int, group: int,
                     scale_bytes: float,
                     zero_point: bool) -> float:
  groups = n * k / (k if group == -1 else group)
  return n * k * bits / 8 + groups * (scale_bytes + (1 if zero_point else 0))


def plan(config: llama.LlamaConfig, method: str, *, batch: int, seq_len: int,
         bits: int = 4, group_size: int = 64, lora_rank: int = 16,
         optimizer: str = "adamw", weight_bytes: int = 2,
         scale_bytes: float = 2, zero_point: bool = True,
         streamed: bool = False, hift_layers: int | None = None,
         outlier_fraction: float = 0.01, act_bytes: int = 2,
         master_bytes: int = 4, loss_chunk: int | None = None,
         fused_attention: bool = False, remat: str = "full",
         offload_saved: bool = False) -> Plan:
  """Predicted peak memory of one training step.

  Args:
    config: model shape.
    method: full, lora, qlora, modulora, peqa, qft, hift.
    batch, seq_len: tokens per step `B x T`.
    bits, group_size, scale_bytes, zero_point: quantized base storage.
    lora_rank: LoRA on all seven linears.
    optimizer: adamw, lion, lion_int8 or sgd.
    weight_bytes: bytes per float weight (2 for bf16, 4 for float32).
    streamed: the layer-streamed step (one layer's gradient at a time).
    hift_layers: layers trained per step (HiFT), None for all.
    outlier_fraction: QFT's float outliers (4-byte index + 4-byte value).
    act_bytes: bytes per activation.
    master_bytes: bytes per trained float leaf outside the decoder (QFT
      and HiFT train embedding/head in float32).
    loss_chunk: positions per chunk of a chunked head + cross-entropy
      (`train.chunked_head_nll`), None for whole-sequence logits.
    fused_attention: attention runs as a fused (flash) kernel that never
      holds the `(B, H, T, T)` scores (`LlamaConfig.attention` "cudnn").
    offload_saved: the streamed step keeps the saved layer inputs in host
      memory (`StreamedSpec.offload_saved`): one layer's input on the device.
    remat: the model's remat policy (`LlamaConfig.remat`). "full" keeps one
      layer's intermediates at a time (the activations above); anything else
      ("none", or a `jax.checkpoint_policies` name, bounded by "none") keeps
      every layer's, so the per-layer term counts `num_layers` times.
  """
  if optimizer not in OPTIMIZER_BYTES:
    raise ValueError(f"unknown optimizer {optimizer!r}")
  c, lnum = config, config.num_layers
  shapes = linear_shapes(c)
  per_layer = sum(n * k for n, k in shapes)
  linears = lnum * per_layer
  rest = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
  norms = (2 * lnum + 1) * c.hidden_size
  opt_b = OPTIMIZER_BYTES[optimizer]
  trainable = gradients = optimizer_bytes = 0
  quantized = method in ("qlora", "modulora", "peqa", "apiq", "loftq")
  if quantized:
    zp = zero_point and method != "qlora"
    w_lin = lnum * sum(_quantized_bytes(n, k, bits, group_size, scale_bytes,
                                        zp) for n, k in shapes)
  elif method == "qft":
    w_lin = linears * (1 + outlier_fraction * 8)
  else:
    w_lin = linears * weight_bytes
  trained_rest = method in ("full", "qft", "hift")
  w_rest = rest * (master_bytes if trained_rest else weight_bytes) + norms * 4
  if method in ("lora", "qlora", "modulora", "apiq", "loftq"):
    lora = lnum * lora_rank * sum(n + k for n, k in shapes)
    trainable, gradients, optimizer_bytes = lora * 4, lora * 4, lora * opt_b
    if streamed:
      gradients = lora * 4 // lnum
  elif method == "peqa":
    scales = lnum * sum(n * k / (k if group_size == -1 else group_size)
                        for n, k in shapes)
    gradients = scales * scale_bytes
    optimizer_bytes = scales * opt_b * scale_bytes / 4
  else:
    # HiFT steps that train decoder layers leave the rest (and its state)
    # alone; the embedding/head groups' steps are smaller than these.
    layers_trained = lnum if hift_layers is None else hift_layers
    rest_trained = 0 if hift_layers is not None else rest
    # QFT's dense gradient comes in the compute dtype (methods.qft_method).
    dense_grad = act_bytes if method == "qft" else weight_bytes
    if streamed:
      gradients = per_layer * dense_grad + rest_trained * master_bytes
    else:
      gradients = linears * dense_grad + rest_trained * master_bytes
    optimizer_bytes = (layers_trained * per_layer + rest_trained) * opt_b
  tokens = batch * seq_len
  saved = (1 if offload_saved else lnum) * tokens * c.hidden_size * act_bytes
  scores = 0 if fused_attention else batch * c.num_heads * seq_len**2 * (
      4 + act_bytes)
  layer_work = (tokens * (4 * c.hidden_size + 3 * c.intermediate_size)
                * act_bytes + scores)
  if remat != "full":
    layer_work *= lnum
  logits = 3 * batch * (loss_chunk or seq_len) * c.vocab_size * 4
  workspace = 2 * max(n * k for n, k in shapes) * act_bytes
  return Plan(weights=int(w_lin + w_rest), trainable=int(trainable),
              gradients=int(gradients), optimizer=int(optimizer_bytes),
              activations=int(saved + layer_work + logits),
              workspace=int(workspace))


def check_fits(p: Plan, available_bytes: int | None) -> None:
  """Raises ValueError when the plan exceeds the device's memory."""
  if available_bytes is not None and p.total > available_bytes:
    parts = ", ".join(f"{k} {v / GIB:.2f} GiB"
                      for k, v in dataclasses.asdict(p).items())
    raise ValueError(
        f"the planned peak {p.total / GIB:.2f} GiB exceeds the device's "
        f"{available_bytes / GIB:.2f} GiB ({parts}); lower the batch or "
        "sequence length, enable remat, or pick a leaner method")
