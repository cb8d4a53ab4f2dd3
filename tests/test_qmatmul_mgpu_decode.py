"""The Mosaic GPU 4-bit decode probe (pallas_kernels/qmatmul_mgpu_decode.py).

As for the training kernels (tests/test_qmatmul_mgpu.py), Mosaic GPU has no
interpreter for a register-operand wgmma: the CPU tests check the shape
rules and that the kernel lowers for CUDA; `TestDecodeGpu` compares it with
the float32 `pallas_kernels.reference` on a Hopper GPU.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import qmatmul as kq
from pallas_kernels import qmatmul_mgpu_decode as dec
from qft_jax._src import qarray as qa


def _weight(key, n, k, group=128, symmetric=False):
  cfg = qa.QuantConfig(bits=4, group_size=group, symmetric=symmetric,
                       scale_dtype=jnp.bfloat16)
  return qa.random_qarray(jax.random.PRNGKey(key), (n, k), cfg)


@pytest.mark.parametrize("m, n, k, cfg, message", [
    (1, 4096 + 64, 4096, dec.DecodeConfig(), "N=4160 must be a multiple of 128"),
    (9, 4096, 4096, dec.DecodeConfig(tokens=8), r"M=9 must be in \[1, tokens=8\]"),
    (1, 4096, 4096, dec.DecodeConfig(tokens=32), "tokens=32 must be 8 or 16"),
    (1, 4096, 4096, dec.DecodeConfig(block_kb=256), "group size 128 must be a "
     "multiple of block_kb=256"),
    (1, 4096, 4096, dec.DecodeConfig(split=3), "must be a multiple of split"),
    (1, 4096, 11008, dec.DecodeConfig(split=2), "2752 bytes must be a "
     "multiple or a "
     "divisor of the group size 128"),
    (1, 4096, 4096, dec.DecodeConfig(split=8, stages=8), "stages=8 must not "
     "exceed a tile's steps"),
])
def test_check_shapes_names_the_broken_rule(m, n, k, cfg, message):
  with pytest.raises(ValueError, match=message):
    dec.check_shapes(m, n, k, 128, cfg)


@pytest.mark.parametrize("cfg", [dec.DecodeConfig(),
                                 dec.DecodeConfig(tokens=16, split=2,
                                                  block_kb=128),
                                 dec.DecodeConfig(pad=False)])
def test_lowers_for_cuda(cfg):
  """The whole call (padding, kernel, XLA's sum of the partials) lowers
  for CUDA on any backend, several tiles per CTA included."""
  n, k, g = 2048, 4096, 128
  f = jax.jit(functools.partial(dec.decode_fwd, group_size=g, cfg=cfg,
                                num_sms=8))
  text = f.trace(
      jax.ShapeDtypeStruct((1, k), jnp.bfloat16),
      jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
      jax.ShapeDtypeStruct((n, k // g), jnp.bfloat16),
      jax.ShapeDtypeStruct((n, k // g), jnp.uint8),
  ).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.usefixtures("hopper")
class TestDecodeGpu:
  """On a Hopper GPU: the probe against the float32 reference."""

  # 4096 x 4096 at split 4: 128 tiles; 11008 rows: more tiles than SMs, so
  # the tiles' pipelines chain; (2048, 8192) splits 2 groups per tile.
  @pytest.mark.parametrize("m, n, k, symmetric, cfg", [
      (1, 4096, 4096, False, dec.DecodeConfig()),
      (5, 11008, 4096, True, dec.DecodeConfig()),
      (16, 2048, 8192, False, dec.DecodeConfig(tokens=16, split=8,
                                               block_kb=128, stages=2)),
      (16, 4096, 4096, False, dec.DecodeConfig(tokens=16, split=2,
                                               block_kb=64, stages=8)),
      (1, 4096, 4096, False, dec.DecodeConfig(pad=False)),
      (3, 11008, 4096, True, dec.DecodeConfig(tokens=16, pad=False)),
  ])
  def test_matches_reference(self, m, n, k, symmetric, cfg):
    w = _weight(n + k + m, n, k, symmetric=symmetric)
    x = jax.random.normal(jax.random.PRNGKey(m + n), (m, k), jnp.bfloat16)
    got = jax.jit(functools.partial(
        dec.decode_fwd, group_size=128, cfg=cfg,
        num_sms=jax.devices()[0].core_count))(
            x, w.qvalue, w.scale, w.zero_point)
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    ref = kq.reference(x, w)
    err = float(jnp.linalg.norm(got.astype(jnp.float32) - ref)
                / jnp.linalg.norm(ref))
    # No weight is rounded: the error is the bf16 output's.
    assert err < 5e-3, err
