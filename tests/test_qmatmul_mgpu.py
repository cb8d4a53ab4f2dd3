"""The Mosaic GPU 4-bit training kernels (pallas_kernels/qmatmul_mgpu.py,
forward, and qmatmul_mgpu_dx.py, input gradient).

Mosaic GPU has no interpreter for a register-operand wgmma, so the CPU tests
check the pieces: the kernels' own per-step dequantization
(`dequantize_plane`, the function the kernel bodies call) bit for bit
against `qa.dequantize`, the shape rules and the gate, and the lowering for
CUDA (jax >= 0.11, see `MIN_JAX`). `TestMgpuGpu` runs the kernels against
the float32 `pallas_kernels.reference` on a Hopper GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import qmatmul as kq
from pallas_kernels import qmatmul_mgpu as mg
from pallas_kernels import qmatmul_mgpu_dx as mdx
from qft_jax._src import qarray as qa
from qft_jax._src import qmatmul as qm


def _weight(key, n, k, group=128, symmetric=False):
  cfg = qa.QuantConfig(bits=4, group_size=group, symmetric=symmetric,
                       scale_dtype=jnp.bfloat16)
  return qa.random_qarray(jax.random.PRNGKey(key), (n, k), cfg)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_kb", [32, 64])
def test_kernel_dequantization_is_bitwise_qarrays(symmetric, block_kb):
  """Every step's tile, dequantized as the kernels do it (the codes under
  bf16's exponent for 128, the (G, 2, N) group parameters), equals
  `qa.dequantize(w, bf16)` exactly: each weight is rounded once."""
  n, k, g = 64, 1024, 128
  w = _weight(2, n, k, g, symmetric)
  params = mg.group_params(w.scale, w.zero_point)
  assert params.shape == (k // g, 2, n)
  want = np.asarray(qa.dequantize(w, jnp.bfloat16).astype(jnp.float32))
  half = k // 2
  for j in range(0, half, block_kb):
    q = w.qvalue[:, j:j + block_kb]
    for plane, col in ((0, j), (1, half + j)):
      s, z = params[col // g]
      got = mg.dequantize_plane(q, plane, s, z, codes=mg.biased_codes)
      np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                    want[:, col:col + block_kb])


@pytest.mark.parametrize("symmetric", [False, True])
def test_transposed_params_dequantize_bitwise(symmetric):
  """The transposed kernel's weights from `transposed_params`, as its
  registers compute them, `((128 + f q) - zb[n]) * sb[n]` in bf16, equal
  qa.dequantize bit for bit (row pair m = 8 a + 4 b + r's numbers zb, zb,
  sb, sb at 4 (8 a + 2 r + b))."""
  n, k, g = 96, 512, 128
  w = _weight(7 + symmetric, n, k, symmetric=symmetric)
  p = mdx.transposed_params(qa.dense_scale(w), w.zero_point)
  assert p.shape == (2, k // g // 2, 2 * n)
  rows = jnp.arange(n)
  m = rows // 2
  entry = 8 * (m // 8) + 2 * (m % 4) + (m // 4) % 2
  pick = lambda v, off: v[..., 4 * entry + rows % 2 + off]
  zb, sb = pick(p, 0), pick(p, 2)  # (2, G/2, N)
  want = qa.dequantize(w, jnp.bfloat16)
  for plane in (0, 1):
    codes = mg.biased_codes(w.qvalue, plane)  # (N, K/2)
    group = (jnp.arange(k // 2) // g)
    got = (codes - zb[plane][group].T) * sb[plane][group].T
    cols = slice(plane * k // 2, (plane + 1) * k // 2)
    np.testing.assert_array_equal(np.asarray(got.view(jnp.uint16)),
                                  np.asarray(want[:, cols].view(jnp.uint16)))


@pytest.mark.parametrize("shape, message", [
    ((4096, 4096 + 64, 4096, 128), "N=4160 must be a multiple"),
    ((4000, 4096, 4096, 128), "M=4000 must be a multiple"),
    ((4096, 4096, 4096, 96), "group size 96 must be a multiple"),
    ((4096, 4096, 4096 - 256, 256), "K/2=1920 must be a multiple"),
])
def test_check_shapes_names_the_broken_rule(shape, message):
  with pytest.raises(ValueError, match=message):
    mg.check_shapes(*shape, mg.MgpuConfig())


@pytest.mark.parametrize("shape, message", [
    ((4096, 4096 + 32, 4096, 128), "N=4128 must be a multiple of block_n"),
    ((4000, 4096, 4096, 128), "M=4000 must be a multiple"),
    ((4096, 4096, 4096, 32), "group size 32 must be a multiple of 64"),
    ((4096, 4096, 4096 - 256, 256), "K/2=1920 must be a multiple"),
])
def test_dx_check_shapes_names_the_broken_rule(shape, message):
  with pytest.raises(ValueError, match=message):
    mdx.check_shapes(*shape, mdx.DxConfig())
  with pytest.raises(ValueError, match="code_swizzle=128 must be 0 or 64"):
    mdx.check_shapes(4096, 4096, 4096, 128, mdx.DxConfig(code_swizzle=128))
  with pytest.raises(ValueError, match="tokens=512 must be a multiple of 8"):
    mdx.check_shapes(4096, 4096, 4096, 128, mdx.DxConfig(tokens=512))
  with pytest.raises(ValueError, match="itself a multiple of 32"):
    mdx.check_shapes(4096, 4096, 4096, 128, mdx.DxConfig(block_n=48))


def test_gate_refuses_off_hopper_and_qdot_keeps_xla():
  w = _weight(3, 256, 1024)
  x = jnp.ones((1024, 1024), jnp.bfloat16)
  ok, reason = kq.can_use_mosaic(x, w)
  if jax.default_backend() != "gpu":
    assert not ok and ("backend" in reason or "jax" in reason), reason
    assert not qm._use_pallas(x, w, None)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="cannot run"):
    mg.fwd(x[:8], w)
  ok_dx, reason_dx = kq.can_use_mosaic_dx(x[:, :256], w)
  if jax.default_backend() != "gpu":
    assert not ok_dx, reason_dx
  with pytest.raises(ValueError, match="cannot run"):
    mdx.dx(x[:8, :256], w)


@pytest.mark.skipif(not mg.jax_supports(),
                    reason=f"jax {jax.__version__} < {mg.MIN_JAX} cannot "
                           "lower the kernel (see MIN_JAX)")
def test_lowers_for_cuda():
  m, n, k, g = 1024, 512, 1024, 128
  f = jax.jit(functools.partial(mg.qmatmul_fwd, group_size=g))
  text = f.trace(
      jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
      jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
      jax.ShapeDtypeStruct((n, k // g), jnp.bfloat16),
      jax.ShapeDtypeStruct((n, k // g), jnp.uint8),
  ).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("name", ["constant", "no_params"])
def test_dx_ablations_lower_and_restore(name):
  """experiments/dx_ablations.py's timing-only variants lower for CUDA and
  leave the kernel module as they found it."""
  from experiments import dx_ablations  # pylint: disable=g-import-not-at-top
  before = dict(vars(mdx))
  m, n, k, g = 1024, 512, 1024, 128
  with dx_ablations.ABLATIONS[name]():
    assert dict(vars(mdx)) != before
    jax.jit(functools.partial(mdx.fused_dx, group_size=g)).trace(
        jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
        jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
        jax.ShapeDtypeStruct((2, k // g // 2, 2 * n), jnp.bfloat16),
    ).lower(lowering_platforms=("cuda",))
  assert dict(vars(mdx)) == before


@pytest.mark.parametrize("cfg", [mdx.DxConfig(),
                                 mdx.DxConfig(code_swizzle=0),
                                 mdx.DxConfig(block_n=128, stages=2)])
def test_dx_lowers_for_cuda(cfg):
  """The input-gradient kernel lowers for CUDA (its inline A-operand
  builder and epilogue included)."""
  m, n, k, g = 1024, 512, 1024, 128
  dx = jax.jit(functools.partial(mdx.fused_dx, group_size=g, cfg=cfg))
  text = dx.trace(
      jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
      jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
      jax.ShapeDtypeStruct((2, k // g // 2, 2 * n), jnp.bfloat16),
  ).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def _dequantized_on_gpu(q, params, plane):
  """`mg.dequantize_plane` of a `(64, C)` byte tile in a one-warpgroup
  Mosaic GPU kernel (params: `(1, 2, 64)` s, z), as the kernels run it."""
  rows, cols = q.shape

  def kernel(q_gmem, p_gmem, out_gmem, q_smem, p_smem, out_smem, loaded):
    plgpu.copy_gmem_to_smem(q_gmem, q_smem, loaded)
    plgpu.copy_gmem_to_smem(p_gmem, p_smem, loaded)
    plgpu.barrier_wait(loaded)
    out_smem[...] = mg.dequantize_plane(q_smem[...], plane,
                                        *mg.load_params(p_smem))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem)
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((rows, cols), jnp.bfloat16),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      scratch_types=dict(
          q_smem=plgpu.SMEM((rows, cols), jnp.uint8,
                            transforms=mg.swizzled(jnp.uint8, cols)),
          p_smem=plgpu.SMEM((1, 2, rows), jnp.bfloat16),
          out_smem=plgpu.SMEM((rows, cols), jnp.bfloat16,
                              transforms=mg.swizzled(jnp.bfloat16, cols)),
          loaded=plgpu.Barrier(num_arrivals=2)))(q, params)


def test_conversion_kernel_lowers_for_cuda():
  """The GPU twin's one-tile conversion kernel lowers (here, on the CPU)."""
  f = jax.jit(functools.partial(_dequantized_on_gpu, plane=1))
  text = f.trace(jax.ShapeDtypeStruct((64, 64), jnp.uint8),
                 jax.ShapeDtypeStruct((1, 2, 64), jnp.bfloat16)
                 ).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.usefixtures("hopper")
class TestMgpuGpu:
  """On a Hopper GPU: the kernel against the float32 reference, fresh
  random data, and `qmatmul.fwd` / `qdot` taking it by default."""

  # (4096, 2048, 2048): more tiles than SMs, so the tiles' pipelines chain.
  @pytest.mark.parametrize("m, n, k, symmetric", [(1024, 1024, 2048, False),
                                                  (1024, 512, 1024, True),
                                                  (1024, 768, 4352, False),
                                                  (4096, 2048, 2048, False)])
  def test_matches_reference(self, m, n, k, symmetric):
    w = _weight(n + k, n, k, symmetric=symmetric)
    x = jax.random.normal(jax.random.PRNGKey(k), (m, k), jnp.bfloat16)
    assert kq.can_use_mosaic(x, w)[0]
    got = jax.jit(kq.fwd)(x, w).astype(jnp.float32)
    assert got.shape == (m, n)
    ref = kq.reference(x, w)
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert err < 1e-2, err

  # Unswizzled code tiles, 128-row steps, 128-token tiles, several tiles
  # per CTA (4096 x 2048: the tiles' pipelines chain).
  @pytest.mark.parametrize("m, n, k, symmetric, cfg", [
      (1024, 1024, 2048, False, mdx.DxConfig()),
      (1024, 512, 1024, True, mdx.DxConfig()),
      (1024, 768, 4352, False, mdx.DxConfig(code_swizzle=0)),
      (4096, 2048, 2048, False, mdx.DxConfig(block_n=128, stages=2)),
      (1024, 512, 1024, True, mdx.DxConfig(tokens=128)),
      (4096, 2048, 2048, True, mdx.DxConfig())])
  def test_dx_matches_reference(self, m, n, k, symmetric, cfg):
    w = _weight(n + k + 2, n, k, symmetric=symmetric)
    dy = jax.random.normal(jax.random.PRNGKey(n + 1), (m, n), jnp.bfloat16)
    assert kq.can_use_mosaic_dx(dy, w)[0]
    got = jax.jit(functools.partial(mdx.dx, cfg=cfg))(dy, w).astype(
        jnp.float32)
    assert got.shape == (m, k)
    ref = kq.reference_dx(dy, w)
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert err < 1e-2, err

  @pytest.mark.parametrize("plane", [0, 1])
  def test_ptx_conversion_is_bitwise_the_jnp_one(self, plane):
    """`dequantize_plane` inside a Mosaic GPU kernel (the PTX code
    conversion, `biased_codes_ptx`) equals it with the jnp `biased_codes`
    bit for bit, over all 256 byte values in every column position."""
    q = (jnp.arange(64 * 64, dtype=jnp.uint32) * 7 % 256).astype(
        jnp.uint8).reshape(64, 64)
    s = (jax.random.normal(jax.random.PRNGKey(plane), (64,)) * 0.02).astype(
        jnp.bfloat16)
    z = jax.random.randint(jax.random.PRNGKey(9), (64,), 0, 16).astype(
        jnp.bfloat16)
    got = jax.jit(functools.partial(_dequantized_on_gpu, plane=plane))(
        q, jnp.stack([s, z])[None])
    want = mg.dequantize_plane(q, plane, s, z, codes=mg.biased_codes)
    np.testing.assert_array_equal(
        np.asarray(jax.lax.bitcast_convert_type(got, jnp.uint16)),
        np.asarray(jax.lax.bitcast_convert_type(want, jnp.uint16)))

  def test_qdot_default_gradient_takes_both(self):
    """jax.grad through qdot's default path at training sizes runs both
    Mosaic kernels and matches the XLA path's input gradient."""
    w = _weight(11, 512, 1024)
    x = jax.random.normal(jax.random.PRNGKey(12), (4, 256, 1024),
                          jnp.bfloat16)
    dy = jnp.ones((1024, 512), jnp.bfloat16)
    assert qm._use_pallas(dy, w, None, gate="can_use_dx")  # pylint: disable=protected-access
    loss = lambda x, impl: jnp.sum(qm.qdot(x, w, implementation=impl)
                                   .astype(jnp.float32) ** 2)
    got = jax.jit(jax.grad(lambda x: loss(x, None)))(x).astype(jnp.float32)
    want = jax.grad(lambda x: loss(x, "xla"))(x).astype(jnp.float32)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert err < 1e-2, err

  def test_qdot_default_takes_it(self):
    w = _weight(5, 512, 1024)
    x = jax.random.normal(jax.random.PRNGKey(6), (4, 256, 1024),
                          jnp.bfloat16)
    assert qm._use_pallas(x.reshape(-1, 1024), w, None)  # pylint: disable=protected-access
    got = jax.jit(qm.qdot)(x, w).astype(jnp.float32)
    want = qm.qdot(x, w, implementation="xla").astype(jnp.float32)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert err < 1e-2, err


def test_benchmark_configs_fit_its_shapes():
  """experiments/bench_mgpu_train.py's configs accept its three shapes."""
  from experiments import bench_mgpu_train as bench  # pylint: disable=g-import-not-at-top
  for n, k in bench.SHAPES:
    for cfg in bench.CONFIGS:
      mg.check_shapes(bench.M, n, k, bench.GROUP, cfg)
    for cfg in bench.DX_CONFIGS:
      mdx.check_shapes(bench.M, n, k, bench.GROUP, cfg)


def test_qdot_default_takes_mosaic_only_outside_a_device_mesh(monkeypatch):
  """With the gates passing (patched: CI has no Hopper), qdot's default
  forward and input gradient at training sizes take the Mosaic kernels,
  each only where its own gate passes, and neither under a multi-device
  mesh (XLA would replicate the custom call's operands)."""
  from qft_jax._src import sharding  # pylint: disable=g-import-not-at-top
  w = _weight(9, 256, 1024)
  x = jnp.ones((1024, 1024), jnp.bfloat16)
  monkeypatch.setattr(kq, "can_use_mosaic", lambda *_: (True, "ok"))
  assert qm._use_pallas(x, w, None)  # pylint: disable=protected-access
  assert not qm._use_pallas(x[:, :256], w, None, gate="can_use_dx")  # pylint: disable=protected-access
  monkeypatch.setattr(kq, "can_use_mosaic_dx", lambda *_: (True, "ok"))
  assert qm._use_pallas(x[:, :256], w, None, gate="can_use_dx")  # pylint: disable=protected-access
  assert not qm._use_pallas(x, w, "xla")  # pylint: disable=protected-access
  monkeypatch.setattr(sharding, "compute_mesh_size", lambda: 2)
  assert not qm._use_pallas(x, w, None)  # pylint: disable=protected-access
  assert not qm._use_pallas(x[:, :256], w, None, gate="can_use_dx")  # pylint: disable=protected-access


def test_bad_operands_are_named():
  """Wrong code dtype or group-parameter shape fails before any lowering."""
  n, k, g = 256, 1024, 128
  x = jnp.ones((1024, k), jnp.bfloat16)
  codes = jnp.zeros((n, k // 2), jnp.uint8)
  params = jnp.zeros((k // g, 2, n), jnp.bfloat16)
  with pytest.raises(ValueError, match="codes must be uint8"):
    mg.fused_fwd(x, codes.astype(jnp.int8), params, group_size=g)
  with pytest.raises(ValueError, match="params must be"):
    mg.fused_fwd(x, codes, params[:, :1], group_size=g)
  with pytest.raises(ValueError, match="params must be"):
    mdx.fused_dx(x[:, :n], codes, params[1:], group_size=g)
