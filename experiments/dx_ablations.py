"""Ablations of the Mosaic input-gradient kernel's dequantization, for timing
only (their outputs are wrong on purpose).

Session 14's profile (WORKSPACE.md section 4, "Session 14") left open
whether `qmatmul_mgpu_dx`'s gap to XLA's bf16 matmul is its
dequantization or its pipeline: each context below swaps one part of
`transposed_weights` while `fused_dx` is traced, and
`bench_mgpu_train.py --ablate` times the kernel under each:

  constant:   no dequantization at all (A = 1.0 everywhere): the pipeline
              and MMA floor of this kernel's structure.
  no_params:  codes converted (`shr`, `lop3`), no group parameters (their
              loads, `HSUB2`, `HMUL2` dropped): what the parameters cost.

Session 15 (H200, before the `ldmatrix` code loads, `mgpu_train_dx_h200_2026-11-28_s15_ablate.json`, XLA bf16
187.8 / 481.6 / 521.8 us, the kernel 198.1 / 515.6 / 541.9): constant
164.3 / 427.6 / 444.6 (the structure's floor, 1.14-1.17x XLA bf16),
no_params 182.4 / 468.2 / 489.7; a third variant without the plane's shift
(16 of the step's 146 instructions) changed nothing (199.1 / 518.4 / 541.7)
and was removed. After the `ldmatrix` loads (`..._s15_ablate_ldmatrix.json`,
XLA bf16 186.3 / 476.8 / 518.6, the kernel alone 184.2 / 481.2 / 499.0):
constant 163.6 / 422.8 / 442.2, no_params 174.0 / 452.0 / 471.5.
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
}
