"""The black-box quantizer protocol (ModuLoRA) and the RTN quantizer.

A quantizer is anything that maps one float linear weight `W` `(out, in)`,
plus optional calibration statistics of that layer's inputs, to a `QArray`:

    q = quantizer(w, stats)          # stats: LayerStats or None

Nothing downstream (the loader, `qdot`, LoRA training) knows which quantizer
produced `q`: a QArray is a QArray. Quantizers that need calibration set
`needs_calibration = True` and read `stats.hessian`, the second moment

    H = 2 X^T X / n          X: (n, in), the n calibration inputs of the layer

(the Hessian of the layer-wise objective `||X (W_hat - W)^T||^2 / n`, as in
GPTQ). `stats.cross = 2 X_fp^T X / n` optionally pairs the inputs `X` of the
quantized model with the inputs `X_fp` of the float model (ApiQ's layer-wise
objective); without it the two coincide.

`as_quantize_fn` turns a quantizer into the model loader's hook
`quantize_fn(path, w)`; `save_params` / `load_params` store a quantized
parameter tree (npz of leaves + JSON of the QArray static fields).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from qft_jax._src import qarray as qa


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Calibration statistics of one linear layer's inputs.

  Attributes:
    hessian: float32 `(in, in)`, `2 X^T X / n` over the n calibration inputs
      `X` of the layer (in the quantized model when calibrating sequentially).
    cross: None, or float32 `(in, in)`, `2 X_fp^T X / n` with `X_fp` the same
      tokens' inputs in the float model (row i of both is the same token).
    num_tokens: n (static).
  """
  hessian: jax.Array
  cross: jax.Array | None = None
  num_tokens: int = dataclasses.field(default=0, metadata=dict(static=True))


def layer_stats(x: jax.Array, x_fp: jax.Array | None = None) -> LayerStats:
  """`LayerStats` of inputs `x` `(..., in)` (float32 accumulation).

  Args:
    x: the layer's inputs, any leading axes (tokens are rows after reshape).
    x_fp: optional float-model inputs of the same tokens, same shape.
  """
  k = x.shape[-1]
  x2 = x.reshape(-1, k).astype(jnp.float32)
  n = x2.shape[0]
  if n == 0:
    raise ValueError("layer_stats needs at least one input row")
  dot = lambda a, b: jnp.dot(a.T, b, precision=jax.lax.Precision.HIGHEST)
  cross = None
  if x_fp is not None:
    if x_fp.shape != x.shape:
      raise ValueError(f"x_fp has shape {x_fp.shape}, expected {x.shape}")
    cross = 2.0 * dot(x_fp.reshape(-1, k).astype(jnp.float32), x2) / n
  return LayerStats(hessian=2.0 * dot(x2, x2) / n, cross=cross, num_tokens=n)


@runtime_checkable
class Quantizer(Protocol):
  """Maps a float weight `(out, in)` (+ optional stats) to a `QArray`.

  Attributes:
    needs_calibration: `__call__` requires `stats` (a `LayerStats`).
  """
  needs_calibration: bool

  def __call__(self, w: jax.Array, stats: LayerStats | None = None
               ) -> qa.QArray:
    ...


def check_call(quantizer: Any, w: Any, stats: LayerStats | None) -> None:
  """Raises ValueError for a weight or stats a quantizer cannot take."""
  if np.ndim(w) != 2:
    raise ValueError(f"a quantizer takes one matrix (out, in); got shape "
                     f"{np.shape(w)} (quantize stacked layers one at a time)")
  if getattr(quantizer, "needs_calibration", False):
    if stats is None:
      raise ValueError(f"{type(quantizer).__name__} needs calibration "
                       "statistics (LayerStats) for every layer")
    k = np.shape(w)[1]
    if np.shape(stats.hessian) != (k, k):
      raise ValueError(f"hessian is {np.shape(stats.hessian)} but the weight "
                       f"has {k} input columns (expected ({k}, {k}))")
    if stats.cross is not None and np.shape(stats.cross) != (k, k):
      raise ValueError(f"cross moments are {np.shape(stats.cross)}, "
                       f"expected ({k}, {k})")


@dataclasses.dataclass(frozen=True)
class RTN:
  """Round-to-nearest (`qarray.quantize`) as a `Quantizer`.

  Attributes:
    config: bits, group size, symmetric / asymmetric, codebook.
  """
  config: qa.QuantConfig = qa.QuantConfig()
  needs_calibration: bool = dataclasses.field(default=False, init=False)

  def __call__(self, w, stats=None):
    check_call(self, w, stats)
    return qa.quantize(jnp.asarray(w), self.config)


QuantizeFn = Callable[[str, np.ndarray], Any]


def as_quantize_fn(quantizer: Quantizer,
                   stats: Mapping[str, LayerStats] | None = None,
                   skip: Callable[[str], bool] | None = None) -> QuantizeFn:
  """The loader hook `quantize_fn(path, w) -> QArray | w` for a quantizer.

  Args:
    quantizer: any `Quantizer`.
    stats: per-path statistics (required when the quantizer needs them);
      looked up by the exact path the loader passes.
    skip: optional predicate; paths it accepts are returned unchanged.

  Returns:
    A function mapping a float `(out, in)` weight to a `QArray` (or to itself
    for skipped paths). Quantization runs on the default device; the result
    keeps the weight's dtype as its dequantization dtype.
  """
  if not isinstance(quantizer, Quantizer):
    raise ValueError(f"{quantizer!r} does not implement the Quantizer "
                     "protocol (a callable with `needs_calibration`)")
  if quantizer.needs_calibration and stats is None:
    raise ValueError(f"{type(quantizer).__name__} needs calibration "
                     "statistics: pass stats={path: LayerStats}")

  def quantize_fn(path: str, w):
    if skip is not None and skip(path):
      return w
    layer_stats_ = None
    if quantizer.needs_calibration:
      if path not in stats:
        raise ValueError(f"no calibration statistics for {path!r}")
      layer_stats_ = stats[path]
    return quantizer(jnp.asarray(w), layer_stats_)

  return quantize_fn


def proxy_loss(w: jax.Array, w_hat: jax.Array, hessian: jax.Array
               ) -> jax.Array:
  """GPTQ's layer-wise objective `tr((W_hat - W) H (W_hat - W)^T)`.

  With `H = 2 X^T X / n` this is `(2 / n) ||X (W_hat - W)^T||_F^2`.
  """
  d = (jnp.asarray(w_hat, jnp.float32) - jnp.asarray(w, jnp.float32))
  hp = jax.lax.Precision.HIGHEST
  return jnp.sum(jnp.dot(d, hessian, precision=hp) * d)


# ------------------------------------------------ saving quantized trees ----


def _qarray_spec(q: qa.QArray, prefix: str, arrays: dict) -> dict:
  arrays[prefix + "/qvalue"] = np.asarray(q.qvalue)
  if q.zero_point is not None:
    arrays[prefix + "/zero_point"] = np.asarray(q.zero_point)
  if isinstance(q.scale, qa.QArray):
    scale = _qarray_spec(q.scale, prefix + "/scale", arrays)
  else:
    arrays[prefix + "/scale"] = np.asarray(q.scale)
    scale = "array"
  return {"kind": "qarray", "bits": q.bits, "group_size": q.group_size,
          "shape": list(q.shape), "dtype": jnp.dtype(q.dtype).name,
          "codebook": q.codebook, "scale": scale,
          "zero_point": q.zero_point is not None}


def _qarray_from_spec(spec: dict, prefix: str, arrays: dict) -> qa.QArray:
  scale = (arrays[prefix + "/scale"] if spec["scale"] == "array"
           else _qarray_from_spec(spec["scale"], prefix + "/scale", arrays))
  return qa.QArray(
      qvalue=arrays[prefix + "/qvalue"], scale=scale,
      zero_point=arrays[prefix + "/zero_point"] if spec["zero_point"]
      else None,
      bits=spec["bits"], group_size=spec["group_size"],
      shape=tuple(spec["shape"]), dtype=jnp.dtype(spec["dtype"]),
      codebook=spec["codebook"])


def _encode(a: np.ndarray) -> tuple[np.ndarray, str]:
  """npz cannot hold bfloat16: store it as uint16 bits."""
  name = jnp.dtype(a.dtype).name
  if name == "bfloat16":
    return a.view(np.uint16), name
  return a, name


def save_params(path, params: dict, meta: dict | None = None) -> None:
  """Writes a param tree with QArray leaves to `path/params.npz` + JSON.

  The JSON (`path/spec.json`) records every leaf's path, the static fields of
  each QArray (nested double-quantized scales included) and `meta`.

  Raises:
    ValueError: a float leaf (weights, scales, LoRA) holds NaN or inf.
  """
  out = pathlib.Path(path)
  out.mkdir(parents=True, exist_ok=True)
  arrays, leaves = {}, {}
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=qa.is_qarray)[0]
  for key_path, leaf in flat:
    name = "/".join(str(getattr(k, "key", k)) for k in key_path)
    if isinstance(leaf, qa.QArray):
      leaves[name] = _qarray_spec(jax.device_get(leaf), name, arrays)
    else:
      arrays[name] = np.asarray(leaf)
      leaves[name] = {"kind": "array"}
  dtypes = {}
  for name in list(arrays):
    a = arrays[name]
    if np.issubdtype(a.dtype, np.inexact) and not np.all(
        np.isfinite(a.astype(np.float32))):
      raise ValueError(f"refusing to save non-finite values in {name}")
    arrays[name], dtypes[name] = _encode(a)
  np.savez(out / "params.npz", **arrays)
  (out / "spec.json").write_text(json.dumps(
      {"leaves": leaves, "dtypes": dtypes, "meta": meta or {}}, indent=1))


def load_params(path) -> tuple[dict, dict]:
  """Inverse of `save_params`: `(params with QArrays (host), meta)`."""
  src = pathlib.Path(path)
  if not (src / "spec.json").exists():
    raise ValueError(f"{src} has no spec.json (not a saved param tree)")
  spec = json.loads((src / "spec.json").read_text())
  with np.load(src / "params.npz") as data:
    arrays = {}
    for name in data.files:
      a = data[name]
      if spec["dtypes"][name] == "bfloat16":
        a = a.view(jnp.bfloat16)
      arrays[name] = a
  tree = {}
  for name, leaf in spec["leaves"].items():
    value = (arrays[name] if leaf["kind"] == "array"
             else _qarray_from_spec(leaf, name, arrays))
    node = tree
    *parents, last = name.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = value
  return tree, spec["meta"]
