"""Multi-head Latent Attention against a float64 NumPy formula, and absorbed == expanded."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from superlm_jax.layers.mla import MultiHeadLatentAttention


def np64(a):
  return np.asarray(a, np.float64)


def rms(x, scale, eps):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale


def rope(x, positions, theta):
  """Rotate pairs (j, j + d/2) by positions * theta^(-2j/d), as complex numbers. x [..., seq, d]."""
  d = x.shape[-1]
  freqs = theta ** (-np.arange(0, d, 2) / d)
  z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * positions[:, None] * freqs)
  return np.concatenate([z.real, z.imag], axis=-1)


def naive_mla(attn: MultiHeadLatentAttention, x, ssmax=False):
  """DeepSeek-V2 eq. 9-19 written per token and head in float64 (expanded keys and values)."""
  x = np64(x)
  batch, seq, _ = x.shape
  pos = np.arange(seq)
  eps = attn.kv_norm.eps
  if attn.wq is not None:
    q = np.einsum("btd,dhk->bthk", x, np64(attn.wq[...]))
  else:
    cq = rms(x @ np64(attn.wq_down[...]), np64(attn.q_norm.scale[...]), attn.q_norm.eps)
    q = np.einsum("btr,rhk->bthk", cq, np64(attn.wq_up[...]))
  n, r = attn.nope_dim, attn.rope_dim
  c_kv = rms(x @ np64(attn.wkv_down[...]), np64(attn.kv_norm.scale[...]), eps)
  k_nope = np.einsum("btc,chn->bthn", c_kv, np64(attn.wk_up[...]))
  v = np.einsum("btc,chv->bthv", c_kv, np64(attn.wv_up[...]))
  out = np.zeros((batch, seq, attn.num_heads, attn.v_dim))
  for b in range(batch):
    k_rope = rope(x[b] @ np64(attn.wk_rope[...]), pos, attn.rope_theta) if r else np.zeros((seq, 0))
    for h in range(attn.num_heads):
      q_rope = rope(q[b, :, h, n:], pos, attn.rope_theta) if r else np.zeros((seq, 0))
      for i in range(seq):
        logits = np.array([(q[b, i, h, :n] @ k_nope[b, j, h] + q_rope[i] @ k_rope[j]) for j in range(i + 1)])
        logits /= math.sqrt(n + r)
        if ssmax:
          logits *= float(attn.ssmax_scale[...][h]) * math.log(i + 1)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[b, i, h] = p @ v[b, :i + 1, h]
  return np.einsum("bthv,hvd->btd", out, np64(attn.wo[...]))


def make_mla(q_lora=0, rope_dim=8, scoring="softmax", seed=0, form="auto"):
  """An MLA layer with random weights and norm scales; the same `seed` gives the same weights whatever the form."""
  attn = MultiHeadLatentAttention(32, 4, q_lora_rank=q_lora, kv_lora_rank=12, qk_nope_head_dim=6,
                                  qk_rope_head_dim=rope_dim, v_head_dim=5, rope_theta=100.0, norm_eps=1e-6,
                                  scoring=scoring, ssmax_bias=False, std=0.4, out_std=0.4, rngs=nnx.Rngs(seed),
                                  form=form)
  rng = np.random.default_rng(seed)
  for norm in (attn.kv_norm, attn.q_norm):  # random norm scales, not the init ones
    if norm is not None:
      norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, norm.scale[...].shape), jnp.float32)
  if attn.ssmax_scale is not None:
    attn.ssmax_scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
  return attn


CASES = [dict(q_lora=0, rope_dim=8), dict(q_lora=10, rope_dim=8), dict(q_lora=10, rope_dim=0),
         dict(q_lora=0, rope_dim=4, scoring="ssmax")]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", ["expanded", "absorbed"])
def test_mla_matches_float64_formula(case, form):
  attn = make_mla(**case, seed=1, form=form)
  x = jax.random.normal(jax.random.key(2), (2, 9, 32))
  got, _ = attn(x, jnp.broadcast_to(jnp.arange(9), (2, 9)))
  want = naive_mla(attn, x, ssmax=case.get("scoring") == "ssmax")
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_absorbed_equals_expanded_at_decode_after_prefill(case):
  """Prefill 7 tokens with the expanded form, then decode 5 steps with each form: equal to float32 rounding."""
  prefill = make_mla(**case, seed=3, form="expanded")
  x = jax.random.normal(jax.random.key(4), (2, 12, 32))
  outputs = {}
  for form in ("expanded", "absorbed"):
    cache = prefill.init_cache(2, 16, jnp.float32)
    lengths = jnp.zeros((2,), jnp.int32)
    y, cache = prefill(x[:, :7], jnp.broadcast_to(jnp.arange(7), (2, 7)), cache, lengths)
    attn = make_mla(**case, seed=3, form=form)  # the same weights, decoding in `form`
    steps = [y]
    for t in range(7, 12):
      lengths = jnp.full((2,), t, jnp.int32)
      y, cache = attn(x[:, t:t + 1], jnp.full((2, 1), t), cache, lengths)
      steps.append(y)
    outputs[form] = np.asarray(jnp.concatenate(steps, 1))
  np.testing.assert_allclose(outputs["absorbed"], outputs["expanded"], rtol=1e-4, atol=1e-5)
  full, _ = attn(x, jnp.broadcast_to(jnp.arange(12), (2, 12)))
  np.testing.assert_allclose(outputs["absorbed"], np.asarray(full), rtol=1e-4, atol=1e-5)


def test_cache_holds_only_the_latent_and_shared_rotary_key():
  attn = make_mla(q_lora=10, rope_dim=8)
  cache = attn.init_cache(3, 20, jnp.bfloat16)
  assert {k: v.shape for k, v in cache.items()} == {"c_kv": (3, 20, 12), "k_rope": (3, 20, 8)}
