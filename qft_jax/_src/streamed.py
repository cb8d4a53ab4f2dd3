"""The layer-streamed training step: one layer's weight gradient at a time.

`jax.grad` over a whole model returns every weight gradient at once (13.4 GB
in bf16 for a 7B model) before the optimizer runs. QFT and HiFT only need one
layer's gradient at a time, so this step runs the backward pass as a reverse
loop over the stacked decoder layers and updates each layer as soon as its
gradient exists:

    forward:   x_0 = embed(tokens);  x_{l+1} = layer_l(x_l), saving x_l;
               loss, head_vjp = vjp(head, x_L)
    backward:  for l = L-1 .. 0:
                 (g_l, dx_l) = vjp(layer_l recomputed at x_l)(dx_{l+1})
                 u_l, s_l    = tx.update(g_l, s_l)        (per-layer state)
                 layer_l     = apply(layer_l, u_l)        (add or requantize)
               embedding/norm/head updated last, from their own gradients.

The stacked layers and their optimizer states are the loop's carry and are
updated with dynamic-update-slices, so with the step's inputs donated XLA
updates them in place: peak memory is weights + optimizer state + one
layer's gradient + the saved layer inputs `(L, B, T, D)` + one layer's
recomputation.

HiFT: `active_layers` (dynamic indices) and `active_rest` (static names of
the non-layer units: "embed", "final_norm", "lm_head") select what trains;
the other layers only propagate `dx` (no weight gradient, no state).

Global-norm gradient clipping is not available here (the full gradient never
exists); `clip_per_layer` clips each layer's gradient by its own norm.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from qft_jax._src import train
from qft_jax._src.data import Batch
from qft_jax._src.models import llama

REST_UNITS = ("embed", "final_norm", "lm_head")


@dataclasses.dataclass(frozen=True)
class StreamedSpec:
  """Static structure of a streamed step.

  Attributes:
    layer_method: view/apply of one layer's params (a slice of the stack).
    rest_method: view/apply of the non-layer params that train (the units
      in `active_rest` present in the model).
    active_rest: which non-layer units train this step (HiFT), all by
      default.
    hift_layers: None (every layer trains) or the number `m` of layers that
      train this step, whose indices the step takes as an argument.
    clip_per_layer: clip each layer's gradient to this norm (0: off).
    offload_saved: keep the saved layer inputs `(L, B, T, D)` in host memory
      (`jax.memory.Space.Host`) and copy one back per layer of the backward
      loop: the residual stream leaves the device (0.5 GB for LLaMA-7B at
      4 x 512 in bf16) for two host transfers per layer and step.
  """
  layer_method: train.Method
  rest_method: train.Method
  active_rest: tuple[str, ...] = REST_UNITS
  hift_layers: int | None = None
  clip_per_layer: float = 0.0
  offload_saved: bool = False


def _rope_mask(config: llama.LlamaConfig, t: int):
  positions = jnp.arange(t)[None]
  cos, sin = llama.rope_cos_sin(config, positions)
  return cos, sin, llama.attention_mask_matrix(config, t, t, 0)


def layer_apply(config: llama.LlamaConfig, layer: Any, x: jax.Array,
                cos, sin, mask) -> jax.Array:
  """One decoder layer on the residual stream `x (B, T, D)`."""
  return llama.DecoderLayer(config).apply({"params": layer}, x, cos, sin,
                                          mask, None, None)[0]


def _embed(config, rest, tokens):
  return rest["embed"]["embedding"].astype(config.dtype)[tokens]


def _head_loss(config, rest, x, targets, loss_mask):
  x = llama.RMSNorm(config).apply({"params": rest["final_norm"]}, x)
  return train.chunked_head_nll(rest, config, x, targets, loss_mask)


def _clip(g, max_norm):
  if not max_norm:
    return g
  norm = optax.global_norm(g)
  return jax.tree.map(lambda x: x * jnp.minimum(1.0, max_norm / (norm + 1e-12)),
                      g)


def _index(tree, i):
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False),
                      tree)


def _set(tree, i, value):
  return jax.tree.map(
      lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype),
                                                       i, 0), tree, value)


def _split_rest(params: dict, active: Sequence[str]) -> tuple[dict, dict]:
  rest = {k: v for k, v in params.items() if k != "layers"}
  on = {k: v for k, v in rest.items() if k in active}
  off = {k: v for k, v in rest.items() if k not in active}
  return on, off


def init_opt_states(spec: StreamedSpec, params: dict,
                    layer_tx: optax.GradientTransformation,
                    rest_tx: optax.GradientTransformation,
                    active_layers: Sequence[int] | None = None) -> dict:
  """Optimizer states: per layer (stacked, leading axis) and for the rest.

  With `spec.hift_layers = m`, only the `active_layers` (m of them) get a
  state; other groups' states live wherever the caller keeps them.
  """
  layers = params["layers"]
  if spec.hift_layers is not None:
    layers = jax.tree.map(lambda a: a[jnp.asarray(active_layers)], layers)
  layer_state = jax.vmap(
      lambda l: layer_tx.init(spec.layer_method.view(l)[0]))(layers)
  on, _ = _split_rest(params, spec.active_rest)
  rest_state = rest_tx.init(spec.rest_method.view(on)[0]) if on else ()
  return {"layers": layer_state, "rest": rest_state}


def make_streamed_step(config: llama.LlamaConfig, spec: StreamedSpec,
                       layer_tx: optax.GradientTransformation,
                       rest_tx: optax.GradientTransformation, *,
                       donate: bool = True) -> Callable:
  """Builds `step(params, opt_states, rng, step, batch[, active]) -> ...`.

  Args:
    config: the model config (stacked decoder layers).
    spec: what trains and how (see `StreamedSpec`).
    layer_tx: optimizer of one layer's trainable view (its state is vmapped
      over layers by `init_opt_states`).
    rest_tx: optimizer of the non-layer units' trainable view.
    donate: donate params and optimizer states (in-place updates).

  Returns:
    A jitted `step(params, opt_states, rng, step, batch, active_layers)` ->
    `(params, opt_states, rng, metrics)`; `active_layers` is an int32 `(m,)`
    array when `spec.hift_layers == m`, else None.
  """

  def step(params, opt_states, rng, step_count, batch: Batch, active_layers):
    b, t = batch.tokens.shape
    cos, sin, mask = _rope_mask(config, t)
    layers = params["layers"]
    rest_on, rest_off = _split_rest(params, spec.active_rest)
    rest_view, rest_rebuild = spec.rest_method.view(rest_on)

    def embed_fn(rv):
      return _embed(config, {**rest_rebuild(rv), **rest_off}, batch.tokens)

    x0, embed_vjp = jax.vjp(embed_fn, rest_view)

    def fwd(x, layer):
      keep = jax.device_put(x, jax.memory.Space.Host) if spec.offload_saved \
          else x
      return layer_apply(config, layer, x, cos, sin, mask), keep

    x_last, saved = jax.lax.scan(fwd, x0, layers)

    def head_fn(rv, x):
      return _head_loss(config, {**rest_rebuild(rv), **rest_off}, x,
                        batch.targets, batch.loss_mask)

    (nll, ntok), head_vjp = jax.vjp(head_fn, rest_view, x_last)
    scale = 1.0 / jnp.maximum(ntok, 1.0)
    g_rest_head, dx = head_vjp((scale, jnp.zeros_like(ntok)))

    def layer_update(l, layer, opt, x, dx, key):
      view, rebuild = spec.layer_method.view(layer)
      _, vjp = jax.vjp(lambda v, x_: layer_apply(config, rebuild(v), x_, cos,
                                                 sin, mask), view, x)
      g, dx_prev = vjp(dx)
      g = _clip(g, spec.clip_per_layer)
      updates, opt = layer_tx.update(g, opt, view)
      layer, apply_metrics = spec.layer_method.apply(layer, view, updates,
                                                     jax.random.fold_in(key, l),
                                                     step_count)
      sq = sum(jnp.sum(jnp.square(x_.astype(jnp.float32)))
               for x_ in jax.tree.leaves(g))
      return layer, opt, dx_prev, sq, apply_metrics

    def dx_only(layer, x, dx):
      _, vjp = jax.vjp(lambda x_: layer_apply(config, layer, x_, cos, sin,
                                              mask), x)
      return vjp(dx)[0]

    def layer_input(l):
      x = _index(saved, l)
      if spec.offload_saved:
        x = jax.device_put(x, jax.memory.Space.Device)
      return x

    rng, key = jax.random.split(rng)
    _, _, _, _, metric_shape = jax.eval_shape(
        layer_update, 0, _index(layers, 0), _index(opt_states["layers"], 0),
        layer_input(0), dx, key)

    def backward(i, carry):
      dx, layers, opt_layers, sq_sum, metric_acc = carry
      l = config.num_layers - 1 - i
      layer, x = _index(layers, l), layer_input(l)
      if spec.hift_layers is None:
        layer, opt, dx, sq, m = layer_update(l, layer, _index(opt_layers, l),
                                             x, dx, key)
        layers = _set(layers, l, layer)
        opt_layers = _set(opt_layers, l, opt)
      else:
        slot = jnp.argmax(active_layers == l)
        is_active = jnp.any(active_layers == l)

        def active(args):
          layers, opt_layers, dx = args
          layer_, opt, dx_, sq_, m_ = layer_update(
              l, layer, _index(opt_layers, slot), x, dx, key)
          return (_set(layers, l, layer_), _set(opt_layers, slot, opt), dx_,
                  sq_, m_)

        def inactive(args):
          layers, opt_layers, dx = args
          zeros = jax.tree.map(jnp.zeros_like, metric_shape)
          return layers, opt_layers, dx_only(layer, x, dx), jnp.zeros(()), zeros

        layers, opt_layers, dx, sq, m = jax.lax.cond(
            is_active, active, inactive, (layers, opt_layers, dx))
      metric_acc = jax.tree.map(jnp.add, metric_acc, m)
      return dx, layers, opt_layers, sq_sum + sq, metric_acc

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shape)
    dx0, layers, opt_layers, sq_layers, metric_sum = jax.lax.fori_loop(
        0, config.num_layers, backward,
        (dx, layers, opt_states["layers"], jnp.zeros(()), zeros))
    (g_rest_embed,) = embed_vjp(dx0)
    g_rest = jax.tree.map(jnp.add, g_rest_head, g_rest_embed)
    new_params = {**params, "layers": layers}
    new_rest_state = opt_states["rest"]
    if rest_on:
      updates, new_rest_state = rest_tx.update(g_rest, opt_states["rest"],
                                               rest_view)
      rest_new, _ = spec.rest_method.apply(rest_on, rest_view, updates,
                                           jax.random.fold_in(key, config.num_layers),
                                           step_count)
      new_params.update(rest_new)
    n_active = (config.num_layers if spec.hift_layers is None
                else spec.hift_layers)
    metrics = {"loss": nll * scale, "tokens": ntok,
               "grad_norm": jnp.sqrt(sq_layers + sum(
                   jnp.sum(jnp.square(g.astype(jnp.float32)))
                   for g in jax.tree.leaves(g_rest))),
               **{k: v / n_active for k, v in metric_sum.items()}}
    return new_params, {"layers": opt_layers, "rest": new_rest_state}, rng, \
        metrics

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())
