"""Attention layers against naive float64 NumPy formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from superlm_jax.layers.attention import Attention
from superlm_jax.layers.rope import apply_rope


def naive_attention(x, wq, wk, wv, wo, *, ssmax_scale=None, ssmax_bias=None, rope_theta=None, ssmax_fixed_n=None):
  """Float64 loops: per head, per query row i, softmax over keys 0..i of (q.k / sqrt(d)) [* (s log(i+1) + b)].
  `ssmax_fixed_n` reproduces the reference project's bug (n = sequence length for every row)."""
  x, wq, wk, wv, wo = (np.asarray(a, np.float64) for a in (x, wq, wk, wv, wo))
  batch, seq, _ = x.shape
  heads, kv_heads, d = wq.shape[1], wk.shape[1], wq.shape[2]
  q = np.einsum("btd,dhk->bthk", x, wq)
  k = np.einsum("btd,dhk->bthk", x, wk)
  v = np.einsum("btd,dhk->bthk", x, wv)
  if rope_theta is not None:
    q, k = naive_rope(q, rope_theta), naive_rope(k, rope_theta)
  out = np.zeros((batch, seq, heads, d))
  for b in range(batch):
    for h in range(heads):
      kh = h // (heads // kv_heads)
      for i in range(seq):
        logits = np.array([q[b, i, h] @ k[b, j, kh] for j in range(i + 1)]) / math.sqrt(d)
        if ssmax_scale is not None:
          n = i + 1 if ssmax_fixed_n is None else ssmax_fixed_n  # keys visible to row i (causal mask)
          logits = logits * (ssmax_scale[h] * math.log(n) + (0.0 if ssmax_bias is None else ssmax_bias[h]))
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[b, i, h] = sum(p[j] * v[b, j, kh] for j in range(i + 1))
  return np.einsum("bthk,hkd->btd", out, np.asarray(wo, np.float64))


def naive_rope(x, theta):
  """Rotation of each pair (j, j + d/2) by angle pos * theta^(-2j/d), written with complex numbers."""
  d = x.shape[-1]
  pos = np.arange(x.shape[1])[None, :, None, None]
  freqs = theta ** (-np.arange(0, d, 2) / d)
  z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * pos * freqs)
  return np.concatenate([z.real, z.imag], axis=-1)


def make_attention(heads, kv_heads, scoring="softmax", ssmax_bias=False, rope_theta=None, seed=0):
  attn = Attention(24, heads, kv_heads, 6, use_bias=False, rope_theta=rope_theta, scoring=scoring,
                   ssmax_bias=ssmax_bias, std=0.3, out_std=0.3, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  if attn.ssmax_scale is not None:  # random per-head values, not the init 1 / 0
    attn.ssmax_scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, heads), jnp.float32)
  if attn.ssmax_bias is not None:
    attn.ssmax_bias[...] = jnp.asarray(rng.uniform(-0.5, 0.5, heads), jnp.float32)
  return attn


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("scoring,ssmax_bias", [("softmax", False), ("ssmax", False), ("ssmax", True)])
def test_attention_matches_float64_formula(heads, kv_heads, scoring, ssmax_bias):
  attn = make_attention(heads, kv_heads, scoring, ssmax_bias, seed=heads + kv_heads)
  x = jax.random.normal(jax.random.key(1), (2, 11, 24))
  positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
  got, _ = attn(x, positions)
  want = naive_attention(
      x, attn.wq[...], attn.wk[...], attn.wv[...], attn.wo[...],
      ssmax_scale=None if attn.ssmax_scale is None else np.asarray(attn.ssmax_scale[...]),
      ssmax_bias=None if attn.ssmax_bias is None else np.asarray(attn.ssmax_bias[...]))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_ssmax_differs_from_softmax_and_uses_row_lengths():
  """SSMax must scale each row by log(i+1), not log(seq): rows near the start differ most from a constant scale."""
  attn = make_attention(4, 4, "ssmax", seed=3)
  x = jax.random.normal(jax.random.key(2), (1, 16, 24))
  positions = jnp.arange(16)[None]
  got, _ = attn(x, positions)
  weights = (attn.wq[...], attn.wk[...], attn.wv[...], attn.wo[...])
  scale = np.asarray(attn.ssmax_scale[...])
  right = naive_attention(x, *weights, ssmax_scale=scale)
  seed_bug = naive_attention(x, *weights, ssmax_scale=scale, ssmax_fixed_n=16)
  np.testing.assert_allclose(np.asarray(got), right, rtol=1e-4, atol=1e-5)
  # The last row sees all 16 keys, so both agree there; earlier rows must not.
  np.testing.assert_allclose(right[:, -1], seed_bug[:, -1], rtol=1e-9)
  assert np.abs(right[:, 1:8] - seed_bug[:, 1:8]).max() > 1e-2


def test_rope_attention_matches_float64_formula():
  attn = make_attention(4, 2, rope_theta=10000.0, seed=5)
  x = jax.random.normal(jax.random.key(3), (2, 9, 24))
  got, _ = attn(x, jnp.broadcast_to(jnp.arange(9), (2, 9)))
  want = naive_attention(x, attn.wq[...], attn.wk[...], attn.wv[...], attn.wo[...], rope_theta=10000.0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  def score(pq, pk):
    return float(jnp.sum(apply_rope(q, jnp.array([[pq]]), 100.0) * apply_rope(k, jnp.array([[pk]]), 100.0)))
  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)
