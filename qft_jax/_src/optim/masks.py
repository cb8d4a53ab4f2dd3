"""Static parameter masks from path rules, and the trainable / frozen split.

A parameter's path is its "/"-joined pytree key path, e.g.
`model/layers/attn/q_proj/kernel`; a `QArray` kernel contributes its fields,
e.g. `.../q_proj/kernel/scale` and `.../q_proj/kernel/qvalue`.

Rules are `(regex, label)` pairs tried in order with `re.search` (anchor with
`^` / `$` when needed); the first rule that matches a path labels that leaf.
Every leaf must be covered, and a rule that labels nothing is reported as an
error, so a typo in a rule cannot silently train (or freeze) the wrong thing.

`split` / `combine` separate trainable float leaves from everything frozen
before differentiation: both halves keep the full tree structure with `None`
where a leaf belongs to the other half (`None` is an empty pytree, so
`jax.grad`, `optax` and `jax.tree.map` skip it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Rules = Sequence[tuple[str, Any]]


def path_str(keypath: Sequence[Any]) -> str:
  """`("model", "layers", "attn", ...)` key path -> `"model/layers/attn/..."`.

  Accepts the key entries of `jax.tree_util.tree_flatten_with_path`
  (`DictKey`, `GetAttrKey`, `SequenceKey`, `FlattenedIndexKey`) or plain
  strings / ints.
  """
  parts = []
  for k in keypath:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        k = getattr(k, attr)
        break
    parts.append(str(k))
  return "/".join(parts)


def leaf_paths(params: Any) -> list[str]:
  """The "/"-joined path of every leaf of `params`, in flattening order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def mask_from_rules(params: Any, rules: Rules, *, default: Any = None,
                    allow_unmatched: bool = False) -> Any:
  """Labels every leaf of `params` by the first rule whose regex it matches.

  Args:
    params: a pytree (QArray leaves are labelled field by field).
    rules: `(regex, label)` pairs, first match wins.
    default: label of leaves no rule matches; None means every leaf must
      match some rule.
    allow_unmatched: accept rules that match no leaf (otherwise an error).

  Returns:
    A pytree with the structure of `params` whose leaves are labels.

  Raises:
    ValueError: a leaf matched no rule (and `default` is None), a rule matched
      no leaf, or a regex does not compile.
  """
  compiled = []
  for pattern, label in rules:
    try:
      compiled.append((re.compile(pattern), label))
    except re.error as e:
      raise ValueError(f"invalid regex {pattern!r} in mask rules: {e}") from e
  used = [False] * len(compiled)
  uncovered = []

  def label_of(keypath, _):
    path = path_str(keypath)
    for i, (regex, label) in enumerate(compiled):
      if regex.search(path):
        used[i] = True
        return label
    if default is None:
      uncovered.append(path)
    return default

  mask = jax.tree_util.tree_map_with_path(label_of, params)
  if uncovered:
    raise ValueError(
        f"{len(uncovered)} parameter(s) matched no mask rule and no default "
        f"was given, e.g. {uncovered[:5]}; rules: {[r for r, _ in rules]}")
  unused = [rules[i][0] for i, u in enumerate(used) if not u]
  if unused and not allow_unmatched:
    raise ValueError(f"mask rules matched no parameter: {unused}; "
                     f"parameter paths include {leaf_paths(params)[:8]}")
  return mask


def leaf_dtype(x: Any):
  """dtype of an array, `jax.ShapeDtypeStruct` or Python scalar leaf."""
  return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def is_float_leaf(x: Any) -> bool:
  return jnp.issubdtype(leaf_dtype(x), jnp.inexact)


def trainable_mask(params: Any, rules: Rules, *, default: bool | None = False,
                   allow_unmatched: bool = False) -> Any:
  """Boolean mask from `(regex, bool)` rules; integer leaves always False.

  Integer leaves (QArray codes and zero points) cannot take gradients, so a
  rule like `(".*", True)` (full fine-tuning) marks every float leaf and
  leaves integer leaves frozen.

  Example:
    >>> mask = trainable_mask(params, [(r"/scale$", True)], default=False)
  """
  labels = mask_from_rules(params, rules, default=default,
                           allow_unmatched=allow_unmatched)
  return jax.tree.map(lambda lab, x: bool(lab) and is_float_leaf(x),
                      labels, params)


def split(params: Any, mask: Any) -> tuple[Any, Any]:
  """Splits `params` into `(trainable, frozen)` by a boolean `mask`.

  Both results have the structure of `params`, with `None` in place of the
  leaves that belong to the other half.

  Raises:
    ValueError: the mask marks an integer leaf trainable.
  """
  def check(keypath, m, x):
    if m and not is_float_leaf(x):
      raise ValueError(f"{path_str(keypath)} has integer dtype "
                       f"{leaf_dtype(x)} and cannot be trainable")
  jax.tree_util.tree_map_with_path(check, mask, params)
  trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
  frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
  return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
  """Inverse of `split`: takes each leaf from whichever half holds it."""
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                      is_leaf=lambda x: x is None)
