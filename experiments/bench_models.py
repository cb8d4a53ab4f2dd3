"""The LLaMA-shaped benchmark models of bench_train.py, built on the device.

`ROWS` names each benchmark row's model, method, batch and options;
`model_config` gives the LLaMA-7B / 65B shapes (or a tiny CPU one) and
`build_params` random parameters directly in a method's storage (random
codes and scales, never a float copy of a quantized model). Flag-free, so
other launchers (check_pallas_training.py) build the same models.
"""

from __future__ import annotations

import dataclasses

LOSS_CHUNK = 128  # positions per chunk of the head + cross-entropy
# name -> (model, method, batch, seq, options)
ROWS = {  # in the order they run (most important first)
    "qlora": ("7b", "qlora", 4, 512, dict(optimizer="adamw", bits=4,
                                          group_size=64)),
    # QLoRA through the layer-streamed step: one layer's LoRA gradient and
    # AdamW update at a time, no full LoRA gradient tree.
    "qlora_streamed": ("7b", "qlora", 4, 512, dict(
        optimizer="adamw", bits=4, group_size=64, streamed=True)),
    # ... with the saved residual stream in host memory.
    "qlora_offload": ("7b", "qlora", 4, 512, dict(
        optimizer="adamw", bits=4, group_size=64, streamed=True,
        offload_saved=True)),
    "full_lion_int8": ("7b", "full", 4, 512, dict(optimizer="lion_int8",
                                                  streamed=True)),
    "qft": ("7b", "qft", 4, 512, dict(optimizer="lion_int8", streamed=True)),
    "lora": ("7b", "lora", 4, 512, dict(optimizer="adamw")),
    "modulora3": ("7b", "modulora", 4, 512, dict(optimizer="adamw", bits=3,
                                                 group_size=128)),
    "peqa4": ("7b", "peqa", 4, 512, dict(optimizer="adamw", bits=4,
                                         group_size=128)),
    "hift_adamw_fp32": ("7b", "hift", 4, 512, dict(
        optimizer="adamw", streamed=True, hift_layers=1, weight_bytes=4)),
    "qft_hift": ("7b", "qft", 4, 512, dict(optimizer="lion_int8",
                                           streamed=True, hift_layers=1)),
    "modulora3_65b": ("65b", "modulora", 1, 512, dict(
        optimizer="adamw", bits=3, group_size=128)),
}


def model_config(name: str, tiny: bool):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qft_jax._src.models import llama  # pylint: disable=g-import-not-at-top
  if tiny:
    return llama.LlamaConfig(vocab_size=512, hidden_size=128,
                             intermediate_size=256, num_layers=2, num_heads=4,
                             num_kv_heads=4, head_dim=32, remat="full",
                             dtype=jnp.float32, param_dtype=jnp.float32)
  d, f, layers, heads = ((4096, 11008, 32, 32) if name == "7b"
                         else (8192, 22016, 80, 64))
  return llama.LlamaConfig(vocab_size=32000, hidden_size=d,
                           intermediate_size=f, num_layers=layers,
                           num_heads=heads, num_kv_heads=heads, head_dim=128,
                           remat="full", dtype=jnp.bfloat16,
                           param_dtype=jnp.bfloat16)


def build_params(config, method: str, opts: dict, key):
  """Random params directly in the method's storage, on the device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qft_jax._src import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from qft_jax._src import qarray as qa  # pylint: disable=g-import-not-at-top
  from qft_jax._src.optim import qft  # pylint: disable=g-import-not-at-top
  from qft_jax._src.quantizers import nf4  # pylint: disable=g-import-not-at-top
  from qft_jax._src.memory import linear_shapes  # pylint: disable=g-import-not-at-top
  c, lnum = config, config.num_layers
  trained_rest = method in ("full", "qft", "hift")
  wdt = jnp.float32 if opts.get("weight_bytes") == 4 else c.param_dtype
  rest_dt = jnp.float32 if trained_rest else c.param_dtype
  keys = iter(jax.random.split(key, 32))

  def normal(shape, dt):
    k = next(keys)
    return jax.jit(lambda: (0.02 * jax.random.normal(k, shape, jnp.float32)
                            ).astype(dt))()

  names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj")
  scale_dt = jnp.bfloat16

  def one_layer(shape, k):
    """One layer's kernel; `lax.map` stacks them with per-layer temporaries
    only, so building never raises the process's peak memory."""
    if method in ("full", "lora", "hift"):
      return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(wdt)
    if method == "qft":
      dense_cfg = qa.QuantConfig(bits=8, group_size=-1, symmetric=True)
      n_out = qft.num_outliers(shape, 0.01)
      stride = shape[0] * shape[1] // n_out
      k1, k2, k3 = jax.random.split(k, 3)
      dense = qa.random_qarray(k1, shape, dense_cfg, c.dtype)
      idx = (jnp.arange(n_out, dtype=jnp.int32) * stride
             + jax.random.randint(k2, (n_out,), 0, stride, jnp.int32))
      val = 0.05 * jax.random.normal(k3, (n_out,), jnp.float32)
      return qft.QFTWeight(dense, idx, val)
    if method == "qlora":  # NF4 with double-quantized scales (QLoRA)
      cfg = qa.QuantConfig(bits=4, group_size=opts["group_size"],
                           codebook="nf4", scale_dtype=jnp.float32)
      q = qa.random_qarray(k, shape, cfg, c.dtype)
      return dataclasses.replace(q, scale=nf4.double_quantize(q.scale))
    else:
      cfg = qa.QuantConfig(bits=opts["bits"], group_size=opts["group_size"],
                           scale_dtype=scale_dt)
    return qa.random_qarray(k, shape, cfg, c.dtype)

  def kernel(shape):
    layer_keys = jax.random.split(next(keys), lnum)
    return jax.jit(lambda ks: jax.lax.map(lambda k: one_layer(shape, k), ks)
                   )(layer_keys)

  shapes = dict(zip(names, linear_shapes(c)))
  layers = {
      "input_norm": {"scale": jnp.ones((lnum, c.hidden_size), c.param_dtype)},
      "post_attn_norm": {"scale": jnp.ones((lnum, c.hidden_size),
                                           c.param_dtype)},
      "attn": {n: {"kernel": kernel(shapes[n])} for n in names[:4]},
      "mlp": {n: {"kernel": kernel(shapes[n])} for n in names[4:]},
  }
  params = {"embed": {"embedding": normal((c.vocab_size, c.hidden_size),
                                          rest_dt)},
            "layers": layers,
            "final_norm": {"scale": jnp.ones((c.hidden_size,), rest_dt)},
            "lm_head": {"kernel": normal((c.vocab_size, c.hidden_size),
                                         rest_dt)}}
  if method in ("lora", "qlora", "modulora"):
    spec = lora_lib.LoraSpec(rank=16, alpha=32.0, targets=(
        r"attn/(q|k|v|o)_proj$", r"mlp/(gate|up|down)_proj$"))
    params = lora_lib.init_lora(params, spec, next(keys))
  return params
