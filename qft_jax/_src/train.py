"""One jitted training step for every method.

A method is three choices (see ../shared/design/architecture.md): how each
weight is stored, what trains, and how an update is applied. The step here
takes them as arguments:

    grads   = d loss / d view(params)          (only the trainable view)
    updates = optimizer.update(grads, ...)      (any optax transform)
    params  = apply(params, updates, key)       (add, or requantize for QFT)

`view` splits the trainable floats from frozen leaves (integer codes, frozen
bases) before differentiation, so gradients exist only for what trains.
Gradient accumulation runs micro-batches through `lax.scan`; a non-finite
loss or gradient either skips the step (params and optimizer state kept,
`skipped` counted) or is reported for the launcher to stop on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qft_jax._src import sharding
from qft_jax._src.data import Batch

ApplyFn = Callable[[Any, jax.Array], jax.Array]


class TrainState(NamedTuple):
  """Everything a step reads and writes (all of it checkpointed).

  Attributes:
    step: int32 scalar, steps taken (skipped ones included).
    params: the model params (float, QArray, LoRA, QFT weights...).
    opt_state: the optimizer state of the trainable view.
    rng: PRNG key (raw uint32) for stochastic rounding / dropout.
    skipped: int32 scalar, steps skipped for a non-finite loss or gradient.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped: jax.Array


@dataclasses.dataclass(frozen=True)
class Method:
  """How a method differentiates and updates the params.

  Attributes:
    view: `params -> (trainable, rebuild)`; `trainable` is the float pytree
      the optimizer sees, `rebuild(trainable)` gives the params the model runs
      with (e.g. `combine(trainable, frozen)`).
    apply: `(params, trainable, updates, key, step) -> (params, metrics)`,
      the update rule (add updates; for QFT: requantize integer weights).
  """
  view: Callable[[Any], tuple[Any, Callable[[Any], Any]]]
  apply: Callable[[Any, Any, Any, jax.Array, jax.Array], tuple[Any, dict]]


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum of token NLLs over `mask` and the number of tokens counted.

  `logits (B, T, V)` are upcast to float32; `nll = logsumexp(z) - z[target]`.
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  return jnp.sum((lse - picked) * mask), jnp.sum(mask)


def chunked_head_nll(params: Any, config, x: jax.Array, targets: jax.Array,
                     mask: jax.Array, chunk: int = 128
                     ) -> tuple[jax.Array, jax.Array]:
  """Head + cross-entropy over final hidden states `x (B, T, D)` in chunks.

  Runs `chunk` positions at a time under `jax.checkpoint`, so the float32
  logits `(B, T, V)` never exist whole (3 x B x T x V x 4 bytes saved: 0.8 GB
  for a 32k vocabulary at 4 x 512). `params` needs `embed` (tied) or
  `lm_head`. Returns `(nll_sum, count)`.
  """
  from qft_jax._src.models import llama  # pylint: disable=g-import-not-at-top
  b, t = x.shape[:2]
  c = chunk if t % chunk == 0 else t
  split = lambda a: jnp.moveaxis(a.reshape(b, t // c, c, *a.shape[2:]), 1, 0)

  @jax.checkpoint
  def one(carry, xs):
    xc, tc, mc = xs
    nll, n = cross_entropy(llama.head_logits(params, config, xc), tc, mc)
    return (carry[0] + nll, carry[1] + n), None

  (nll, n), _ = jax.lax.scan(one, (jnp.zeros(()), jnp.zeros(())),
                             (split(x), split(targets), split(mask)))
  return nll, n


def chunked_lm_loss(config, chunk: int = 128) -> Callable:
  """`loss(params, tokens, targets, mask) -> (nll_sum, count)` for
  `make_train_step(loss_fn=...)`, with the head chunked (see above)."""
  from qft_jax._src.models import llama  # pylint: disable=g-import-not-at-top

  def loss(params, tokens, targets, mask):
    x = llama.Llama(config).apply({"params": params}, tokens,
                                  return_hidden=True)
    return chunked_head_nll(params, config, x, targets, mask, chunk)

  return loss


def init_state(params: Any, method: Method, optimizer: optax.GradientTransformation,
               seed: int = 0) -> TrainState:
  trainable, _ = method.view(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(trainable),
                    rng=jax.random.PRNGKey(seed),
                    skipped=jnp.zeros((), jnp.int32))


def jit_init_state(method: Method, optimizer: optax.GradientTransformation,
                   seed: int = 0, out_shardings: Any = None
                   ) -> Callable[[Any], TrainState]:
  """`init_state` jitted with the params donated.

  The state's params then reuse the input buffers: without the donation XLA
  copies every weight into the state, and both copies are live while it is
  built (twice the weights' bytes at the process's peak). The `params`
  passed in are invalid afterwards.
  """
  return jax.jit(lambda p: init_state(p, method, optimizer, seed),
                 out_shardings=out_shardings, donate_argnums=0)


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(apply_fn: ApplyFn, method: Method,
                    optimizer: optax.GradientTransformation, *,
                    accum_steps: int = 1, skip_nonfinite: bool = True,
                    donate: bool = True, shardings: tuple[Any, Any] | None = None,
                    loss_fn: Callable | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Builds `step(state, batch) -> (state, metrics)`, jitted.

  Args:
    apply_fn: `(params, tokens (B, T)) -> logits (B, T, V)`; or None when
      `loss_fn` is given.
    method: the view/apply pair of the method being trained.
    optimizer: any optax transform over the trainable view.
    accum_steps: micro-batches per step; the batch's leading dimension must
      be a multiple of it. The loss is the token-weighted mean over all.
    skip_nonfinite: on a NaN/inf loss or gradient keep the old params and
      optimizer state and count the step in `state.skipped`; if False, the
      update is applied and the launcher is expected to stop on
      `metrics["finite"] == 0`.
    donate: donate the state buffers so XLA updates them in place.
    shardings: optional `(state_shardings, batch_sharding)` (see
      `sharding.train_step_shardings`): the step is jitted with these input
      shardings and returns the state with the same shardings, so it runs
      SPMD over their mesh without resharding between steps; it is traced
      under `sharding.compute_mesh`, so quantized weights are all-gathered
      as codes.
    loss_fn: optional `(params, tokens, targets, mask) -> (nll_sum, count)`
      replacing `apply_fn` + `cross_entropy` (e.g. `chunked_lm_loss`).

  Returns:
    The jitted step. Metrics: loss, tokens, grad_norm, finite, plus the
    method's apply metrics.
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")

  if (apply_fn is None) == (loss_fn is None):
    raise ValueError("pass exactly one of apply_fn and loss_fn")

  def loss_sum(trainable, rebuild, tokens, targets, mask):
    if loss_fn is not None:
      return loss_fn(rebuild(trainable), tokens, targets, mask)
    logits = apply_fn(rebuild(trainable), tokens)
    return cross_entropy(logits, targets, mask)

  def step(state: TrainState, batch: Batch):
    trainable, rebuild = method.view(state.params)
    b = batch.tokens.shape[0]
    if b % accum_steps:
      raise ValueError(f"batch size {b} is not a multiple of accum_steps "
                       f"{accum_steps}")
    micro = lambda x: x.reshape(accum_steps, b // accum_steps, *x.shape[1:])
    # Sum of NLLs and token counts over micro-batches, then normalize.
    def body(carry, mb):
      g_acc, nll_acc, n_acc = carry
      (nll, n), g = jax.value_and_grad(loss_sum, has_aux=True)(
          trainable, rebuild, *mb)
      g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
      return (g_acc, nll_acc + nll, n_acc + n), None
    # Accumulate in float32; hand the optimizer gradients in the params'
    # dtypes so optimizer states never change dtype between steps.
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
    (g_sum, nll, ntok), _ = jax.lax.scan(
        body, (zeros, jnp.zeros(()), jnp.zeros(())),
        (micro(batch.tokens), micro(batch.targets), micro(batch.loss_mask)))
    denom = jnp.maximum(ntok, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum,
                         trainable)
    loss = nll / denom
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    rng, key = jax.random.split(state.rng)
    params, apply_metrics = method.apply(state.params, trainable, updates, key,
                                         state.step)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    if skip_nonfinite:
      keep = lambda new, old: jax.tree.map(
          lambda n, o: jnp.where(finite, n, o), new, old)
      params = keep(params, state.params)
      opt_state = keep(opt_state, state.opt_state)
    new_state = TrainState(step=state.step + 1, params=params,
                           opt_state=opt_state, rng=rng,
                           skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = dict(loss=loss, tokens=ntok, grad_norm=optax.global_norm(grads),
                   finite=finite.astype(jnp.int32), **apply_metrics)
    return new_state, metrics

  donate_argnums = (0,) if donate else ()
  if shardings is None:
    return jax.jit(step, donate_argnums=donate_argnums)
  state_sh, batch_sh = shardings

  def sharded_step(state: TrainState, batch: Batch):
    with sharding.compute_mesh(batch_sh.mesh):
      return step(state, batch)

  return jax.jit(sharded_step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, None), donate_argnums=donate_argnums)


def make_eval_step(apply_fn: ApplyFn) -> Callable[[Any, Batch],
                                                  tuple[jax.Array, jax.Array]]:
  """`eval_step(params, batch) -> (nll_sum, tokens)`, jitted."""

  def eval_step(params, batch: Batch):
    return cross_entropy(apply_fn(params, batch.tokens), batch.targets,
                         batch.loss_mask)

  return jax.jit(eval_step)
