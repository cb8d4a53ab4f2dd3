"""Pallas GPU kernels for the fused low-bit dequantize-matmul.

`pallas_kernels.qmatmul` is the entry point used by `qft_jax`'s `qdot`:
`can_use` / `can_use_dx` gates, `fwd` / `dx` kernels and float32
`reference` / `reference_dx`. Behind it: Triton-lowered kernels
(`qmatmul_fwd`, `qmatmul_dx`, with `tiles` and `tuning`) for every width and
shape, and on Hopper Mosaic GPU kernels for 4-bit uniform weights at
training shapes (`qmatmul_mgpu` forward, `qmatmul_mgpu_dx` input gradient;
`can_use_mosaic` / `can_use_mosaic_dx`). `qmatmul_mgpu_decode` is a decode
probe on the same structure, benchmarked by experiments/bench_mgpu_decode.py
and not yet taken by `qmatmul`.
"""

from pallas_kernels.tuning import TuningConfig

__all__ = ["TuningConfig"]
