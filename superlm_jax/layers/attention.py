"""Multi-head attention with grouped KV heads (MHA/GQA/MQA) and softmax or Scalable-Softmax scoring.

The module owns the projections, RoPE and the KV cache; the scoring itself (and the choice between the einsum
reference and tokamax's memory-efficient kernels) is `kernels.attention.dot_product_attention`, shared with
Multi-head Latent Attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from superlm_jax.kernels.attention import check_attention_impl, dot_product_attention
from superlm_jax.layers.cache import write_at
from superlm_jax.layers.initializers import param
from superlm_jax.layers.rope import YaRN, apply_rope

class Attention(nnx.Module):
  """Causal self-attention with `num_kv_heads` key/value heads shared by groups of query heads
  (Ainslie et al. 2023, GQA; num_kv_heads == num_heads is MHA, 1 is MQA)."""

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *, use_bias: bool,
               rope_theta: float | None, scoring: str, ssmax_bias: bool, std: float, out_std: float,
               rngs: nnx.Rngs, yarn: YaRN | None = None, impl: str = "auto"):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta = rope_theta  # None: no rotary embedding (learned positions are added at the input, or NoPE).
    self.yarn = yarn
    check_attention_impl(impl)
    self.impl = impl  # kernels/attention.py: how training and prefill attend
    self.wq = param(rngs, (dim, num_heads, head_dim), ("embed", "heads", "head_dim"), std=std)
    self.wk = param(rngs, (dim, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), std=std)
    self.wv = param(rngs, (dim, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), std=std)
    self.wo = param(rngs, (num_heads, head_dim, dim), ("heads", "head_dim", "embed"), std=out_std)
    if use_bias:
      self.bq = param(None, (num_heads, head_dim), ("heads", "head_dim"), value=0.0)
      self.bk = param(None, (num_kv_heads, head_dim), ("kv_heads", "head_dim"), value=0.0)
      self.bv = param(None, (num_kv_heads, head_dim), ("kv_heads", "head_dim"), value=0.0)
      self.bo = param(None, (dim,), ("embed",), value=0.0)
    else:
      self.bq = self.bk = self.bv = self.bo = None
    if scoring not in ("softmax", "ssmax"):
      raise ValueError(f"unknown attention scoring {scoring!r}")
    # SSMax's per-head s_h starts at 1 (Nakanishi 2025, sec. 3); the bias b_h at 0.
    self.ssmax_scale = param(None, (num_heads,), ("heads",), value=1.0) if scoring == "ssmax" else None
    self.ssmax_bias = param(None, (num_heads,), ("heads",), value=0.0) if scoring == "ssmax" and ssmax_bias else None

  # ------------------------------------------------------------------ cache
  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  # ------------------------------------------------------------------ forward
  def _project(self, x, w, b):
    y = jnp.einsum("btd,dhk->bthk", x, w[...].astype(x.dtype))
    return y if b is None else y + b[...].astype(x.dtype)

  def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None,
               lengths: jax.Array | None = None, segments: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
    """x [batch, seq, dim], positions [batch, seq]; `segments` [batch, seq]: document ids of packed rows (no
    attention across them). With a cache (and per-row `lengths`), the new keys/values are written at positions
    [lengths, lengths + seq) and the queries attend over the whole buffer."""
    q = self._project(x, self.wq, self.bq)
    k = self._project(x, self.wk, self.bk)
    v = self._project(x, self.wv, self.bv)
    if self.rope_theta is not None:
      q = apply_rope(q, positions, self.rope_theta, self.yarn)
      k = apply_rope(k, positions, self.rope_theta, self.yarn)
    if cache is None:
      key_positions, key_segments = positions, segments
    else:
      cache = {"k": write_at(cache["k"], k, lengths), "v": write_at(cache["v"], v, lengths)}
      k, v = cache["k"].astype(x.dtype), cache["v"].astype(x.dtype)
      key_positions = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (k.shape[0], k.shape[1]))
      key_segments = None
    out = dot_product_attention(
        q, k, v, scale=1.0 / math.sqrt(self.head_dim), q_positions=positions, kv_positions=key_positions,
        q_segments=None if cache is not None else segments, kv_segments=key_segments,
        self_attention=cache is None, impl=self.impl,
        ssmax_scale=None if self.ssmax_scale is None else self.ssmax_scale[...],
        ssmax_bias=None if self.ssmax_bias is None else self.ssmax_bias[...])
    y = jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(x.dtype))
    if self.bo is not None:
      y = y + self.bo[...].astype(x.dtype)
    return y, cache
