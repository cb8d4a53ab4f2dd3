"""Ablations of the Mosaic input-gradient kernel's dequantization, for timing
only (their outputs are wrong on purpose).

Session 14's profile (WORKSPACE.md section 4, "Session 14") left open
whether `qmatmul_mgpu_dx`'s gap to XLA's bf16 matmul is its
dequantization or its pipeline: each context below swaps one part of
`transposed_weights` while `fused_dx` is traced, and
`bench_mgpu_train.py --ablate` times the kernel under each:

  constant:   no dequantization at all (A = 1.0 everywhere): the pipeline
              and MMA floor of this kernel's structure.
  no_params:  codes converted (`prmt`, `shr`, `lop3`), no group parameters
              (their 8-byte loads, `HSUB2`, `HMUL2` dropped): what the
              parameters cost.
  no_shift:   the plane's shift dropped (plane 1 reads the wrong nibble):
              what a warpgroup-specialized build would save.
"""

from __future__ import annotations

import contextlib
import types

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import qmatmul_mgpu_dx as mdx


def _constant_weights(q_ref, p_ref, block_n: int, swizzle: int):
  del q_ref, p_ref, swizzle
  return plgpu.layout_cast(jnp.full((mdx.COLS, block_n), 1.0, jnp.bfloat16),
                           plgpu.Layout.WGMMA)


@contextlib.contextmanager
def _patched(name: str, value):
  old = getattr(mdx, name)
  setattr(mdx, name, value)
  try:
    yield
  finally:
    setattr(mdx, name, old)


def _first_operand(a, b):
  del b
  return a


ABLATIONS = {
    "constant": lambda: _patched("transposed_weights", _constant_weights),
    "no_params": lambda: _patched("arith", types.SimpleNamespace(**{
        **vars(mdx.arith), "subf": _first_operand, "mulf": _first_operand})),
    "no_shift": lambda: _patched(
        "_PAIR_PTX", mdx._PAIR_PTX.replace("shr.b32 t, t, $3; ", "")),  # pylint: disable=protected-access
}
