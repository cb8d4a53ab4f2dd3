"""KV-cache decoding for the LLaMA family: greedy or temperature/top-k sampling.

The cache is an explicit pytree, stacked over layers like the parameters:

    {"k": (L, B, S, H_kv, D_h), "v": (L, B, S, H_kv, D_h)}

`Llama.__call__(tokens, cache=cache, cache_index=i)` writes the keys/values of
`tokens` at positions `i .. i+T-1` and returns the updated cache, so decoding
is a pure function: prefill the prompt once, then one token per step inside a
`lax.scan`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qft_jax._src.models import llama


def init_cache(config: llama.LlamaConfig, batch: int, length: int,
               dtype=None) -> dict:
  """Zeroed cache `{"k", "v"}` of shape `(L, batch, length, H_kv, D_h)`."""
  shape = (config.num_layers, batch, length, config.num_kv_heads,
           config.head_dim)
  dtype = config.dtype if dtype is None else dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def decode_step(params: dict, config: llama.LlamaConfig, tokens: jax.Array,
                cache: dict, cache_index) -> tuple[jax.Array, dict]:
  """Logits `(B, T, V)` for `tokens` at positions `cache_index + t`, new cache."""
  return llama.Llama(config).apply({"params": params}, tokens, cache=cache,
                                   cache_index=cache_index)


def _pick(logits, key, temperature: float, top_k: int | None):
  """Next token `(B,)` from last-position logits `(B, V)`."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    "config", "max_new_tokens", "temperature", "top_k", "eos_id"))
def _generate(params, config, prompt_ids, rng, max_new_tokens, temperature,
              top_k, eos_id):
  b, t = prompt_ids.shape
  cache = init_cache(config, b, t + max_new_tokens)
  hidden, cache = llama.Llama(config).apply(
      {"params": params}, prompt_ids, cache=cache, cache_index=0,
      return_hidden=True)
  logits = llama.head_logits(params, config, hidden[:, -1])  # not (B, T, V)
  keys = jax.random.split(rng, max_new_tokens)
  first = _pick(logits, keys[0], temperature, top_k)
  done = jnp.zeros((b,), bool) if eos_id is None else first == eos_id

  def step(carry, key):
    token, cache, index, done = carry
    logits, cache = decode_step(params, config, token[:, None], cache, index)
    nxt = _pick(logits[:, -1], key, temperature, top_k)
    if eos_id is not None:
      nxt = jnp.where(done, eos_id, nxt)
      done = done | (nxt == eos_id)
    return (nxt, cache, index + 1, done), nxt

  _, rest = jax.lax.scan(step, (first, cache, t, done), keys[1:])
  return jnp.concatenate([prompt_ids, first[:, None], rest.T], axis=1)


def generate(params: dict, config: llama.LlamaConfig, prompt_ids: jax.Array,
             max_new_tokens: int, *, rng: jax.Array | None = None,
             temperature: float = 0.0, top_k: int | None = None,
             eos_id: int | None = None) -> jax.Array:
  """Continues each prompt by `max_new_tokens` tokens (jitted).

  Args:
    params, config: the model.
    prompt_ids: int `(B, T)`, all prompts of the same length (no padding).
    max_new_tokens: tokens to add (static).
    rng: PRNG key, required when `temperature > 0`.
    temperature: 0 for greedy argmax; otherwise sample from
      `softmax(logits / temperature)`, restricted to the `top_k` largest
      logits when `top_k` is given.
    eos_id: once a row emits it, the rest of that row is `eos_id`.

  Returns:
    int32 `(B, T + max_new_tokens)`: the prompts followed by the new tokens.
  """
  llama.check_params(params, config)
  if jnp.ndim(prompt_ids) != 2 or jnp.shape(prompt_ids)[1] < 1:
    raise ValueError(f"prompt_ids must be (batch, time) with time >= 1, got "
                     f"shape {jnp.shape(prompt_ids)}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng key")
  if top_k is not None and not 1 <= top_k <= config.vocab_size:
    raise ValueError(f"top_k must be in [1, {config.vocab_size}], got {top_k}")
  rng = jax.random.key(0) if rng is None else rng
  return _generate(params, config, jnp.asarray(prompt_ids, jnp.int32), rng,
                   max_new_tokens, float(temperature), top_k, eos_id)
