"""experiments/mosaic_decode_probe.py on the CPU: its reference computes the
planar nibbles it claims to, and its Mosaic GPU kernel lowers for CUDA (so
an API change breaks here, not on the device)."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import mosaic_decode_probe as probe  # pylint: disable=g-import-not-at-top


def test_reference_reads_planar_nibbles_and_signed_codes():
  x, (codes,) = probe._inputs(jax.random.PRNGKey(3), 64, 96, 1)  # pylint: disable=protected-access
  q = np.asarray(codes).astype(np.int64)
  lo, hi = q & 15, q >> 4
  xf = np.asarray(x, np.float32)
  want = xf @ np.concatenate([lo, hi], axis=1).T
  np.testing.assert_allclose(np.asarray(probe.reference(x, codes)), want,
                             rtol=1e-5, atol=1e-3)
  signed = probe.as_signed(codes)
  assert signed.dtype == jnp.int8
  want_signed = xf @ np.concatenate([lo, hi - 8], axis=1).T
  np.testing.assert_allclose(np.asarray(probe.reference(x, signed)),
                             want_signed, rtol=1e-5, atol=1e-3)
  # the kernel's view: high nibble masked in place, x's high half / 16
  masked = (np.asarray(signed).astype(np.int64) & -16)
  xs = np.asarray(probe.prescale(x), np.float32)
  kernel_view = xs @ np.concatenate([lo, masked], axis=1).T
  np.testing.assert_allclose(kernel_view, want_signed, rtol=1e-5, atol=1e-3)


def test_skeleton_lowers_for_cuda():
  n, k = 128, 512
  for cfg in (probe.Config(64, 2, 2), probe.Config(128, 2, 2, True),
              probe.Config(128, 2, 2, True, 8)):
    x = jax.ShapeDtypeStruct((cfg.tokens, k), jnp.bfloat16)
    q = jax.ShapeDtypeStruct((n, k // 2), jnp.int8 if cfg.signed
                             else jnp.uint8)
    lowered = jax.jit(lambda x, q, cfg=cfg: probe.skeleton(x, q, cfg)).trace(
        x, q).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_skeleton_refuses_shapes_it_cannot_tile():
  x = jnp.zeros((probe.TOKENS, 512), jnp.bfloat16)
  for n, kw, rows, message in ((96, 256, 16, "must divide"),
                               (128, 192, 16, "must divide"),
                               (128, 256, 8, "x must be")):
    q = jnp.zeros((n, kw), jnp.uint8)
    try:
      probe.skeleton(x[:rows, :2 * kw], q, probe.Config(64, 2, 2))
    except ValueError as e:
      assert message in str(e)
    else:
      raise AssertionError(f"N={n}, K/2={kw} was accepted")
