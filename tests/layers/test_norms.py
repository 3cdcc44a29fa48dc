import jax
import jax.numpy as jnp
import numpy as np

from superlm_jax.layers.norms import LayerNorm, RMSNorm


def test_layernorm_and_rmsnorm_match_float64():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, size=(3, 5, 16))
  scale, bias = rng.normal(size=16), rng.normal(size=16)
  ln = LayerNorm(16, eps=1e-5)
  ln.scale[...], ln.bias[...] = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
  want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * scale + bias
  np.testing.assert_allclose(np.asarray(ln(jnp.asarray(x, jnp.float32))), want, rtol=1e-4, atol=1e-5)

  rms = RMSNorm(16, eps=1e-6)
  rms.scale[...] = jnp.asarray(scale, jnp.float32)
  want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(np.asarray(rms(jnp.asarray(x, jnp.float32))), want, rtol=1e-4, atol=1e-5)


def test_norms_keep_input_dtype():
  x = jax.random.normal(jax.random.key(0), (2, 8)).astype(jnp.bfloat16)
  assert LayerNorm(8)(x).dtype == jnp.bfloat16
  assert RMSNorm(8)(x).dtype == jnp.bfloat16
