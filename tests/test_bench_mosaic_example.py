"""experiments/bench_mosaic_example.py on the CPU: its configs fit the
shapes by the example kernel's own rules, and it refuses to run off a GPU."""

import pytest

from experiments import bench_kernels
from experiments import bench_mosaic_example as bench


@pytest.mark.parametrize("n,k", bench_kernels.SHAPES)
def test_configs_tile_the_transposed_output(n, k):
  del k  # the contraction only needs tile_k | K, true for every config here
  ex = bench._example()  # pylint: disable=protected-access
  cfgs = bench.configs(n, bench.M_TOKENS)
  assert cfgs, (n, bench.M_TOKENS)
  for cfg in cfgs:
    assert isinstance(cfg, ex.TuningConfig)
    split_m = cfg.wg_dimension == ex.MatmulDimension.M
    assert n % (cfg.tile_m * (2 if split_m else 1)) == 0
    assert bench.M_TOKENS % (cfg.tile_n * (1 if split_m else 2)) == 0
    assert cfg.tile_m % cfg.epi_tile_m == 0 and cfg.tile_n % cfg.epi_tile_n == 0


def test_refuses_without_a_gpu(tmp_path):
  with pytest.raises(SystemExit, match="needs a Hopper GPU"):
    bench.main(["--out", str(tmp_path)])
  assert not list(tmp_path.iterdir())
