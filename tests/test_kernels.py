"""Pallas qmatmul kernels against the float32 reference, plus their gates.

`TestQMatmulGpu` compiles the kernels for the GPU (marked `gpu`, skipped
without one); its twin `TestQMatmulInterpret` runs the same cases in the Pallas
interpreter on any backend, which is CI's kernel coverage. Every run draws
fresh random inputs and poisons the output with NaNs (aliased `out_init`), so
a tile the kernel forgets to write fails the comparison.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import qmatmul as kq
from pallas_kernels import tiles
from pallas_kernels import tuning
from qft_jax._src import qarray as qa
from qft_jax._src import qmatmul as qm
from qft_jax._src.quantizers import nf4

TOL = 1e-2  # bf16 / f16 inputs, float32 accumulation

# (bits, group, symmetric, codebook, M, N, K): every width, both zero-point
# kinds, NF4, group sizes 32/64/128/per-channel; M = 1, 3, 17; N not a
# multiple of the 16-row tile; K whose words per plane (48, 80) are not a
# multiple of the configured word tile.
CASES = [
    (4, 32, False, None, 3, 40, 256),
    (4, 128, True, None, 1, 24, 384),
    (3, 32, False, None, 17, 24, 256),
    (2, 64, True, None, 3, 40, 256),
    (8, -1, False, None, 1, 33, 96),
    (4, 64, True, "nf4", 3, 40, 128),
    (4, 32, False, None, 17, 16, 96),
    (8, 32, True, None, 3, 20, 160),
]
SMALL_TILES = [
    tuning.TuningConfig(block_m=16, block_n=16, block_k=128,
                        scale_mode="activations", split_k=2),
    tuning.TuningConfig(block_m=16, block_n=32, block_k=16,
                        scale_mode="weights"),
]


def _case_id(case):
  bits, g, sym, cb, m, n, k = case
  kind = cb or ("sym" if sym else "asym")
  return f"{bits}b-{kind}-g{g}-{m}x{n}x{k}"


def _rel(a, b):
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(case, seed, dtype=jnp.bfloat16):
  bits, g, sym, cb, m, n, k = case
  kw, kx, kd, ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  cfg = qa.QuantConfig(bits=bits, group_size=g, symmetric=sym, codebook=cb)
  w = qa.quantize(jax.random.normal(kw, (n, k)), cfg)
  # Random positive scales per group, so a wrong group index shows.
  w = dataclasses.replace(
      w, scale=w.scale * jax.random.uniform(ks, w.scale.shape, minval=0.5,
                                            maxval=2.0))
  x = jax.random.normal(kx, (m, k)).astype(dtype)
  dy = jax.random.normal(kd, (m, n)).astype(dtype)
  return w, x, dy


# (case, split_k, block_k): the first splits its 8 word tiles 2 / 3 / 3, so
# the later splits start inside a group; then 3-bit, per-channel and NF4.
SPLIT_CASES = [
    ((4, 32, False, None, 3, 40, 256), 3, 16),
    ((3, 32, False, None, 2, 24, 256), 1, 32),
    ((2, 64, True, None, 1, 40, 256), 1, 64),
    ((8, -1, False, None, 1, 33, 96), 3, 16),
    ((4, 64, True, "nf4", 3, 40, 128), 2, 16),
]


class _KernelCases:
  """Shared cases; subclasses set INTERPRET."""

  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_backend(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("needs a GPU (the interpreter twin covers CPU)")

  def _outputs(self, f, a, w, configs):
    """`f(a, w)` (kq.fwd or kq.dx) under each config, output NaN-poisoned
    first, as float32 arrays; and the float32 reference."""
    out_shape = (a.shape[0], w.shape[0] if f is kq.fwd else w.shape[1])
    got = [np.asarray(f(a, w, interpret=self.INTERPRET, tuning=cfg,
                        out_init=jnp.full(out_shape, jnp.nan, a.dtype)),
                      np.float32) for cfg in configs]
    return got, (kq.reference if f is kq.fwd else kq.reference_dx)(a, w)

  @pytest.mark.parametrize("index", range(len(CASES)),
                           ids=[_case_id(c) for c in CASES])
  def test_fwd_and_dx_match_reference(self, index):
    case = CASES[index]
    w, x, dy = _inputs(case, seed=np.random.randint(1 << 30))
    nan_y = jnp.full((x.shape[0], w.shape[0]), jnp.nan, x.dtype)
    nan_dx = jnp.full(x.shape, jnp.nan, x.dtype)
    ref_y, ref_dx = kq.reference(x, w), kq.reference_dx(dy, w)
    # The interpreter is slow: it alternates the tilings between cases.
    configs = ([SMALL_TILES[index % 2]] if self.INTERPRET else SMALL_TILES)
    for cfg in configs:
      y = kq.fwd(x, w, interpret=self.INTERPRET, tuning=cfg, out_init=nan_y)
      dx = kq.dx(dy, w, interpret=self.INTERPRET, tuning=cfg,
                 out_init=nan_dx)
      assert y.shape == ref_y.shape and y.dtype == x.dtype
      assert dx.shape == ref_dx.shape and dx.dtype == dy.dtype
      assert _rel(y, ref_y) < TOL, (cfg, _rel(y, ref_y))
      assert _rel(dx, ref_dx) < TOL, (cfg, _rel(dx, ref_dx))

  def test_default_tuning_and_f16(self):
    case = (4, 64, False, None, 5, 48, 256)
    w, x, dy = _inputs(case, seed=np.random.randint(1 << 30),
                       dtype=jnp.float16)
    y = kq.fwd(x, w, interpret=self.INTERPRET,
               out_init=jnp.full((5, 48), jnp.nan, x.dtype))
    dx = kq.dx(dy, w, interpret=self.INTERPRET,
               out_init=jnp.full(x.shape, jnp.nan, x.dtype))
    assert y.dtype == jnp.float16 and dx.dtype == jnp.float16
    assert _rel(y, kq.reference(x, w)) < TOL
    assert _rel(dx, kq.reference_dx(dy, w)) < TOL

  def test_double_quantized_scales(self):
    """QLoRA's scales are themselves an 8-bit QArray (double quantization)."""
    w, x, dy = _inputs((4, 64, True, "nf4", 3, 40, 128),
                       seed=np.random.randint(1 << 30))
    w = dataclasses.replace(w, scale=nf4.double_quantize(w.scale))
    assert kq.can_use(x, w, interpret=self.INTERPRET)[0]
    y = kq.fwd(x, w, interpret=self.INTERPRET, tuning=SMALL_TILES[0],
               out_init=jnp.full((3, 40), jnp.nan, x.dtype))
    dx = kq.dx(dy, w, interpret=self.INTERPRET, tuning=SMALL_TILES[1],
               out_init=jnp.full(x.shape, jnp.nan, x.dtype))
    assert _rel(y, kq.reference(x, w)) < TOL
    assert _rel(dx, kq.reference_dx(dy, w)) < TOL

  @pytest.mark.parametrize("case,split", [
      ((3, 32, False, None, 17, 24, 256), 3),
      ((4, 64, True, "nf4", 3, 40, 128), 2),
      ((8, -1, False, None, 1, 33, 96), 1),
      ((2, 64, True, None, 3, 40, 256), 3),
  ], ids=lambda v: _case_id(v) if isinstance(v, tuple) else f"split{v}")
  def test_prefetch_changes_nothing_but_timing(self, case, split):
    """`prefetch=D` carries the next D steps' loads; the arithmetic and its
    order are unchanged, so the outputs are bitwise equal (fwd through both
    contractions, and dx), including the re-reads past the last step (3
    steps ahead exceeds some programs' steps)."""
    w, x, dy = _inputs(case, seed=np.random.randint(1 << 30))
    base = tuning.TuningConfig(block_m=16, block_n=16, block_k=16,
                               scale_mode="activations", split_k=split)
    fma = tuning.TuningConfig(block_m=1, block_n=16, block_k=16,
                              scale_mode="weights", split_k=split,
                              contraction="fma")
    depths = (0, 1, 3)
    for cfg in (base, fma):
      got = [np.asarray(kq.fwd(
          x, w, interpret=self.INTERPRET,
          tuning=dataclasses.replace(cfg, prefetch=d),
          out_init=jnp.full((x.shape[0], w.shape[0]), jnp.nan, x.dtype)),
                        np.float32) for d in depths]
      for g in got[1:]:
        np.testing.assert_array_equal(got[0], g)
      assert _rel(got[0], kq.reference(x, w)) < TOL
    got = [np.asarray(kq.dx(dy, w, interpret=self.INTERPRET,
                            tuning=dataclasses.replace(base, prefetch=d),
                            out_init=jnp.full(x.shape, jnp.nan, x.dtype)),
                      np.float32) for d in depths]
    for g in got[1:]:
      np.testing.assert_array_equal(got[0], g)
    assert _rel(got[0], kq.reference_dx(dy, w)) < TOL

  @pytest.mark.parametrize("double_quant", [False, True],
                           ids=["float-scales", "dq-scales"])
  def test_select_lookup_matches_gather(self, double_quant):
    """`lookup="select"` forms NF4 levels by a select tree on constants, the
    same float32 values the gather loads, so every path's output is bitwise
    equal: fwd through both scale modes and the vector contraction, and dx,
    with split contractions."""
    w, x, dy = _inputs((4, 64, True, "nf4", 3, 40, 128),
                       seed=np.random.randint(1 << 30))
    if double_quant:
      w = dataclasses.replace(w, scale=nf4.double_quantize(w.scale))
    mma = tuning.TuningConfig(block_m=16, block_n=16, block_k=16,
                              scale_mode="activations", split_k=2)
    runs = [
        (kq.fwd, x, mma),
        (kq.fwd, x, dataclasses.replace(mma, scale_mode="weights",
                                        split_k=1)),
        (kq.fwd, x, tuning.TuningConfig(block_m=1, block_n=16, block_k=16,
                                        scale_mode="weights", split_k=2,
                                        contraction="fma")),
        (kq.dx, dy, mma),
        (kq.dx, dy, dataclasses.replace(mma, scale_mode="weights",
                                        split_k=1)),
    ]
    for f, a, cfg in runs:
      got, ref = self._outputs(f, a, w, [dataclasses.replace(cfg, lookup=v)
                                         for v in tuning.LOOKUPS])
      np.testing.assert_array_equal(got[0], got[1], err_msg=str(cfg))
      assert _rel(got[1], ref) < TOL, cfg

  @pytest.mark.parametrize("case,dtype", [
      ((4, 32, False, None, 3, 40, 256), jnp.bfloat16),
      ((2, 64, True, None, 1, 24, 256), jnp.float16),
      ((3, 32, False, None, 3, 40, 256), jnp.bfloat16),
      ((3, 64, True, None, 17, 24, 512), jnp.float16),
      ((8, 32, False, None, 3, 40, 128), jnp.bfloat16),
      ((8, -1, True, None, 1, 24, 96), jnp.bfloat16),
      ((8, 32, False, None, 2, 24, 128), jnp.float16),
      ((4, 64, True, "nf4", 3, 40, 256), jnp.bfloat16),
      ((4, 32, True, "nf4", 17, 24, 128), jnp.float16),
  ], ids=lambda v: _case_id(v) if isinstance(v, tuple) else jnp.dtype(v).name)
  def test_ptx_unpack_matches_jnp(self, case, dtype):
    """`unpack="ptx"` (run as PTX on the GPU; its jnp form in the
    interpreter) makes the same exact codes (uniform) or the same rounded
    levels (NF4) as the int32-lane path, so fwd and dx outputs are bitwise
    equal, split contraction included."""
    w, x, dy = _inputs(case, seed=np.random.randint(1 << 30), dtype=dtype)
    base = tuning.TuningConfig(block_m=16, block_n=16, block_k=16,
                               scale_mode="activations", split_k=2)
    for f, a in ((kq.fwd, x), (kq.dx, dy)):
      got, ref = self._outputs(f, a, w, [dataclasses.replace(base, unpack=v)
                                         for v in tuning.UNPACKS])
      np.testing.assert_array_equal(got[0], got[1], err_msg=f.__name__)
      assert _rel(got[1], ref) < TOL

  @pytest.mark.parametrize("scale_mode", tuning.SCALE_MODES)
  def test_split_reduced_in_kernel_matches_xla(self, scale_mode):
    """`split_reduce="kernel"`: each tile's last program sums the partials
    in the order 0..S-1 into the NaN-poisoned result: the XLA-reduced
    output up to the summation order XLA picks (fwd, dx; 3 splits, ragged
    M and N), and every tile written."""
    w, x, dy = _inputs((4, 32, False, None, 17, 40, 256),
                       seed=np.random.randint(1 << 30))
    base = tuning.TuningConfig(block_m=16, block_n=16, block_k=16,
                               scale_mode=scale_mode, split_k=3)
    for f, a in ((kq.fwd, x), (kq.dx, dy)):
      got, ref = self._outputs(
          f, a, w, [dataclasses.replace(base, split_reduce=v)
                    for v in tuning.SPLIT_REDUCES])
      np.testing.assert_allclose(got[1], got[0], rtol=1e-2, atol=1e-2,
                                 err_msg=f.__name__)
      assert _rel(got[1], ref) < TOL

  def test_split_contraction_matches_unsplit(self):
    """Splitting K (fwd) / N (dx) over programs changes only the grid."""
    w, x, dy = _inputs((4, 32, False, None, 3, 48, 128),
                       seed=np.random.randint(1 << 30))
    outs = []
    for split in (1, 3):  # 3 does not divide the 4 word tiles / 3 row tiles
      cfg = tuning.TuningConfig(block_m=16, block_n=16, block_k=16,
                                split_k=split)
      outs.append((kq.fwd(x, w, interpret=self.INTERPRET, tuning=cfg),
                   kq.dx(dy, w, interpret=self.INTERPRET, tuning=cfg)))
    assert _rel(outs[0][0], outs[1][0]) < TOL
    assert _rel(outs[0][1], outs[1][1]) < TOL
    assert _rel(outs[1][0], kq.reference(x, w)) < TOL

  @pytest.mark.parametrize("case,split,block_k", SPLIT_CASES,
                           ids=lambda v: _case_id(v) if isinstance(v, tuple)
                           else str(v))
  def test_vector_contraction_matches_reference(self, case, split, block_k):
    """`contraction="fma"`: one row per program, a (block_n, block_k)
    float32 accumulator reduced once after the loop."""
    w, x, _ = _inputs(case, seed=np.random.randint(1 << 30))
    cfg = tuning.TuningConfig(block_m=1, block_n=16, block_k=block_k,
                              contraction="fma", scale_mode="weights",
                              split_k=split)
    y = kq.fwd(x, w, interpret=self.INTERPRET, tuning=cfg,
               out_init=jnp.full((x.shape[0], w.shape[0]), jnp.nan, x.dtype))
    assert y.dtype == x.dtype
    assert _rel(y, kq.reference(x, w)) < TOL


def test_prefetch_depth_is_checked():
  with pytest.raises(ValueError, match="prefetch must be 0..4"):
    tuning.TuningConfig(prefetch=5)
  with pytest.raises(ValueError, match="prefetch must be"):
    tuning.TuningConfig(prefetch=-1)
  with pytest.raises(ValueError, match="prefetch must be"):
    tuning.TuningConfig(prefetch=True)  # a step count, not a switch


def test_lookup_is_checked():
  with pytest.raises(ValueError, match="lookup must be one of .*'table'"):
    tuning.TuningConfig(lookup="table")


def test_select_levels_are_the_float32_codebook():
  """The select tree returns, bit for bit, the float32 table the gather
  loads, for every code."""
  levels = tiles.layout_of(_q(codebook="nf4", symmetric=True)).codebook
  codes = jnp.arange(16, dtype=jnp.int32).reshape(4, 4)
  got = np.asarray(tiles.select_levels(codes, levels))
  want = np.asarray(jnp.asarray(levels, jnp.float32)[codes])
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


def test_vector_contraction_config_is_checked():
  with pytest.raises(ValueError, match="block_m=1"):
    tuning.TuningConfig(block_m=16, contraction="fma", scale_mode="weights")
  with pytest.raises(ValueError, match="scale_mode='weights'"):
    tuning.TuningConfig(block_m=1, contraction="fma",
                        scale_mode="activations")
  with pytest.raises(ValueError, match="contraction must be"):
    tuning.TuningConfig(contraction="simd")
  with pytest.raises(ValueError, match="only the 'mma'"):
    kq.dx(jnp.ones((1, 24), jnp.bfloat16), _q(), interpret=True,
          tuning=tuning.TuningConfig(block_m=1, contraction="fma",
                                     scale_mode="weights"))


@pytest.mark.gpu
class TestQMatmulGpu(_KernelCases):
  INTERPRET = False

  def test_scale_mode_paths_agree(self):
    """The two places to apply the scale compute the same product."""
    w, x, dy = _inputs((3, 64, False, None, 17, 40, 256),
                       seed=np.random.randint(1 << 30))
    outs = []
    for mode in tuning.SCALE_MODES:
      cfg = tuning.TuningConfig(block_m=16, block_n=16, block_k=64,
                                scale_mode=mode)
      outs.append((kq.fwd(x, w, interpret=self.INTERPRET, tuning=cfg),
                   kq.dx(dy, w, interpret=self.INTERPRET, tuning=cfg)))
    assert _rel(outs[0][0], outs[1][0]) < TOL
    assert _rel(outs[0][1], outs[1][1]) < TOL

  def test_qdot_pallas_path_matches_xla(self):
    w, x, dy = _inputs((4, 64, False, None, 64, 96, 512), seed=11)
    x3 = x.reshape(4, 16, 512)
    y = qm.qdot(x3, w, implementation="pallas")
    y_xla = qm.qdot(x3, w, implementation="xla")
    assert _rel(y, y_xla) < TOL
    cot = dy.reshape(4, 16, 96)
    g = jax.grad(lambda a: jnp.sum(
        qm.qdot(a, w, implementation="pallas").astype(jnp.float32) * cot))(x3)
    g_ref = kq.reference_dx(dy, w).reshape(g.shape)
    assert _rel(g, g_ref) < TOL

  def test_large_decode_and_train_shapes(self):
    for case in [(4, 128, False, None, 1, 4096, 4096),
                 (4, 128, False, None, 300, 1000, 2048)]:
      w, x, dy = _inputs(case, seed=5)
      y = kq.fwd(x, w, out_init=jnp.full((x.shape[0], w.shape[0]), jnp.nan,
                                         x.dtype))
      dx = kq.dx(dy, w, out_init=jnp.full(x.shape, jnp.nan, x.dtype))
      assert _rel(y, kq.reference(x, w)) < TOL
      assert _rel(dx, kq.reference_dx(dy, w)) < TOL


class TestQMatmulInterpret(_KernelCases):
  INTERPRET = True


def _q(bits=4, group=32, n=24, k=128, **kw):
  cfg = qa.QuantConfig(bits=bits, group_size=group, **kw)
  return qa.quantize(jax.random.normal(jax.random.PRNGKey(0), (n, k)), cfg)


@pytest.mark.parametrize("x, w, needle", [
    (jnp.ones((2, 128), jnp.float32), _q(), "dtype"),
    (jnp.ones((2, 64), jnp.bfloat16), _q(), "columns"),
    (jnp.ones((2, 3, 128), jnp.bfloat16), _q(), "2-D"),
    (jnp.ones((0, 128), jnp.bfloat16), _q(), "no rows"),
    (jnp.ones((2, 40), jnp.bfloat16), _q(k=40, group=-1), "word tile"),
    (jnp.ones((2, 64), jnp.bfloat16), _q(bits=8, group=8, k=64), "word tile"),
    (jnp.ones((2, 128), jnp.bfloat16), jnp.ones((24, 128)), "not a QArray"),
], ids=["f32", "k-mismatch", "rank", "empty", "kw-20", "group-8", "float-w"])
def test_gate_refuses_with_reason(x, w, needle):
  ok, reason = kq.can_use(x, w, interpret=True)
  assert not ok and needle in reason, reason
  with pytest.raises(ValueError, match="cannot run"):
    kq.fwd(x, w, interpret=True)


def test_gate_refuses_stacked_and_wrong_dy():
  stacked = qa.quantize(jnp.ones((2, 24, 128)), qa.QuantConfig(bits=4))
  ok, reason = kq.can_use(jnp.ones((2, 128), jnp.bfloat16), stacked,
                          interpret=True)
  assert not ok and "batch axes" in reason
  ok, reason = kq.can_use_dx(jnp.ones((2, 23), jnp.bfloat16), _q(),
                             interpret=True)
  assert not ok and "columns" in reason
  assert kq.can_use_dx(jnp.ones((2, 24), jnp.bfloat16), _q(),
                       interpret=True)[0]


def test_gate_names_the_backend():
  ok, reason = kq.can_use(jnp.ones((2, 128), jnp.bfloat16), _q())
  if jax.default_backend() == "gpu":
    assert ok, reason
  else:
    assert not ok and "backend" in reason


def _cuda_text(fn, a_shape, w) -> str:
  """The program `fn(a, w)` lowers to for CUDA (on any backend)."""
  lowered = jax.jit(fn).trace(jax.ShapeDtypeStruct(a_shape, jnp.bfloat16),
                              w).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "tt.func" in text or "__gpu$xla.gpu.triton" in text
  return text


def _assert_no_float_weight(text, n, k):
  for dt in ("bf16", "f16", "f32"):
    assert f"tensor<{n}x{k}x{dt}>" not in text
    assert f"tensor<{n}x{k // 2}x2x{dt}>" not in text


def test_gpu_lowering_never_holds_a_float_weight():
  """The lowered GPU program has no (N, K) float array: only packed codes."""
  n, k = 256, 512
  w = qa.abstract_qarray((n, k), qa.QuantConfig(bits=4, group_size=64))
  fma = tuning.TuningConfig(block_m=1, block_n=64, contraction="fma",
                            scale_mode="weights", split_k=2)
  ahead = tuning.TuningConfig(block_m=16, block_n=64, split_k=2,
                              prefetch=2)
  ptx = tuning.TuningConfig(block_m=16, block_n=32, num_warps=2, split_k=4,
                            unpack="ptx")
  for fn, a in [(kq.qmatmul_fwd.fwd, (16, k)), (kq.qmatmul_dx.dx, (16, n)),
                (functools.partial(kq.qmatmul_fwd.fwd, tuning=fma), (1, k)),
                (functools.partial(kq.qmatmul_fwd.fwd, tuning=ahead), (16, k)),
                (functools.partial(kq.qmatmul_fwd.fwd, tuning=ptx), (1, k)),
                (functools.partial(kq.qmatmul_dx.dx, tuning=ahead), (16, n))]:
    _assert_no_float_weight(_cuda_text(fn, a, w), n, k)


@pytest.mark.parametrize("lookup", tuning.LOOKUPS)
def test_gpu_lowering_of_codebook_lookups(lookup):
  """NF4 lowers for CUDA under both lookups (mma, fma and dx) without a
  float weight; only "gather" passes the 16 levels as an operand."""
  n, k = 256, 512
  w = qa.abstract_qarray((n, k), qa.QuantConfig(
      bits=4, group_size=64, symmetric=True, codebook="nf4"))
  mma = tuning.TuningConfig(block_m=16, block_n=64, lookup=lookup)
  fma = tuning.TuningConfig(block_m=1, block_n=64, contraction="fma",
                            scale_mode="weights", split_k=2, lookup=lookup)
  for fn, a in [(functools.partial(kq.qmatmul_fwd.fwd, tuning=mma), (16, k)),
                (functools.partial(kq.qmatmul_fwd.fwd, tuning=fma), (1, k)),
                (functools.partial(kq.qmatmul_dx.dx, tuning=mma), (16, n))]:
    text = _cuda_text(fn, a, w)
    _assert_no_float_weight(text, n, k)
    assert ("tensor<16xf32>" in text) == (lookup == "gather")


def test_decode_table_is_run_two_sweep_winner():
  """fwd decode: block_n 64, 4 warps, 3 stages, split 4 (measured best);
  dx decode still splits toward DECODE_TARGET_PROGRAMS programs."""
  for m, n in ((1, 4096), (16, 11008)):
    cfg = tuning.choose("fwd", m, n, 4096, 4)
    assert (cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.split_k) == (
        64, 4, 3, 4)
  dx = tuning.choose("dx", 1, 4096, 4096, 4)
  word_tiles = (4096 // 8) // dx.block_k
  assert dx.split_k == min(tuning.MAX_SPLIT,
                           -(-tuning.DECODE_TARGET_PROGRAMS // word_tiles))


@pytest.mark.parametrize("op", ["fwd", "dx"])
def test_choose_takes_the_probe_winners(op):
  """PTX unpacking for 2/4-bit decode with 16-bit activations only; the
  select-tree lookup for codebook codes at every M, and with 16-bit
  activations their PTX lookup at decode."""
  for bits, dtype, m, want in [(4, jnp.bfloat16, 1, "ptx"),
                               (2, jnp.float16, 16, "ptx"),
                               (4, jnp.float32, 1, "jnp"),
                               (4, None, 1, "jnp"),
                               (3, jnp.bfloat16, 1, "ptx"),
                               (3, jnp.float32, 1, "jnp"),
                               (3, jnp.bfloat16, 256, "jnp"),
                               (8, jnp.bfloat16, 1, "jnp"),
                               (4, jnp.bfloat16, 256, "jnp"),
                               (4, jnp.bfloat16, 4096, "jnp")]:
    cfg = tuning.choose(op, m, 4096, 4096, bits, dtype=dtype)
    assert (cfg.unpack, cfg.lookup) == (want, "gather"), (bits, dtype, m)
  for m in (1, 16, 256, 4096):
    cfg = tuning.choose(op, m, 4096, 4096, 4, codebook=True,
                        dtype=jnp.bfloat16)
    want = "ptx" if m <= 16 else "jnp"
    assert (cfg.unpack, cfg.lookup) == (want, "select"), m
    # Training keeps one bf16 rounding per weight, not per level (the
    # QLoRA check's gradient bound, tuning._PTX_CODEBOOK).
    assert cfg.scale_mode == ("activations" if m <= 16 else "weights"), m
    f32 = tuning.choose(op, m, 4096, 4096, 4, codebook=True,
                        dtype=jnp.float32)
    assert (f32.unpack, f32.lookup) == ("jnp", "select"), m


def test_decode_geometry_is_the_probe_winners():
  """With PTX unpacking: fwd 4-bit takes 32-row programs of 2 warps, split
  toward FWD4_TARGET_PROGRAMS programs (at most 4 ways), 2-bit the table's
  64 / 4 split 4 ways; dx takes a 64-word tile (and splits toward
  DECODE_TARGET_PROGRAMS from it), 4-bit dx 128-row steps. 3-bit fwd
  decode pipelines two stages deep, other widths and prefill three; 3-bit
  dx decode takes 128-row steps, NF4 decode the 4-bit geometry (fwd split
  8 ways)."""
  for bits, n, want in ((4, 4096, (32, 2, 4)), (4, 11008, (32, 2, 2)),
                        (4, 40960, (32, 2, 1)), (2, 11008, (64, 4, 4))):
    cfg = tuning.choose("fwd", 1, n, 4096, bits, dtype=jnp.bfloat16)
    assert (cfg.block_n, cfg.num_warps, cfg.split_k) == want, (bits, n)
  for bits, block_n in ((2, 256), (4, 128)):
    dx = tuning.choose("dx", 16, 4096, 4096, bits, dtype=jnp.float16)
    assert (dx.block_k, dx.block_n) == (64, block_n), bits
    word_tiles = (4096 // (8 // bits)) // 64
    assert dx.split_k == min(tuning.MAX_SPLIT,
                             -(-tuning.DECODE_TARGET_PROGRAMS // word_tiles))
  for bits, m, want in ((3, 1, 2), (3, 16, 2), (3, 256, 3), (4, 1, 3),
                        (8, 1, 3)):
    cfg = tuning.choose("fwd", m, 4096, 4096, bits, dtype=jnp.bfloat16)
    assert cfg.num_stages == want, (bits, m)
  dx3 = tuning.choose("dx", 1, 4096, 4096, 3)
  assert (dx3.num_stages, dx3.block_n) == (3, 128)
  nf4 = tuning.choose("fwd", 1, 4096, 4096, 4, codebook=True,
                      dtype=jnp.bfloat16)
  assert (nf4.block_n, nf4.num_warps, nf4.split_k) == (32, 2, 8)
  nf4_dx = tuning.choose("dx", 1, 4096, 4096, 4, codebook=True,
                         dtype=jnp.bfloat16)
  assert (nf4_dx.block_k, nf4_dx.block_n) == (64, 128)


def test_prefill_takes_the_probe_winners():
  """M = 256: dx 64-row tiles, half the word tile, split in two; fwd 128 x 64
  tiles split in two, only where the training tiles give too few programs.
  M = 4096 keeps the training entry."""
  dx = tuning.choose("dx", 256, 11008, 4096, 4, dtype=jnp.bfloat16)
  train_dx = tuning.choose("dx", 4096, 11008, 4096, 4, dtype=jnp.bfloat16)
  assert (dx.block_m, dx.block_k, dx.split_k) == (64, 32, 2)
  assert (train_dx.block_m, train_dx.block_k, train_dx.split_k) == (128, 64, 1)
  small = tuning.choose("fwd", 256, 4096, 4096, 4, dtype=jnp.bfloat16)
  wide = tuning.choose("fwd", 256, 11008, 4096, 4, dtype=jnp.bfloat16)
  train = tuning.choose("fwd", 4096, 4096, 4096, 4, dtype=jnp.bfloat16)
  assert (small.block_m, small.block_n, small.num_warps,
          small.split_k) == (128, 64, 4, 2)
  assert wide == train
  assert (train.block_m, train.block_n) == (256, 128)


def test_default_kernels_take_the_chosen_config():
  """With `tuning=None` the kernels read the codebook and dtype into
  `choose`: a bf16 NF4 decode lowers without the levels operand (select),
  a bf16 4-bit decode with the PTX unpacking."""
  n, k = 256, 512
  nf4 = qa.abstract_qarray((n, k), qa.QuantConfig(
      bits=4, group_size=64, symmetric=True, codebook="nf4"))
  text = _cuda_text(kq.qmatmul_fwd.fwd, (1, k), nf4)
  assert "tensor<16xf32>" not in text
  uniform = qa.abstract_qarray((n, k), qa.QuantConfig(bits=4, group_size=64))
  for fn, a in [(kq.qmatmul_fwd.fwd, (1, k)), (kq.qmatmul_dx.dx, (1, n))]:
    assert "prmt.b32" in _cuda_text(fn, a, uniform)


def _emulate_ptx(asm: str, regs: dict) -> dict:
  """Runs the PTX instructions `tiles._unpack_ptx`, `_unpack8_bf16_ptx` and
  `_lookup_ptx` emit (mov, and, or, xor, shl, shr, lop3, prmt with its
  sign-replicate mode, fma.rn.bf16x2) on uint32 numpy registers; `regs`
  maps "$n" / names to arrays."""
  def val(tok):
    tok = tok.strip()
    if tok in regs:
      return np.asarray(regs[tok], np.uint32)
    return np.uint32(int(tok, 0))

  for line in asm.splitlines():
    line = line.strip().rstrip(";")
    if not line or line in "{}" or line.startswith(".reg"):
      continue
    op, args = line.split(None, 1)
    d, *src = [a.strip() for a in args.split(",")]
    if op == "prmt.b32":  # byte i of d: byte (selector nibble i & 7) of
      a, b, sel = val(src[0]), val(src[1]), val(src[2])  # {b, a}; nibble
      pool = [(a >> (8 * j)) & 0xFF for j in range(4)] + [  # bit 3: that
          (b >> (8 * j)) & 0xFF for j in range(4)]  # byte's sign, replicated
      out = np.uint32(0)
      for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = np.choose(nib & 7, np.broadcast_arrays(*pool))
        byte = np.where(nib & 8, np.where(byte & 0x80, 0xFF, 0), byte)
        out = out | (np.asarray(byte, np.uint32) << (8 * i))
      regs[d] = out
    elif op == "mov.b32":
      regs[d] = val(src[0])
    elif op == "xor.b32":
      regs[d] = val(src[0]) ^ val(src[1])
    elif op == "fma.rn.bf16x2":  # per 16-bit half: a * b + c, rounded
      halves = [np.stack([(val(t) & 0xFFFF), val(t) >> 16], -1).astype(
          np.uint16).view(jnp.bfloat16).astype(np.float32) for t in src]
      res = (halves[0] * halves[1] + halves[2]).astype(jnp.bfloat16)
      bits16 = res.view(np.uint16).astype(np.uint32)
      regs[d] = bits16[..., 0] | (bits16[..., 1] << 16)
    elif op == "and.b32":
      regs[d] = val(src[0]) & val(src[1])
    elif op == "or.b32":
      regs[d] = val(src[0]) | val(src[1])
    elif op == "shl.b32":
      regs[d] = val(src[0]) << int(src[1])
    elif op == "shr.u32":
      regs[d] = val(src[0]) >> int(src[1])
    elif op == "lop3.b32":  # bit k of d: bit (a_k b_k c_k) of the LUT
      a, b, c, lut = val(src[0]), val(src[1]), val(src[2]), int(src[3], 0)
      out = np.uint32(0)
      for idx in range(8):
        if lut >> idx & 1:
          out = out | ((a if idx & 4 else ~a) & (b if idx & 2 else ~b)
                       & (c if idx & 1 else ~c))
      regs[d] = out
    else:
      raise AssertionError(f"unexpected instruction {op}")
    regs[d] = np.asarray(regs[d], np.uint32)
  return regs


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_ptx_lookup_text_computes_the_levels(dtype):
  """Each NF4 plane's PTX lookup, run by the emulator on random bytes (every
  code in every position), gives exactly the jnp form's levels rounded to
  the dtype, in Triton's packing (as the uniform unpacking's test)."""
  layout = tiles.layout_of(_q(bits=4, group=64, n=4, k=128, symmetric=True,
                              codebook="nf4"))
  byte_rows = np.random.randint(0, 256, (256, 4), dtype=np.uint8)
  byte_rows[:16, 0] = np.arange(16) * 17  # both nibbles take all 16 codes
  packed = byte_rows.view("<u4")[:, 0]
  want = tiles.level_planes(jnp.asarray(byte_rows), layout, dtype, ptx=False)
  patterns = tiles.level_patterns(layout.codebook, dtype)
  assert len(set(patterns)) == 16
  for i in range(2):
    _assert_ptx_gives(tiles._lookup_ptx(patterns, i), packed, want[i], dtype)  # pylint: disable=protected-access


def _assert_ptx_gives(asm_and_constraints, packed, want, dtype):
  """The PTX block, emulated on the uint32 registers `packed` (4 bytes each;
  a list: one per input byte tile), returns exactly `want` `(rows, 4)` in
  `dtype`, in Triton's packing."""
  asm, constraints = asm_and_constraints
  packed = packed if isinstance(packed, list) else [packed]
  assert constraints == "=r,=r," + ",".join("r" * len(packed))
  regs = _emulate_ptx(asm, {f"${2 + t}": p for t, p in enumerate(packed)})
  halves = np.stack([regs["$0"], regs["$1"]], axis=1)
  got = halves.view("<u2").view(np.dtype(jnp.dtype(dtype)))
  np.testing.assert_array_equal(got.astype(np.float32),
                                np.asarray(want, np.float32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_ptx_unpack_text_computes_the_biased_planes(bits, dtype):
  """Each plane's PTX, run by an emulator of its opcodes on random bytes,
  gives exactly the jnp form's `bias + code`, with Triton's packing (4
  bytes in one register per byte tile, element 0 lowest; four 16-bit
  results in two registers, elements 0-1 then 2-3). 3-bit: three byte
  tiles, planes 2 and 5 straddling two of them; 8-bit in bf16: `q - 128`,
  every byte value."""
  layout = tiles.layout_of(_q(bits=bits, group=64, n=4, k=128))
  byte_tiles = [np.random.randint(0, 256, (64, 4), dtype=np.uint8)
                for _ in range(layout.nbytes)]
  byte_tiles[0][:] = np.arange(256, dtype=np.uint8).reshape(64, 4)
  pattern = {jnp.dtype(jnp.bfloat16): 0x4300, jnp.dtype(jnp.float16): 0x6400}[
      jnp.dtype(dtype)]
  packed = [b.view("<u4")[:, 0] for b in byte_tiles]
  want = tiles.biased_planes(tuple(jnp.asarray(b) for b in byte_tiles),
                             layout, dtype, ptx=False)
  assert len(want) == layout.planes == {2: 4, 3: 8, 4: 2, 8: 1}[bits]
  for i in range(layout.planes):
    text = (tiles._unpack8_bf16_ptx()  # pylint: disable=protected-access
            if bits == 8 and jnp.dtype(dtype) == jnp.bfloat16
            else tiles._unpack_ptx(bits, pattern, i))  # pylint: disable=protected-access
    _assert_ptx_gives(text, packed, want[i], dtype)
  if bits == 8 and jnp.dtype(dtype) == jnp.bfloat16:
    np.testing.assert_array_equal(np.asarray(want[0], np.float32),
                                  byte_tiles[0].astype(np.float32) - 128)


def test_unpack_is_checked():
  with pytest.raises(ValueError, match="unpack must be one of"):
    tuning.TuningConfig(unpack="asm")
  with pytest.raises(ValueError, match="split_reduce must be one of"):
    tuning.TuningConfig(split_reduce="atomic")
  with pytest.raises(ValueError, match="scale_mode='activations'"):
    tuning.TuningConfig(unpack="ptx", scale_mode="weights")
  with pytest.raises(ValueError, match="unpack='ptx' takes uniform 2-, 3-"):
    tiles.ptx_flag("ptx", tiles.layout_of(_q(bits=4, group=32)),
                   jnp.float32, interpret=False)
  for bits in (3, 8):
    layout = tiles.layout_of(_q(bits=bits, group=32, k=256))
    assert tiles.ptx_unpack_supported(layout, jnp.float16)
    assert tiles.ptx_unpack_supported(layout, jnp.bfloat16)
    assert not tiles.ptx_unpack_supported(layout, jnp.float32)
  nf4 = tiles.layout_of(_q(bits=4, group=64, symmetric=True, codebook="nf4"))
  assert tiles.ptx_unpack_supported(nf4, jnp.bfloat16)
  assert not tiles.ptx_unpack_supported(nf4, jnp.float32)


def test_gpu_lowering_of_ptx_unpack():
  """`unpack="ptx"` lowers for CUDA (fwd and dx), its PTX inlined: uniform
  2/3/4/8-bit codes and NF4 levels."""
  n, k = 256, 512
  nf4 = qa.QuantConfig(bits=4, group_size=64, symmetric=True, codebook="nf4")
  for qcfg in (qa.QuantConfig(bits=2, group_size=64),
               qa.QuantConfig(bits=3, group_size=64),
               qa.QuantConfig(bits=4, group_size=64),
               qa.QuantConfig(bits=8, group_size=64), nf4):
    w = qa.abstract_qarray((n, k), qcfg)
    cfg = tuning.TuningConfig(block_m=16, block_n=64, split_k=2,
                              scale_mode="activations", unpack="ptx")
    for fn, a in [(functools.partial(kq.qmatmul_fwd.fwd, tuning=cfg), (1, k)),
                  (functools.partial(kq.qmatmul_dx.dx, tuning=cfg), (1, n))]:
      text = _cuda_text(fn, a, w)
      _assert_no_float_weight(text, n, k)
      assert "prmt.b32" in text and (
          "fma.rn.bf16x2" if qcfg.bits == 8 else "lop3.b32") in text


def test_gpu_lowering_of_split_reduced_in_kernel():
  """`split_reduce="kernel"` lowers for CUDA (fwd, dx) with its atomic
  arrival counter, and the program holds no second (reduction) kernel."""
  n, k = 256, 512
  w = qa.abstract_qarray((n, k), qa.QuantConfig(bits=4, group_size=64))
  cfg = tuning.TuningConfig(block_m=16, block_n=64, split_k=4,
                            split_reduce="kernel")
  for fn, a in [(functools.partial(kq.qmatmul_fwd.fwd, tuning=cfg), (1, k)),
                (functools.partial(kq.qmatmul_dx.dx, tuning=cfg), (1, n))]:
    text = _cuda_text(fn, a, w)
    _assert_no_float_weight(text, n, k)
    assert "atomic_rmw" in text and "reduce(" not in text, text[-2000:]
