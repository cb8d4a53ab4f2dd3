"""SPMD sharding of quantized training: a mesh, path rules, placement.

Multi-device training uses JAX's own SPMD: a `Mesh` with three named axes,

    data    pure data parallelism (params replicated along it),
    fsdp    data parallelism with params / optimizer states sharded along it
            (ZeRO-3 / FSDP: XLA all-gathers a weight where it is used;
            quantized weights as their codes, see `gather_for_compute`),
    tensor  Megatron-style tensor parallelism (optional, size 1 by default),

`NamedSharding`s chosen per leaf by regex rules over the leaf's "/"-joined
path (`masks.path_str`; first match wins, every leaf covered), and
`jax.jit(step, in_shardings=..., out_shardings=...)` traced under
`compute_mesh(mesh)`. The batch is split over `("data", "fsdp")`; XLA
inserts every collective. Several hosts: call
`jax.distributed.initialize()` first; `make_mesh` then spans all processes'
devices, and `place` / `shard_batch` build global arrays from values every
process holds.

A rule's `Layout` names which dimension of a leaf is split over which mesh
axes, counted from the end, so one rule serves a stacked `(L, out, in)`
kernel, its optimizer moments and the same kernel unstacked. The defaults:

| leaf (path suffix)                        | split                         |
|-------------------------------------------|-------------------------------|
| QArray `kernel/{qvalue,scale,zero_point}` | N (dim -2), tensor x fsdp     |
| QFT `kernel/dense/{qvalue,scale}`         | N (dim -2), tensor x fsdp     |
| double quant `kernel/scale/{qvalue,...}`  | blocks (dim -2), tensor x fsdp|
| float q/k/v/gate/up kernel `(L, out, in)` | out, tensor x fsdp            |
| float o/down kernel `(L, out, in)`        | out over fsdp, in over tensor |
| QFT `outlier_{index,value}` `(L, n)`      | n, fsdp                       |
| `lora_a (L, r, in)`, `lora_b (L, out, r)` | none (or in / out, fsdp)      |
| embedding, lm_head `(V, D)`               | largest divisible dim, t x f  |
| lion_int8 `mu_scale (..., blocks)`        | blocks, fsdp                  |
| norms, biases, counters, keys, scalars    | none                          |
| anything else                             | largest divisible dim, fsdp   |

A QArray's codes, scales and zero points are all split along N, so each
device holds whole rows: a row's codes and its scales live together and
dequantization is local. The packed in-axis of a QArray is never split (a
packed column holds codes of several input columns, see `qarray`), so for
quantized row-parallel kernels the tensor axis joins fsdp on N. Optimizer
moments mirror the trainable view's paths (`opt_state/0/mu/layers/...`), so
the same rules (written `(^|/)...`, not anchored at `^`) place them like
their parameters; a QFT weight's int8 momentum `(L, N, K)` shards like its
codes. lion_int8's block scales flatten a whole leaf: for the layer-streamed
step's per-layer states `(L, blocks)` a block split is a row split, for a
stacked `(L, N, K)` leaf in the ordinary step it is not row-aligned and XLA
moves scales in the update. A dimension that the chosen axes do not divide
keeps the largest subset of them that does (else stays whole), and each such
fallback is logged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qft_jax._src.optim import masks

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one leaf is split over the mesh.

  Attributes:
    dims: `((dim, axes), ...)`: dimension `dim` (negative counts from the
      end) is split over the mesh axes `axes` (major to minor).
    auto: if not empty, instead split the largest dimension whose size the
      product of these axes divides (the earliest on ties).
  """
  dims: tuple[tuple[int, tuple[str, ...]], ...] = ()
  auto: tuple[str, ...] = ()

  def __post_init__(self):
    for _, axes in self.dims:
      _check_axes(axes)
    _check_axes(self.auto)
    if self.dims and self.auto:
      raise ValueError("a Layout takes either dims or auto, not both")


def _check_axes(axes: Sequence[str]) -> None:
  if isinstance(axes, str):
    raise ValueError(f"mesh axes must be a tuple of names, got {axes!r}")
  unknown = [a for a in axes if a not in AXES]
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}: choose from {AXES}")


def split(dim: int, *axes: str) -> Layout:
  """`Layout` splitting dimension `dim` over `axes`."""
  return Layout(dims=((dim, tuple(axes)),))


REPLICATED = Layout()
AUTO = Layout(auto=("fsdp",))

# Not anchored at `layers/`: the streamed step's per-layer optimizer states
# (`layers/<field>/attn/q_proj/kernel`) and unstacked layers match too.
_COLUMN = r"(^|/)(attn/(q|k|v)|mlp/(gate|up))_proj/kernel$"
_ROW = r"(^|/)(attn/o|mlp/down)_proj/kernel$"

Rules = Sequence[tuple[str, Layout]]


def default_rules(*, lora: str = "replicate",
                  outliers: str = "fsdp") -> tuple[tuple[str, Layout], ...]:
  """The rules in the module docstring's table.

  Args:
    lora: "replicate" (LoRA factors and their moments on every device) or
      "fsdp" (`lora_a` split along `in`, `lora_b` along `out`); at 4+
      devices replicated LoRA state can outweigh a 4-bit base's shard.
    outliers: "fsdp" (QFT's float outlier lists split over fsdp) or
      "replicate".

  Returns:
    `(regex, Layout)` pairs for `param_shardings` / `state_shardings`;
    prepend your own rules to override (first match wins).
  """
  if lora not in ("replicate", "fsdp"):
    raise ValueError(f"lora must be 'replicate' or 'fsdp', got {lora!r}")
  if outliers not in ("replicate", "fsdp"):
    raise ValueError(f"outliers must be 'replicate' or 'fsdp', got "
                     f"{outliers!r}")
  rows = ("tensor", "fsdp")
  return (
      (r"(^|/)(step|count|rng|key|skipped|mini_step|gradient_step)$",
       REPLICATED),
      (r"(^|/)mu_scale(/|$)", split(-1, "fsdp")),
      (r"/kernel/outlier_(index|value)$",
       split(-1, "fsdp") if outliers == "fsdp" else REPLICATED),
      (r"/kernel/scale/(qvalue|scale|zero_point)$", split(-2, *rows)),
      (r"/kernel/(dense/)?(qvalue|scale|zero_point)$", split(-2, *rows)),
      (r"(^|/)lora_a$", split(-1, "fsdp") if lora == "fsdp" else REPLICATED),
      (r"(^|/)lora_b$", split(-2, "fsdp") if lora == "fsdp" else REPLICATED),
      (_COLUMN, split(-2, *rows)),
      (_ROW, Layout(dims=((-2, ("fsdp",)), (-1, ("tensor",))))),
      (r"(^|/)(embed/embedding|lm_head/kernel)$", Layout(auto=rows)),
      (r"(^|/)(\w*norm/scale|bias)$", REPLICATED),
      (r".*", AUTO),
  )


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
  """Axis sizes from `"fsdp:4"` / `"data:2,fsdp:-1,tensor:1"`.

  Missing axes have size 1; one axis may be -1 (the remaining devices); an
  empty spec puts every device on fsdp. The sizes must multiply to
  `num_devices`.
  """
  sizes = {a: 1 for a in AXES}
  if not spec.strip():
    sizes["fsdp"] = num_devices
    return sizes
  seen, wild = set(), None
  for part in spec.split(","):
    name, sep, value = part.strip().partition(":")
    name = name.strip()
    if not sep or name not in AXES or name in seen:
      raise ValueError(f"bad mesh spec {spec!r}: expected comma-separated "
                       f"axis:size with distinct axes from {AXES}, e.g. "
                       "'data:2,fsdp:4'")
    seen.add(name)
    try:
      size = int(value)
    except ValueError:
      raise ValueError(f"bad mesh spec {spec!r}: size of {name!r} is not "
                       f"an integer") from None
    if size == -1 and wild is None:
      wild = name
    elif size < 1:
      raise ValueError(f"bad mesh spec {spec!r}: sizes must be positive "
                       "(or one -1 for the remaining devices)")
    sizes[name] = size
  if wild is not None:
    rest = math.prod(s for a, s in sizes.items() if a != wild)
    if num_devices % rest:
      raise ValueError(f"mesh spec {spec!r}: {num_devices} devices are not "
                       f"a multiple of {rest}")
    sizes[wild] = num_devices // rest
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh spec {spec!r} has {math.prod(sizes.values())} "
                     f"devices but {num_devices} are available")
  return sizes


def make_mesh(spec: str = "", devices: Sequence[Any] | None = None
              ) -> jax.sharding.Mesh:
  """A `("data", "fsdp", "tensor")` mesh from a spec string.

  Args:
    spec: e.g. `"fsdp:8"`, `"data:2,fsdp:4"`, `"data:2,fsdp:2,tensor:2"`;
      empty: every device on fsdp (one device: a 1x1x1 mesh).
    devices: devices to use (default: all devices of all processes).

  Returns:
    A `Mesh` with Auto axis types (GSPMD propagates shardings).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


def mesh_sizes(mesh: Any) -> dict[str, int]:
  """`{axis: size}` of a Mesh / AbstractMesh (absent axes count as 1)."""
  sizes = {a: 1 for a in AXES}
  sizes.update(dict(mesh.shape))
  return sizes


def resolve(shape: Sequence[int], layout: Layout,
            sizes: Mapping[str, int]) -> tuple[P, str]:
  """The `PartitionSpec` of a leaf of `shape`, and a fallback note ("" if none).

  Axes of size 1 are left out of the spec. A split dimension not divisible
  by its axes' product keeps the subset of them with the largest product
  that divides it (none: the dimension stays whole).
  """
  ndim = len(shape)
  entries: list[tuple[str, ...]] = [()] * ndim
  notes = []
  size_of = lambda axes: math.prod(sizes.get(a, 1) for a in axes)
  live = lambda axes: tuple(a for a in axes if sizes.get(a, 1) > 1)
  if layout.auto:
    axes = live(layout.auto)
    if axes and ndim:
      order = sorted(range(ndim), key=lambda d: -shape[d])
      pick = next((d for d in order if shape[d] % size_of(axes) == 0), None)
      if pick is None:
        notes.append(f"no dimension of {tuple(shape)} divisible by "
                     f"{size_of(axes)} ({'x'.join(axes)}): replicated")
      else:
        entries[pick] = axes
  for dim, axes in layout.dims:
    axes = live(axes)
    if not axes:
      continue
    if not -ndim <= dim < ndim:
      notes.append(f"rank {ndim} has no dimension {dim}: replicated")
      continue
    d = dim % ndim
    used = tuple(a for e in entries for a in e)
    axes = tuple(a for a in axes if a not in used)
    kept = _largest_dividing(axes, shape[d], sizes)
    if kept != axes:
      notes.append(f"dim {d} of size {shape[d]} not divisible by "
                   f"{size_of(axes)} ({'x'.join(axes)}): "
                   + (f"split over {'x'.join(kept)} only" if kept
                      else "not split"))
    entries[d] = kept
  spec = P(*[(e[0] if len(e) == 1 else e) if e else None for e in entries])
  return spec, "; ".join(notes)


def _largest_dividing(axes: tuple[str, ...], n: int,
                      sizes: Mapping[str, int]) -> tuple[str, ...]:
  """The order-preserving subset of `axes` with the largest product that
  divides `n` (earlier axes win ties); `()` if none does."""
  best, best_size = (), 1
  k = len(axes)
  for mask in range(2**k - 1, 0, -1):
    sub = tuple(a for i, a in enumerate(axes) if mask >> (k - 1 - i) & 1)
    size = math.prod(sizes.get(a, 1) for a in sub)
    if n % size == 0 and size > best_size:
      best, best_size = sub, size
  return best


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x))


def partition_specs(tree: Any, sizes: Mapping[str, int],
                    rules: Rules | None = None, *, log: bool = True) -> Any:
  """`PartitionSpec` per leaf of `tree` (arrays or ShapeDtypeStructs).

  Args:
    tree: params, optimizer state or a whole `TrainState`.
    sizes: mesh axis sizes, e.g. `mesh_sizes(mesh)` or `{"fsdp": 8}`.
    rules: `(regex, Layout)`, first match wins (default `default_rules()`);
      every leaf must match one (end with a `".*"` rule).
    log: log each leaf whose layout fell back (not divisible).

  Returns:
    A pytree of `PartitionSpec` with the structure of `tree`.
  """
  rules = default_rules() if rules is None else tuple(rules)
  for _, layout in rules:
    if not isinstance(layout, Layout):
      raise ValueError(f"sharding rules map regexes to Layouts, got "
                       f"{layout!r}")
  sizes = {a: 1 for a in AXES} | dict(sizes)
  labels = masks.mask_from_rules(tree, rules, allow_unmatched=True)

  def one(keypath, layout, leaf):
    spec, note = resolve(_shape(leaf), layout, sizes)
    if note and log:
      logging.warning("sharding %s %s: %s", masks.path_str(keypath),
                      _shape(leaf), note)
    return spec

  return jax.tree_util.tree_map_with_path(one, labels, tree)


def param_shardings(params: Any, mesh: jax.sharding.Mesh,
                    rules: Rules | None = None) -> Any:
  """`NamedSharding` per leaf of `params` (QArray fields included).

  Example:
    >>> mesh = make_mesh("data:2,fsdp:4")
    >>> params = place(params, param_shardings(params, mesh))
  """
  specs = partition_specs(params, mesh_sizes(mesh), rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def state_shardings(state: Any, mesh: jax.sharding.Mesh,
                    rules: Rules | None = None) -> Any:
  """`NamedSharding` per leaf of a `TrainState` (params and optimizer state).

  Optimizer moments sit at paths ending in their parameter's path (optax
  states mirror the trainable view), so the parameter rules place them;
  lion_int8's block scales are split along their block axis; step
  counters and PRNG keys are replicated.
  """
  return param_shardings(state, mesh, rules)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension over `("data", "fsdp")`, the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def train_step_shardings(state: Any, mesh: jax.sharding.Mesh,
                         rules: Rules | None = None
                         ) -> tuple[Any, NamedSharding]:
  """`(state_shardings, batch_sharding)` for `train.make_train_step`.

  `state` may be abstract (`jax.eval_shape(init, params)`).
  """
  return state_shardings(state, mesh, rules), batch_sharding(mesh)


def _place_leaf(x: Any, sharding: NamedSharding) -> jax.Array:
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  # Multi-process: every process holds the same global value.
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda idx: host[idx])


def place(tree: Any, shardings: Any) -> Any:
  """Puts `tree` (host or single-device values) onto `shardings`.

  With several processes every process must pass the same global values
  (e.g. the same checkpoint); each keeps only its devices' shards.
  """
  return jax.tree.map(_place_leaf, tree, shardings)


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Splits every leaf of `batch` along its leading dimension over
  `("data", "fsdp")`.

  Every process passes the same global batch (`TokenDataset.batch` is a
  pure function of the step), so no data is exchanged.

  Raises:
    ValueError: the batch size is not a multiple of `data * fsdp`.
  """
  sharding = batch_sharding(mesh)
  ways = math.prod(mesh_sizes(mesh)[a] for a in BATCH_AXES)
  for x in jax.tree.leaves(batch):
    if not np.ndim(x) or np.shape(x)[0] % ways:
      raise ValueError(f"batch leaf of shape {np.shape(x)} cannot be split "
                       f"{ways} ways over {BATCH_AXES}: make the batch size "
                       f"a multiple of data * fsdp = {ways}")
  return jax.tree.map(lambda x: _place_leaf(x, sharding), batch)


def abstract(tree: Any, shardings: Any | None = None) -> Any:
  """`ShapeDtypeStruct`s carrying shardings (for orbax restore on a mesh).

  Args:
    tree: arrays or ShapeDtypeStructs.
    shardings: the target shardings (default: each array's own sharding).
      Restoring with another mesh's shardings reshards the checkpoint.
  """
  def one(x, s=None):
    s = getattr(x, "sharding", None) if shardings is None else s
    return jax.ShapeDtypeStruct(_shape(x), x.dtype, sharding=s)

  if shardings is None:
    return jax.tree.map(one, tree)
  return jax.tree.map(one, tree, shardings)


def describe(tree: Any, mesh: jax.sharding.Mesh,
             rules: Rules | None = None) -> list[str]:
  """One line per leaf: path, shape, PartitionSpec (for logs and reports)."""
  specs = partition_specs(tree, mesh_sizes(mesh), rules, log=False)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  return [f"{masks.path_str(k)} {_shape(x)} {s}"
          for (k, x), s in zip(flat, spec_leaves)]


def compute_mesh(mesh: jax.sharding.Mesh):
  """Context for tracing a step that runs on `mesh` (usable inside jit).

  Sets JAX's abstract mesh, which `gather_for_compute` reads: quantized
  weights are then all-gathered in their stored dtypes before being
  dequantized. `train.make_train_step(..., shardings=...)` traces under it;
  wrap the first call of other sharded steps (streamed, HiFT) in it.
  """
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def compute_mesh_size() -> int:
  """Devices of the mesh the computation is traced under (1 outside one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh is None or mesh.empty else math.prod(mesh.shape.values())


def gather_for_compute(tree: Any) -> Any:
  """FSDP's all-gather of a weight for its use, in the stored dtype.

  Left alone, XLA dequantizes each device's rows and all-gathers the float
  weight (2 bytes a weight in bf16); constraining the QArray leaves (codes,
  scales, zero points, QFT outliers) to be whole first gathers 0.5 bytes a
  weight at 4 bits, 0.375 at 3. Rows split over `tensor` stay split.
  Outside `compute_mesh` (or on a mesh without an fsdp axis) it returns
  `tree` unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or dict(mesh.shape).get("fsdp", 1) == 1:
    return tree
  tensor = dict(mesh.shape).get("tensor", 1)

  def whole(x):
    spec = [None] * x.ndim
    if tensor > 1 and x.ndim >= 2 and x.shape[-2] % tensor == 0:
      spec[-2] = "tensor"
    return jax.lax.with_sharding_constraint(x, P(*spec))

  return jax.tree.map(whole, tree)


def per_device_bytes(tree: Any) -> dict[str, int]:
  """Bytes of `tree`'s shards held by each addressable device."""
  out: dict[str, int] = {}
  for x in jax.tree.leaves(tree):
    for shard in getattr(x, "addressable_shards", ()):
      key = str(shard.device)
      out[key] = out.get(key, 0) + shard.data.size * shard.data.dtype.itemsize
  return out
