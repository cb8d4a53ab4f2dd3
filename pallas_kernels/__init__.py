"""Pallas GPU kernels for the fused low-bit dequantize-matmul.

`pallas_kernels.qmatmul` is the entry point used by `qft_jax`'s `qdot`:
`can_use` / `can_use_dx` gates, `fwd` / `dx` kernels and float32
`reference` / `reference_dx`.
"""

from pallas_kernels.tuning import TuningConfig

__all__ = ["TuningConfig"]
