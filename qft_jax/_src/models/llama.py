"""The LLaMA family (LLaMA 1/2/3, Mistral, Qwen2, SmolLM2) in Flax linen.

A pre-norm decoder-only transformer:

    h_0 = E[tokens]
    a_l = h_{l-1} + W_o Attn(RoPE(W_q n), RoPE(W_k n), W_v n),  n = RMSNorm(h_{l-1})
    h_l = a_l + W_down (silu(W_gate m) * W_up m),                m = RMSNorm(a_l)
    logits = RMSNorm(h_L) @ E^T   (tied)   or   @ W_lm^T   (untied)

with `RMSNorm(x) = x / sqrt(mean(x^2) + eps) * scale` (statistics in float32),
rotary position embeddings in HF's `rotate_half` convention (optionally with
llama-3 frequency scaling), grouped-query causal attention (optionally
sliding-window) and SwiGLU. The decoder layers are stacked with `nn.scan`, so
every layer parameter carries a leading layer axis `L`, and run under
`nn.remat` with a selectable checkpoint policy.

Parameter tree (the content of flax's "params" collection):

    embed/embedding                          (V, D)
    layers/input_norm/scale                  (L, D)
    layers/attn/{q,k,v,o}_proj/kernel        (L, out, in)  [+ bias (L, out) for q/k/v
                                                            when attention_bias]
    layers/post_attn_norm/scale              (L, D)
    layers/mlp/{gate,up,down}_proj/kernel    (L, out, in)
    final_norm/scale                         (D,)
    lm_head/kernel                           (V, D)        only when untied

Every decoder linear (and the untied head) goes through `qmatmul.linear`, so a
kernel may be a float `(out, in)` array, a `QArray` or a `WeightWithProbe`;
`lora_a (L, r, in)` / `lora_b (L, out, r)` entries beside a kernel add the LoRA
branch `(alpha / r) * B A x`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qft_jax._src import qarray as qa
from qft_jax._src import qmatmul

LINEAR_NAMES = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama-3.1 RoPE frequency scaling (HF `rope_type="llama3"`)."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def _remat_policy(name: str):
  if name == "full":
    return None
  return getattr(jax.checkpoint_policies, name)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Static description of a LLaMA-family model (hashable: a jit static arg).

  Attributes:
    vocab_size, hidden_size, intermediate_size, num_layers, num_heads,
      num_kv_heads, head_dim: sizes (V, D, F, L, H, H_kv, D_h).
    rope_theta: RoPE base.
    rope_scaling: None, a `Llama3RopeScaling`, or a dict with its fields.
    rms_norm_eps: RMSNorm epsilon.
    tie_word_embeddings: logits use the embedding matrix (no lm_head).
    attention_bias: q/k/v projections have biases (Qwen2).
    sliding_window: None, or attend only to the last `sliding_window` keys
      (Mistral).
    max_position_embeddings: context length the checkpoint was trained for.
    remat: "none", "full", or the name of a `jax.checkpoint_policies` policy
      (e.g. "dots_saveable", "dots_with_no_batch_dims_saveable").
    lora_alpha: LoRA scale numerator; the scale is `lora_alpha / r` with `r`
      read from the `lora_a` shape.
    matmul_trainable: `trainable` passed to `qdot` for QArray kernels
      ("none", or "scale" for PEQA).
    matmul_implementation: `implementation` passed to `qdot`.
    attention: "xla" (einsum + softmax, materializes the `(T, S)` scores),
      "cudnn" (fused flash attention; GPU, bf16/fp16, causal without
      padding or cache) or "auto" (cudnn where it applies on a GPU, else
      xla).
    dtype: activation dtype; param_dtype: dtype of freshly initialized params.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: Any = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  sliding_window: int | None = None
  max_position_embeddings: int = 2048
  remat: str = "none"
  lora_alpha: float = 16.0
  matmul_trainable: str = "none"
  matmul_implementation: str | None = None
  attention: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_layers", "num_heads", "num_kv_heads", "head_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of "
                       f"num_kv_heads {self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling",
                         Llama3RopeScaling(**self.rope_scaling))
    if not (self.rope_scaling is None
            or isinstance(self.rope_scaling, Llama3RopeScaling)):
      raise ValueError(f"rope_scaling must be None or llama-3 scaling, got "
                       f"{self.rope_scaling!r}")
    if self.remat != "none" and not (
        self.remat == "full" or hasattr(jax.checkpoint_policies, self.remat)):
      raise ValueError(f"unknown remat policy {self.remat!r}: use 'none', "
                       "'full' or a jax.checkpoint_policies name")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(f"sliding_window must be positive or None, got "
                       f"{self.sliding_window}")
    qmatmul.QDotConfig(self.matmul_trainable, self.matmul_implementation)
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, "
                       f"got {self.attention!r}")


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies `(D_h / 2,)` float32, llama-3 scaled if configured."""
  d = config.head_dim
  inv = (1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32)
                                      / d))).astype(np.float32)
  s = config.rope_scaling
  if s is None:
    return inv
  # HF `_compute_llama3_parameters`: keep high frequencies, divide low ones by
  # `factor`, interpolate smoothly in between.
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(config: LlamaConfig, positions: jax.Array):
  """cos, sin `(B, T, D_h)` float32 for integer positions `(B, T)`."""
  freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(config)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """`x * cos + rotate_half(x) * sin` for x `(B, T, heads, D_h)`."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
          ).astype(x.dtype)


class RMSNorm(nn.Module):
  """`x / sqrt(mean(x^2) + eps) * scale`, statistics in float32."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],),
                       self.config.param_dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True)
                            + self.config.rms_norm_eps)
    return xf.astype(x.dtype) * scale.astype(x.dtype)


class Linear(nn.Module):
  """`x @ W^T (+ b) (+ LoRA)` through `qmatmul.linear`; W is (out, in)."""
  features: int
  config: LlamaConfig
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    c = self.config
    if self.has_variable("params", "kernel"):
      # Read directly: `self.param` would compare a QArray's leaves against
      # the float init shape.
      kernel = self.get_variable("params", "kernel")
    else:
      kernel = self.param("kernel", nn.initializers.normal(0.02),
                          (self.features, x.shape[-1]), c.param_dtype)
    lora, lora_scale = None, 1.0
    if self.has_variable("params", "lora_a"):
      a = self.get_variable("params", "lora_a")
      lora = {"a": a, "b": self.get_variable("params", "lora_b")}
      lora_scale = c.lora_alpha / a.shape[0]
    y = qmatmul.linear(x, kernel, lora=lora, lora_scale=lora_scale,
                       trainable=c.matmul_trainable,
                       implementation=c.matmul_implementation)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,),
                        c.param_dtype)
      y = y + bias.astype(y.dtype)
    return y


class Attention(nn.Module):
  """Grouped-query attention with RoPE and an optional KV cache."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache_index, kv):
    c = self.config
    b, t, _ = x.shape
    hkv, g, dh = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
    proj = lambda n, name, bias: Linear(n, c, bias, name=name)(x)
    q = proj(c.num_heads * dh, "q_proj", c.attention_bias)
    k = proj(hkv * dh, "k_proj", c.attention_bias)
    v = proj(hkv * dh, "v_proj", c.attention_bias)
    q = apply_rope(q.reshape(b, t, c.num_heads, dh), cos, sin)
    k = apply_rope(k.reshape(b, t, hkv, dh), cos, sin)
    v = v.reshape(b, t, hkv, dh)
    if kv is not None:
      start = (0, cache_index, 0, 0)
      kv = {"k": jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype),
                                              start),
            "v": jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype),
                                              start)}
      k, v = kv["k"].astype(x.dtype), kv["v"].astype(x.dtype)
    if uses_cudnn_attention(c, mask, kv, x.dtype):
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                         implementation="cudnn")
    else:
      out = _xla_attention(q, k, v, mask, hkv, g, x.dtype)
    out = Linear(c.hidden_size, c, name="o_proj")(
        out.reshape(b, t, c.num_heads * dh))
    return out, kv


def uses_cudnn_attention(c: LlamaConfig, mask, kv, dtype) -> bool:
  """Whether attention runs as cuDNN's fused kernel (see `attention`)."""
  applies = (mask is None and kv is None
             and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
             and c.head_dim % 8 == 0 and c.head_dim <= 128)
  if c.attention == "cudnn" and not applies:
    raise ValueError("attention='cudnn' needs bf16/fp16 activations, "
                     "head_dim a multiple of 8 up to 128, and causal "
                     "attention without padding, sliding window or cache")
  return c.attention == "cudnn" or (c.attention == "auto" and applies
                                    and jax.default_backend() == "gpu")


def _xla_attention(q, k, v, mask, hkv: int, g: int, dtype) -> jax.Array:
  """Softmax attention; `q (B, T, H, D_h)`, `k, v (B, S, H_kv, D_h)`.

  `mask` is `(B or 1, T, S)` boolean, or None for plain causal attention.
  Returns `(B, T, H, D_h)`.
  """
  b, t, _, dh = q.shape
  if mask is None:
    mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))[None]
  q = q.reshape(b, t, hkv, g, dh)  # query head h uses kv head h // g
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                      preferred_element_type=jnp.float32) / math.sqrt(dh)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v,
                   preferred_element_type=jnp.float32).astype(dtype)
  return out.reshape(b, t, hkv * g, dh)


class MLP(nn.Module):
  """SwiGLU: `W_down (silu(W_gate x) * W_up x)`."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = Linear(c.intermediate_size, c, name="gate_proj")(x)
    up = Linear(c.intermediate_size, c, name="up_proj")(x)
    return Linear(c.hidden_size, c, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """One pre-norm block; the scan carry is the residual stream."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache_index, kv):
    h, kv = Attention(self.config, name="attn")(
        RMSNorm(self.config, name="input_norm")(x), cos, sin, mask,
        cache_index, kv)
    x = x + h.astype(x.dtype)
    h = MLP(self.config, name="mlp")(
        RMSNorm(self.config, name="post_attn_norm")(x))
    return x + h.astype(x.dtype), kv


def attention_mask_matrix(config: LlamaConfig, t: int, s: int, offset,
                          key_mask=None) -> jax.Array:
  """Boolean `(B or 1, T, S)`: query `offset + i` may attend key `j`.

  Causal (`j <= offset + i`), within the sliding window if any, and only to
  keys whose `key_mask` `(B, S)` entry is true. Plain causal attention
  (offset 0, `t == s`, no window, no key mask) returns None, which lets the
  attention use a fused causal kernel.
  """
  if (key_mask is None and config.sliding_window is None and t == s
      and isinstance(offset, int) and offset == 0):
    return None
  qi = offset + jnp.arange(t)[:, None]
  kj = jnp.arange(s)[None, :]
  mask = kj <= qi
  if config.sliding_window is not None:
    mask &= qi - kj < config.sliding_window
  mask = mask[None]
  if key_mask is not None:
    mask = mask & key_mask.astype(bool)[:, None, :]
  return mask


class Llama(nn.Module):
  """The full model: tokens `(B, T)` -> float32 logits `(B, T, V)`.

  With `cache` (a dict of `k`, `v` arrays `(L, B, S, H_kv, D_h)`) the new
  keys/values are written at `cache_index` and `(logits, cache)` is returned.
  With `return_hidden=True` the final normalized hidden states `(B, T, D)`
  are returned instead of logits (see `head_logits`), so a caller that needs
  a few positions' logits never materializes `(B, T, V)`.
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, tokens, positions=None, attention_mask=None, cache=None,
               cache_index=None, return_hidden=False):
    c = self.config
    b, t = tokens.shape
    offset = 0 if cache is None else cache_index
    if positions is None:
      positions = jnp.broadcast_to(offset + jnp.arange(t), (b, t))
    cos, sin = rope_cos_sin(c, positions)
    s = t if cache is None else cache["k"].shape[2]
    mask = attention_mask_matrix(c, t, s, offset, attention_mask)

    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype,
                     param_dtype=c.param_dtype,
                     embedding_init=nn.initializers.normal(0.02), name="embed")
    x = embed(tokens)
    layer = DecoderLayer
    if c.remat != "none":
      layer = nn.remat(layer, policy=_remat_policy(c.remat), prevent_cse=False)
    stack = nn.scan(layer, variable_axes={"params": 0},
                    split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast,
                             nn.broadcast, 0),
                    length=c.num_layers)
    x, cache = stack(c, name="layers")(x, cos, sin, mask, cache_index, cache)
    x = RMSNorm(c, name="final_norm")(x)
    if return_hidden:  # the caller applies the head (e.g. chunked loss)
      return x if cache is None else (x, cache)
    if c.tie_word_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, embed.embedding.astype(x.dtype))
    else:
      logits = Linear(c.vocab_size, c, name="lm_head")(x)
    logits = logits.astype(jnp.float32)
    return logits if cache is None else (logits, cache)


def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Logical shape of every parameter, keyed by "/"-joined path.

  Layer parameters include the leading layer axis; linear kernels are
  `(L, out, in)` whether stored as float arrays or QArrays.
  """
  c, l = config, config.num_layers
  d, f, dh = c.hidden_size, c.intermediate_size, c.head_dim
  outs = {"q_proj": c.num_heads * dh, "k_proj": c.num_kv_heads * dh,
          "v_proj": c.num_kv_heads * dh, "o_proj": d,
          "gate_proj": f, "up_proj": f, "down_proj": d}
  ins = {"o_proj": c.num_heads * dh, "down_proj": f}
  shapes = {"embed/embedding": (c.vocab_size, d),
            "layers/input_norm/scale": (l, d),
            "layers/post_attn_norm/scale": (l, d),
            "final_norm/scale": (d,)}
  for block, names in LINEAR_NAMES.items():
    for name in names:
      shapes[f"layers/{block}/{name}/kernel"] = (l, outs[name],
                                                 ins.get(name, d))
      if c.attention_bias and name in ("q_proj", "k_proj", "v_proj"):
        shapes[f"layers/{block}/{name}/bias"] = (l, outs[name])
  if not c.tie_word_embeddings:
    shapes["lm_head/kernel"] = (c.vocab_size, d)
  return shapes


def _logical_shape(x) -> tuple[int, ...]:
  if isinstance(x, qmatmul.WeightWithProbe):
    x = x.q
  if isinstance(x, qa.QArray) or _is_composite(x):
    return tuple(x.batch_shape) + tuple(x.shape)
  return tuple(np.shape(x))


def _is_composite(x) -> bool:
  """A kernel object with its own matmul and logical shape (QFT weights)."""
  return (hasattr(x, "apply_linear") and hasattr(x, "batch_shape")
          and hasattr(x, "shape"))


def _is_leaf(x) -> bool:
  return (isinstance(x, (qa.QArray, qmatmul.WeightWithProbe))
          or _is_composite(x))


def check_params(params: dict, config: LlamaConfig) -> None:
  """Raises ValueError naming missing, unexpected or misshapen parameters.

  LoRA factors `lora_a`/`lora_b` beside a kernel are allowed (in pairs).
  """
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(
              params, is_leaf=_is_leaf)[0]}
  want = param_shapes(config)
  missing = sorted(set(want) - set(flat))
  if missing:
    raise ValueError(f"missing parameters: {missing}")
  lora = {p for p in flat if p.endswith(("/lora_a", "/lora_b"))}
  unexpected = sorted(set(flat) - set(want) - lora)
  if unexpected:
    raise ValueError(f"unexpected parameters: {unexpected}")
  for path, shape in want.items():
    got = _logical_shape(flat[path])
    if got != shape:
      raise ValueError(f"parameter {path} has shape {got}, expected {shape}")
  for path in lora:
    base = path.rsplit("/", 1)[0]
    if f"{base}/kernel" not in want or not {f"{base}/lora_a",
                                            f"{base}/lora_b"} <= lora:
      raise ValueError(f"LoRA factor {path} needs a kernel and both "
                       "lora_a and lora_b")


def _check_tokens(tokens) -> None:
  if np.ndim(tokens) != 2:
    raise ValueError(f"tokens must be (batch, time), got shape "
                     f"{np.shape(tokens)}")
  if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
    raise ValueError(f"tokens must be integers, got {jnp.result_type(tokens)}")


@functools.partial(jax.jit, static_argnames=("config",))
def init_params(config: LlamaConfig, key: jax.Array) -> dict:
  """Random parameters (normal(0.02) linears/embedding, unit norms; jitted)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Llama(config).init(key, tokens)["params"]


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(params, config, tokens, attention_mask, positions):
  return Llama(config).apply({"params": params}, tokens, positions=positions,
                             attention_mask=attention_mask)


def forward(params: dict, config: LlamaConfig, tokens: jax.Array, *,
            attention_mask: jax.Array | None = None,
            positions: jax.Array | None = None) -> jax.Array:
  """Float32 logits `(B, T, V)` for integer tokens `(B, T)` (jitted).

  Args:
    params: the "params" collection (see the module docstring).
    config: the model config.
    tokens: int `(B, T)`.
    attention_mask: optional `(B, T)`, 1 for real tokens and 0 for padding
      keys (queries at padded positions produce unspecified logits).
    positions: optional int `(B, T)` RoPE positions (default `0 .. T-1`).
  """
  _check_tokens(tokens)
  check_params(params, config)
  for name, arr in (("attention_mask", attention_mask),
                    ("positions", positions)):
    if arr is not None and np.shape(arr) != np.shape(tokens):
      raise ValueError(f"{name} has shape {np.shape(arr)}, expected "
                       f"{np.shape(tokens)} like tokens")
  return _forward(params, config, tokens, attention_mask, positions)


def head_logits(params: dict, config: LlamaConfig, x: jax.Array) -> jax.Array:
  """Float32 logits of final hidden states `x (..., D)` (tied or untied)."""
  if config.tie_word_embeddings:
    # x.dtype output, then float32: see `qmatmul.linear` for why.
    return jnp.einsum("...d,vd->...v", x, params["embed"]["embedding"].astype(
        x.dtype)).astype(jnp.float32)
  return Linear(config.vocab_size, config).apply(
      {"params": params["lm_head"]}, x).astype(jnp.float32)
