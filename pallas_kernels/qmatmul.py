"""Public entry points of the fused low-bit dequantize-matmul kernels.

    y  = x  @ dequantize(W)^T      fwd(x2d, w)     (M, K) -> (M, N)
    dx = dy @ dequantize(W)        dx(dy2d, w)     (M, N) -> (M, K)

computed straight from the packed codes of a `QArray` (2/3/4/8-bit uniform
codes with or without zero points, or NF4 codebook codes; any group size that
is a multiple of 16, or per-channel; float or double-quantized scales), bf16
or f16 activations, float32 accumulation. The weight is never written to
device memory in float.

`can_use` / `can_use_dx` say whether the kernels apply (backend, dtypes,
shapes) and why not; `qft_jax`'s `qdot` falls back to XLA when they refuse.
`reference` / `reference_dx` are the float32 ground truth.

Example:
  >>> ok, why = can_use(x2d, w)
  >>> y = fwd(x2d, w) if ok else reference(x2d, w).astype(x2d.dtype)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import qmatmul_dx
from pallas_kernels import qmatmul_fwd
from pallas_kernels import qmatmul_mgpu
from pallas_kernels import qmatmul_mgpu_dx
from pallas_kernels import tiles
from pallas_kernels import tuning as tuning_lib
from pallas_kernels.reference import reference, reference_dx
from pallas_kernels.tuning import TuningConfig
from qft_jax._src import qarray as qa

__all__ = ["can_use", "can_use_dx", "can_use_mosaic", "can_use_mosaic_dx",
           "fwd", "dx", "reference", "reference_dx", "TuningConfig"]

ACTIVATION_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_WORD_TILE = 16  # smallest contraction / output tile of the matrix units


def _backend_reason() -> str | None:
  """None when the default device is a CUDA GPU with bf16 matrix units."""
  if jax.default_backend() != "gpu":
    return (f"the default backend is {jax.default_backend()!r}, not 'gpu' "
            "(pass interpret=True to run the kernels in the interpreter)")
  device = jax.devices()[0]
  cc = getattr(device, "compute_capability", None)
  if cc is None:
    return f"device {device.device_kind!r} is not a CUDA GPU"
  if float(cc) < 8.0:
    return f"compute capability {cc} < 8.0 has no bf16 matrix instructions"
  return None


def _weight_reason(w) -> str | None:
  if not isinstance(w, qa.QArray):
    return f"the weight is a {type(w).__name__}, not a QArray"
  if w.batch_shape:
    return f"the QArray has batch axes {w.batch_shape}; slice it first"
  if w.bits not in qa.SUPPORTED_BITS:
    return f"{w.bits}-bit codes are not supported"
  if w.codebook is not None and w.codebook not in qa.CODEBOOKS:
    return f"unknown codebook {w.codebook!r}"
  if (not isinstance(w.scale, qa.QArray)
      and not jnp.issubdtype(w.scale.dtype, jnp.floating)):
    return ("scales must be float (or a double-quantized QArray), got "
            f"{w.scale.dtype}")
  if w.zero_point is not None and w.zero_point.dtype != jnp.uint8:
    return f"zero points must be uint8, got {w.zero_point.dtype}"
  layout = tiles.layout_of(w)
  if layout.n == 0 or layout.k == 0:
    return f"the weight {layout.n}x{layout.k} is empty"
  tile = tuning_lib.effective_block_k(1 << 30, layout.kw, layout.group)
  if tile < MIN_WORD_TILE:
    return (f"no word tile of >= {MIN_WORD_TILE} fits: K / codes_per_word = "
            f"{layout.kw} and group size {layout.group} must both be "
            f"multiples of {MIN_WORD_TILE}")
  return None


def _activation_reason(a, want_cols: int, name: str) -> str | None:
  if a.ndim != 2:
    return f"{name} must be 2-D, got shape {tuple(a.shape)}"
  if a.shape[1] != want_cols:
    return (f"{name} has {a.shape[1]} columns but the weight needs "
            f"{want_cols}")
  if a.shape[0] == 0:
    return f"{name} has no rows"
  if jnp.dtype(a.dtype) not in ACTIVATION_DTYPES:
    return (f"{name} dtype {a.dtype} is not bf16/f16 (float32 activations "
            "take the XLA path)")
  return None


def _gate(a, w, cols_of, name: str, interpret: bool) -> tuple[bool, str]:
  reason = _weight_reason(w)
  if reason is None:
    reason = _activation_reason(a, cols_of(w), name)
  if reason is None and not interpret:
    reason = _backend_reason()
  return (reason is None, reason or "ok")


def can_use(x2d, w, *, interpret: bool = False) -> tuple[bool, str]:
  """Whether `fwd(x2d, w)` can run, and if not, why (a sentence)."""
  return _gate(x2d, w, lambda q: q.shape[1], "x2d", interpret)


def can_use_dx(dy2d, w, *, interpret: bool = False) -> tuple[bool, str]:
  """Whether `dx(dy2d, w)` can run, and if not, why (a sentence)."""
  return _gate(dy2d, w, lambda q: q.shape[0], "dy2d", interpret)


def can_use_mosaic(x2d, w) -> tuple[bool, str]:
  """Whether `fwd` takes the Mosaic GPU kernel (4-bit uniform codes at
  training shapes on Hopper, `qmatmul_mgpu.can_use`), and if not, why."""
  return qmatmul_mgpu.can_use(x2d, w)


def can_use_mosaic_dx(dy2d, w) -> tuple[bool, str]:
  """Whether `dx` takes the Mosaic GPU kernel (`qmatmul_mgpu_dx.can_use`)."""
  return qmatmul_mgpu_dx.can_use(dy2d, w)


def fwd(x2d: jax.Array, w: qa.QArray, *, interpret: bool = False,
        tuning: TuningConfig | None = None,
        out_init: jax.Array | None = None) -> jax.Array:
  """`x2d (M, K) @ dequantize(w)^T -> (M, N)` in x2d.dtype.

  Args:
    x2d: bf16/f16 activations `(M, K)`.
    w: QArray of logical shape `(N, K)`, no batch axes.
    interpret: run in the Pallas interpreter (any backend).
    tuning: block sizes; None picks the Mosaic GPU kernel where
      `can_use_mosaic` passes, else `tuning.choose("fwd", M, N, K, bits)`.
    out_init: optional `(M, N)` buffer aliased to the output; every element
      is overwritten (tests pass NaNs to catch unwritten tiles). The Mosaic
      kernel allocates its own output (`plgpu.kernel` has no aliasing; its
      tiles cover it exactly, `qmatmul_mgpu.check_shapes`) and ignores it.

  Raises:
    ValueError: when `can_use` refuses, with its reason.
  """
  ok, reason = can_use(x2d, w, interpret=interpret)
  if not ok:
    raise ValueError(f"qmatmul.fwd cannot run: {reason}")
  if tuning is None and not interpret and can_use_mosaic(x2d, w)[0]:
    return qmatmul_mgpu.fwd(x2d, w)
  return qmatmul_fwd.fwd(x2d, w, interpret=interpret, tuning=tuning,
                         out_init=out_init)


def dx(dy2d: jax.Array, w: qa.QArray, *, interpret: bool = False,
       tuning: TuningConfig | None = None,
       out_init: jax.Array | None = None) -> jax.Array:
  """`dy2d (M, N) @ dequantize(w) -> (M, K)` in dy2d.dtype.

  Args and Raises: as `fwd`, with `can_use_dx`, `can_use_mosaic_dx` and an
  `(M, K)` `out_init`.
  """
  ok, reason = can_use_dx(dy2d, w, interpret=interpret)
  if not ok:
    raise ValueError(f"qmatmul.dx cannot run: {reason}")
  if tuning is None and not interpret and can_use_mosaic_dx(dy2d, w)[0]:
    return qmatmul_mgpu_dx.dx(dy2d, w)
  return qmatmul_dx.dx(dy2d, w, interpret=interpret, tuning=tuning,
                       out_init=out_init)
