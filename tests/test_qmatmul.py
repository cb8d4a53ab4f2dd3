"""qdot / linear: values and gradients against the float32 reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qft_jax._src import qarray as qa
from qft_jax._src import qmatmul as qm

HIGHEST = jax.lax.Precision.HIGHEST
CONFIGS = [
    qa.QuantConfig(bits=2, group_size=16),
    qa.QuantConfig(bits=3, group_size=32, symmetric=True),
    qa.QuantConfig(bits=4, group_size=-1),
    qa.QuantConfig(bits=8, group_size=64),
    qa.QuantConfig(bits=4, group_size=32, codebook="nf4"),
]


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _case(cfg, seed):
  kw, kx, kc = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = qa.quantize(jax.random.normal(kw, (24, 64)), cfg)
  x = jax.random.normal(kx, (3, 5, 64))
  cot = jax.random.normal(kc, (3, 5, 24))
  return q, x, cot


def _reference_loss(x, wd, cot):
  return jnp.sum(jnp.einsum("...k,nk->...n", x, wd, precision=HIGHEST) * cot)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_forward_and_input_grad(cfg):
  q, x, cot = _case(cfg, 0)
  wd = qa.dequantize(q)
  y = qm.qdot(x, q, implementation="xla")
  ref = jnp.einsum("...k,nk->...n", x, wd, precision=HIGHEST)
  assert _rel(y, ref) < 1e-5
  gx = jax.grad(lambda x: jnp.sum(qm.qdot(x, q) * cot))(x)
  gx_ref = jax.grad(_reference_loss)(x, wd, cot)
  assert _rel(gx, gx_ref) < 1e-5


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_scale_grad_matches_float_reference(cfg):
  q, x, cot = _case(cfg, 1)

  def ours(x, scale):
    return jnp.sum(qm.qdot(x, dataclasses.replace(q, scale=scale),
                           trainable="scale") * cot)

  def ref(x, scale):
    return _reference_loss(x, qa.dequantize(dataclasses.replace(q, scale=scale)),
                           cot)

  gx, gs = jax.grad(ours, (0, 1))(x, q.scale)
  rx, rs = jax.grad(ref, (0, 1))(x, q.scale)
  assert _rel(gx, rx) < 1e-5 and _rel(gs, rs) < 1e-5


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_weight_grad_through_probe(cfg):
  q, x, cot = _case(cfg, 2)
  probe = jnp.zeros(q.shape)
  gx, gw = jax.grad(
      lambda x, p: jnp.sum(qm.qdot(x, q, trainable="weight", weight_probe=p)
                           * cot), (0, 1))(x, probe)
  rx, rw = jax.grad(_reference_loss, (0, 1))(x, qa.dequantize(q), cot)
  assert _rel(gx, rx) < 1e-5 and _rel(gw, rw) < 1e-5


def test_frozen_mode_gives_no_scale_grad_and_float0_codes():
  q, x, cot = _case(CONFIGS[0], 3)
  g = jax.grad(lambda q: jnp.sum(qm.qdot(x, q) * cot), allow_int=True)(q)
  assert g.qvalue.dtype == jax.dtypes.float0
  np.testing.assert_array_equal(g.scale, 0.0)


def _residual_avals(fun, *args):
  """Avals of what `jax.vjp` keeps for the backward pass."""
  _, vjp_fn = jax.vjp(fun, *args)
  return [leaf for leaf in jax.tree.leaves(vjp_fn)
          if hasattr(leaf, "shape")]


def test_frozen_mode_keeps_no_float_copy_of_the_weight():
  n, k = 256, 512
  q = qa.quantize(jax.random.normal(jax.random.PRNGKey(4), (n, k)),
                  qa.QuantConfig(bits=4, group_size=64))
  x = jax.random.normal(jax.random.PRNGKey(5), (2, k))
  def holds_weight(saved):
    return any(jnp.issubdtype(l.dtype, jnp.floating) and l.size >= n * k
               for l in saved)

  # Negative control: differentiating through a plain dequantize keeps it.
  naive = _residual_avals(lambda x, s: x @ qa.dequantize(
      dataclasses.replace(q, scale=s)).T, x, q.scale)
  assert holds_weight(naive)
  saved = _residual_avals(lambda x: qm.qdot(x, q), x)
  assert saved, "expected residuals"
  assert not holds_weight(saved)
  for leaf in saved:
    is_float = jnp.issubdtype(leaf.dtype, jnp.floating)
    assert not (is_float and leaf.size >= n * k), (
        f"a float residual of shape {leaf.shape} holds the weight")
  # Also in the compiled backward: no (n, k) float buffer is an input to it.
  jaxpr = jax.make_jaxpr(jax.vjp(lambda x: qm.qdot(x, q), x)[1])(
      jnp.ones((2, n)))
  for var in jaxpr.jaxpr.invars + jaxpr.jaxpr.constvars:
    aval = var.aval
    assert not (jnp.issubdtype(aval.dtype, jnp.floating)
                and aval.size >= n * k), aval


def test_linear_float_quantized_and_lora():
  kw, kx, ka, kb = jax.random.split(jax.random.PRNGKey(6), 4)
  w = jax.random.normal(kw, (24, 64))
  x = jax.random.normal(kx, (4, 64))
  lora = {"a": jax.random.normal(ka, (4, 64)), "b": jax.random.normal(kb,
                                                                      (24, 4))}
  merged = w + 0.5 * lora["b"] @ lora["a"]
  ref = jnp.dot(x, merged.T, precision=HIGHEST)
  assert _rel(qm.linear(x, w, lora=lora, lora_scale=0.5), ref) < 1e-5
  q = qa.quantize(w, qa.QuantConfig(bits=8, group_size=32))
  ref_q = jnp.dot(x, (qa.dequantize(q) + 0.5 * lora["b"] @ lora["a"]).T,
                  precision=HIGHEST)
  assert _rel(qm.linear(x, q, lora=lora, lora_scale=0.5), ref_q) < 1e-5
  # LoRA gradients equal those of the merged float weight.
  ga = jax.grad(lambda l: jnp.sum(qm.linear(x, q, lora=l, lora_scale=0.5)))(
      lora)
  gb = jax.grad(lambda l: jnp.sum(jnp.dot(
      x, (qa.dequantize(q) + 0.5 * l["b"] @ l["a"]).T, precision=HIGHEST)))(
          lora)
  assert _rel(ga["a"], gb["a"]) < 1e-5 and _rel(ga["b"], gb["b"]) < 1e-5


def test_bad_inputs():
  q = qa.quantize(jnp.ones((8, 64)), qa.QuantConfig(bits=4, group_size=32))
  with pytest.raises(ValueError, match="shape mismatch"):
    qm.qdot(jnp.ones((2, 32)), q)
  with pytest.raises(ValueError, match="trainable must be one of"):
    qm.qdot(jnp.ones((2, 64)), q, trainable="bias")
  with pytest.raises(ValueError, match="implementation must be one of"):
    qm.qdot(jnp.ones((2, 64)), q, implementation="cuda")
  with pytest.raises(ValueError, match="weight_probe must be given"):
    qm.qdot(jnp.ones((2, 64)), q, trainable="weight")
  with pytest.raises(ValueError, match="batch axes"):
    qm.qdot(jnp.ones((2, 64)), jax.tree.map(lambda a: a[None], q))
  with pytest.raises(ValueError, match="linear shape mismatch"):
    qm.linear(jnp.ones((2, 64)), jnp.ones((8, 32)))
