"""Multi-head attention with grouped KV heads (MHA/GQA/MQA) and softmax or Scalable-Softmax scoring.

`attention_weights` / `attend` are the scoring core shared with Multi-head Latent Attention; `Attention` is the
MHA/GQA module (projections, RoPE, KV cache).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from superlm_jax.layers.cache import write_at
from superlm_jax.layers.initializers import param
from superlm_jax.layers.rope import YaRN, apply_rope

_MASKED = -1e30  # Finite, so a fully masked row gives a uniform (not NaN) softmax; such rows are never read.


def causal_mask(query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
  """[batch, q, k] bool: key j is visible to query i iff pos_j <= pos_i (absolute positions; cache slots past a row's
  length always have larger positions than its queries, so they are excluded too)."""
  return key_positions[:, None, :] <= query_positions[:, :, None]


def ssmax_multiplier(mask: jax.Array, scale: jax.Array, bias: jax.Array | None) -> jax.Array:
  """Scalable-Softmax (Nakanishi 2025, arXiv 2501.19399, eq. 2): logits of query i are multiplied by
  s_h * log(n_i) (+ b_h in the bias variant), where n_i is the number of keys query i can attend to.

  n_i is counted from the mask itself: i+1 under the causal mask in training, the cache length at decode. (The
  seed used the full sequence length for every row, so training and cached decoding disagreed.)
  Returns [batch, heads, q] to broadcast over keys.
  """
  n = jnp.sum(mask, axis=-1).astype(jnp.float32)  # [batch, q]
  mult = scale[None, :, None] * jnp.log(jnp.maximum(n, 1.0))[:, None, :]
  if bias is not None:
    mult = mult + bias[None, :, None]
  return mult


def attention_weights(logits: jax.Array, mask: jax.Array, *, ssmax_scale: jax.Array | None = None,
                      ssmax_bias: jax.Array | None = None) -> jax.Array:
  """Softmax (or SSMax) over keys of already-scaled logits [batch, heads, q, k] (any head grouping flattened into
  `heads`), in float32. `mask` is [batch, q, k]."""
  logits = logits.astype(jnp.float32)
  if ssmax_scale is not None:
    logits = logits * ssmax_multiplier(mask, ssmax_scale, ssmax_bias)[..., None]
  logits = jnp.where(mask[:, None, :, :], logits, _MASKED)
  return jax.nn.softmax(logits, axis=-1)


class Attention(nnx.Module):
  """Causal self-attention with `num_kv_heads` key/value heads shared by groups of query heads
  (Ainslie et al. 2023, GQA; num_kv_heads == num_heads is MHA, 1 is MQA)."""

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *, use_bias: bool,
               rope_theta: float | None, scoring: str, ssmax_bias: bool, std: float, out_std: float,
               rngs: nnx.Rngs, yarn: YaRN | None = None):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta = rope_theta  # None: no rotary embedding (learned positions are added at the input, or NoPE).
    self.yarn = yarn
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
               lengths: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
    """x [batch, seq, dim], positions [batch, seq]. With a cache (and per-row `lengths`), the new keys/values
    are written at positions [lengths, lengths + seq) and the queries attend over the whole buffer."""
    q = self._project(x, self.wq, self.bq)
    k = self._project(x, self.wk, self.bk)
    v = self._project(x, self.wv, self.bv)
    if self.rope_theta is not None:
      q = apply_rope(q, positions, self.rope_theta, self.yarn)
      k = apply_rope(k, positions, self.rope_theta, self.yarn)
    if cache is None:
      key_positions = positions
    else:
      cache = {"k": write_at(cache["k"], k, lengths), "v": write_at(cache["v"], v, lengths)}
      k, v = cache["k"].astype(x.dtype), cache["v"].astype(x.dtype)
      key_positions = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (k.shape[0], k.shape[1]))
    mask = causal_mask(positions, key_positions)

    batch, seq = x.shape[:2]
    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(batch, seq, self.num_kv_heads, groups, self.head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) / math.sqrt(self.head_dim)
    logits = logits.reshape(batch, self.num_heads, seq, -1)
    probs = attention_weights(
        logits, mask,
        ssmax_scale=None if self.ssmax_scale is None else self.ssmax_scale[...],
        ssmax_bias=None if self.ssmax_bias is None else self.ssmax_bias[...])
    probs = probs.reshape(batch, self.num_kv_heads, groups, seq, -1).astype(x.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(batch, seq, self.num_heads, self.head_dim)
    y = jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(x.dtype))
    if self.bo is not None:
      y = y + self.bo[...].astype(x.dtype)
    return y, cache
