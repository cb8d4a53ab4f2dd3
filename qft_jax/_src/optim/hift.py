"""HiFT: hierarchical full-parameter fine-tuning, one group of units per step.

Liu et al., 2024, "HiFT: A Hierarchical Full Parameter Fine-Tuning Strategy"
(arXiv 2401.15207, sec. 3, Alg. 1). The model is cut into units: the
embedding, each decoder layer, the final norm and the (untied) head. Units are
ordered bottom-up (embedding first), top-down, or by one random permutation
fixed from a seed, and chunked into groups of `m`; step `t` trains group
`t mod k`, `k = ceil(units / m)`, round-robin. Only the active group is
differentiated, and only its optimizer state is on the device: every group has
its own optax state, kept in host memory (numpy) while the group is inactive.

Learning rate. Each group's optimizer counts only its own updates, one per
cycle of `k` steps. `lr_mode="per_cycle"` evaluates the schedule at the cycle
index `t // k`; this is what the official code does (misonsky/HiFT,
`hift/trainer.py`: the scheduler is built for `max_steps` but stepped only
when a cycle completes), which stretches the horizon k times: a schedule
written for T steps ends training at T / k of its horizon (warmup lasts k times
longer, a decay only gets 1/k of the way). Give it a schedule over T / k
cycles to decay fully. `lr_mode="per_step"` evaluates it at the global step
`t` (group g's c-th update happens at step `c k + g`), so a schedule over T
steps runs exactly as in ordinary fine-tuning.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from qft_jax._src.optim import masks

ORDERS = ("bottom-up", "top-down", "random")
LR_MODES = ("per_cycle", "per_step")
# Unit kinds of models/llama.py's tree, bottom-up; "layers" is stacked.
LLAMA_UNIT_RULES = ((r"^embed/", "embedding"), (r"^layers/", "layers"),
                    (r"^final_norm/", "final_norm"), (r"^lm_head/", "head"))


def hift_units(params: Any, rules: Sequence[tuple[str, str]] = LLAMA_UNIT_RULES,
               stacked: str = "layers") -> tuple[str, ...]:
  """Units of `params` bottom-up, e.g. `("embedding", "layers/0", ...)`.

  Args:
    params: the model's parameter tree.
    rules: `(regex, kind)` in bottom-up order; every leaf must match one.
      Kinds that match nothing (e.g. the head of a tied model) are skipped.
    stacked: the kind whose leaves carry a leading layer axis; it becomes one
      unit per layer, `f"{stacked}/{i}"`.
  """
  labels = jax.tree.leaves(masks.mask_from_rules(params, rules,
                                                 allow_unmatched=True))
  units = []
  for _, kind in rules:
    if kind not in labels:
      continue
    if kind == stacked:
      units += [f"{stacked}/{i}" for i in range(_num_layers(params, rules,
                                                            stacked))]
    else:
      units.append(kind)
  return tuple(units)


def _num_layers(params, rules, stacked) -> int:
  labels = jax.tree.leaves(masks.mask_from_rules(params, rules,
                                                 allow_unmatched=True))
  sizes = {np.shape(x)[0] for x, k in zip(jax.tree.leaves(params), labels)
           if k == stacked}
  if len(sizes) != 1:
    raise ValueError(f"stacked leaves disagree on the layer count: {sizes}")
  return sizes.pop()


@dataclasses.dataclass(frozen=True)
class HiFTSchedule:
  """Which units train at which step.

  Attributes:
    units: all units, bottom-up (see `hift_units`).
    group_size: `m`, units per group.
    order: "bottom-up", "top-down" or "random".
    seed: seed of the fixed random permutation.
    lr_mode: "per_cycle" (official code) or "per_step"; see module docstring.
    rules, stacked: how leaves map to units (as in `hift_units`).
  """
  units: tuple[str, ...]
  group_size: int = 1
  order: str = "bottom-up"
  seed: int = 0
  lr_mode: str = "per_cycle"
  rules: tuple[tuple[str, str], ...] = LLAMA_UNIT_RULES
  stacked: str = "layers"

  def __post_init__(self):
    if self.order not in ORDERS:
      raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
    if self.lr_mode not in LR_MODES:
      raise ValueError(f"lr_mode must be one of {LR_MODES}, got "
                       f"{self.lr_mode!r}")
    if not self.units or self.group_size < 1:
      raise ValueError(f"need units and group_size >= 1, got {self.units} "
                       f"and {self.group_size}")

  @property
  def visit_order(self) -> tuple[str, ...]:
    if self.order == "bottom-up":
      return self.units
    if self.order == "top-down":
      return self.units[::-1]
    perm = np.random.default_rng(self.seed).permutation(len(self.units))
    return tuple(self.units[i] for i in perm)

  @property
  def num_groups(self) -> int:
    return math.ceil(len(self.units) / self.group_size)

  @property
  def groups(self) -> tuple[tuple[str, ...], ...]:
    v, m = self.visit_order, self.group_size
    return tuple(v[i:i + m] for i in range(0, len(v), m))

  def group(self, step: int) -> int:
    """Index into `groups` of the group trained at `step`."""
    return step % self.num_groups

  def learning_rate_for_group(self, learning_rate: optax.ScalarOrSchedule,
                              group: int) -> optax.ScalarOrSchedule:
    """The schedule of group `group`'s own update count `c`."""
    if not callable(learning_rate):
      return learning_rate
    if self.lr_mode == "per_cycle":
      return learning_rate
    k = self.num_groups
    return lambda c: learning_rate(c * k + group)


@dataclasses.dataclass(frozen=True)
class GroupPartition:
  """Static split of a parameter tree into one group's leaves and the rest.

  `plan[i]` for flattened leaf `i`: None (frozen), True (whole leaf trains)
  or a tuple of layer indices (those rows of a stacked leaf train).
  """
  treedef: Any
  plan: tuple

  def split(self, params: Any) -> tuple[Any, Any]:
    """`(active, frozen)`; active stacked leaves hold only their layers."""
    active, frozen = [], []
    for leaf, p in zip(self.treedef.flatten_up_to(params), self.plan):
      if p is None:
        active.append(None)
        frozen.append(leaf)
      elif p is True:
        active.append(leaf)
        frozen.append(None)
      else:
        active.append(leaf[np.asarray(p)])
        frozen.append(leaf)
    return self.treedef.unflatten(active), self.treedef.unflatten(frozen)

  def merge(self, active: Any, frozen: Any) -> Any:
    out = []
    for a, f, p in zip(self.treedef.flatten_up_to(active),
                       self.treedef.flatten_up_to(frozen), self.plan):
      out.append(f if p is None else a if p is True
                 else f.at[np.asarray(p)].set(a.astype(f.dtype)))
    return self.treedef.unflatten(out)


def partition(params: Any, schedule: HiFTSchedule, group: int,
              trainable: Any = None) -> GroupPartition:
  """The partition for group `group` of `schedule.groups`.

  Args:
    params: the parameter tree (arrays or `jax.ShapeDtypeStruct`s).
    schedule: the HiFT schedule.
    group: group index.
    trainable: optional boolean mask (e.g. `peqa.peqa_mask`); leaves outside
      it never train. Integer leaves never train.
  """
  units = set(schedule.groups[group])
  labels = jax.tree.leaves(masks.mask_from_rules(params, schedule.rules,
                                                 allow_unmatched=True))
  leaves, treedef = jax.tree.flatten(params)
  allowed = ([True] * len(leaves) if trainable is None
             else treedef.flatten_up_to(trainable))
  plan = []
  for leaf, kind, ok in zip(leaves, labels, allowed):
    if not ok or not masks.is_float_leaf(leaf):
      plan.append(None)
    elif kind == schedule.stacked:
      rows = tuple(i for i in range(np.shape(leaf)[0])
                   if f"{kind}/{i}" in units)
      plan.append(rows or None)
    else:
      plan.append(True if kind in units else None)
  return GroupPartition(treedef, tuple(plan))


class HiFTState(NamedTuple):
  """Per-group optax states; numpy (host memory) for every group at rest."""
  group_states: tuple


@dataclasses.dataclass(frozen=True)
class HiFT:
  """Any optax optimizer applied HiFT-style, one group per step.

  Attributes:
    schedule: the unit/group schedule.
    tx_factory: `learning_rate -> optax.GradientTransformation`, e.g.
      `lambda lr: lion_int8(lr, weight_decay=0.1)`; called once per group
      with that group's schedule.
    learning_rate: float or optax schedule (see `lr_mode`).
    trainable: optional boolean mask restricting what trains at all.

  Example:
    >>> sched = HiFTSchedule(hift_units(params), group_size=2)
    >>> hift = HiFT(sched, lambda lr: optax.adamw(lr), 1e-4)
    >>> state, step = hift.init(params), hift.make_step(loss_fn)
    >>> params, state, loss = step(params, state, t, batch)
  """
  schedule: HiFTSchedule
  tx_factory: Callable[[optax.ScalarOrSchedule], optax.GradientTransformation]
  learning_rate: optax.ScalarOrSchedule
  trainable: Any = None

  def group_tx(self, group: int) -> optax.GradientTransformation:
    return self.tx_factory(
        self.schedule.learning_rate_for_group(self.learning_rate, group))

  def partition(self, params: Any, group: int) -> GroupPartition:
    return partition(params, self.schedule, group, self.trainable)

  def init(self, params: Any) -> HiFTState:
    states = []
    for g in range(self.schedule.num_groups):
      active, _ = self.partition(params, g).split(params)
      states.append(jax.device_get(jax.jit(self.group_tx(g).init)(active)))
    return HiFTState(tuple(states))

  def make_step(self, loss_fn: Callable[..., jax.Array]) -> Callable:
    """`step(params, state, t, *batch) -> (params, state, loss)`.

    `loss_fn(params, *batch)` is a scalar. Step `t` moves group
    `schedule.group(t)`'s optimizer state to the device, differentiates the
    loss with respect to that group's leaves only, updates them, and moves the
    state back to host memory. Groups made only of decoder layers share one
    jitted function per group size (the layer indices and the group index are
    arguments), so an L-layer model compiles about three functions, not
    L + 3; other groups compile their own on first use. `step.compiled`
    holds the jitted functions by key.
    """
    compiled = {}

    def group_step(group, part, params, opt_state, *batch):
      active, frozen = part.split(params)
      loss, grads = jax.value_and_grad(
          lambda a: loss_fn(part.merge(a, frozen), *batch))(active)
      updates, opt_state = self.group_tx(group).update(grads, opt_state,
                                                       active)
      active = optax.apply_updates(active, updates)
      return part.merge(active, frozen), opt_state, loss

    def rows_step(stacked, group, rows, params, opt_state, *batch):
      """`group_step` for a group of layers `rows (m,)` (both traced)."""
      leaves, treedef = jax.tree.flatten(params)
      active = treedef.unflatten([leaf[rows] if on else None
                                  for leaf, on in zip(leaves, stacked)])

      def merge(a):
        return treedef.unflatten([
            f.at[rows].set(x.astype(f.dtype)) if on else f
            for f, x, on in zip(leaves, treedef.flatten_up_to(a), stacked)])

      loss, grads = jax.value_and_grad(lambda a: loss_fn(merge(a),
                                                         *batch))(active)
      updates, opt_state = self.group_tx(group).update(grads, opt_state,
                                                       active)
      return merge(optax.apply_updates(active, updates)), opt_state, loss

    def step(params, state: HiFTState, t: int, *batch):
      g = self.schedule.group(int(t))
      part = self.partition(params, g)
      rows = _layer_rows(part)
      opt_state = jax.device_put(state.group_states[g])
      if rows is not None:
        stacked = tuple(p is not None for p in part.plan)
        key = ("layers", len(rows), stacked)
        if key not in compiled:
          compiled[key] = jax.jit(
              lambda *a, stacked=stacked: rows_step(stacked, *a))
        params, opt_state, loss = compiled[key](
            np.int32(g), np.asarray(rows, np.int32), params, opt_state,
            *batch)
      else:
        if (g, part) not in compiled:
          compiled[(g, part)] = jax.jit(
              lambda *a, g=g, part=part: group_step(g, part, *a))
        params, opt_state, loss = compiled[(g, part)](params, opt_state,
                                                      *batch)
      states = list(state.group_states)
      states[g] = jax.device_get(opt_state)
      return params, HiFTState(tuple(states)), loss

    step.compiled = compiled
    return step


def _layer_rows(part: GroupPartition) -> tuple[int, ...] | None:
  """The layer indices when `part` trains the same rows of stacked leaves
  and nothing else, else None."""
  rows = {p for p in part.plan if p is not None}
  if len(rows) == 1 and all(p is None or isinstance(p, tuple)
                            for p in part.plan):
    return rows.pop()
  return None
