"""Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, sec. 2.1; same in DeepSeek-V3).

Keys and values of all heads are reconstructed from ONE shared latent per token, c_kv = RMSNorm(W_DKV h)
(eq. 9), of width `kv_lora_rank`; positions enter through a separate rotary part: per-head rotary queries and
ONE rotary key shared by all heads, k_rope = RoPE(W_KR h) (eq. 15, "decoupled RoPE"). So the decode cache holds
only c_kv and k_rope per token: kv_lora_rank + qk_rope_head_dim values instead of 2 * heads * head_dim for MHA.

Two computation forms, one set of weights:
  expanded   k_nope = W_UK c_kv and v = W_UV c_kv per head (eq. 10-11); used for training and prefill, where
             the up-projection is amortised over many queries.
  absorbed   q_nope . (W_UK c_kv) = (W_UK^T q_nope) . c_kv, so W_UK is folded into the query and scores are taken
             against the cached latent directly; likewise sum_j p_j W_UV c_j = W_UV sum_j p_j c_j, so W_UV is
             applied after attending over latents (sec. 2.1.2, "absorbed"). Used for single-token decode steps,
             where it reads the compact cache once and never materialises per-head keys/values.
Both give the same logits up to float rounding (tested).

The reference project's "MLA" had separate K/V latents, rotated by head index instead of position, cached full K/V, and
"absorbed" by multiplying the factors back into a full matrix. None of that is here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from superlm_jax.kernels.attention import (attention_weights, check_attention_impl, dot_product_attention,
                                           ssmax_multiplier, visible)
from superlm_jax.kernels.mla_decode import DECODE_IMPLS, mla_decode_attention, resolve_decode_impl
from superlm_jax.layers.cache import write_at
from superlm_jax.layers.initializers import param
from superlm_jax.layers.norms import RMSNorm
from superlm_jax.layers.rope import YaRN, apply_rope

FORMS = ("auto", "expanded", "absorbed")


class MultiHeadLatentAttention(nnx.Module):
  """DeepSeek MLA. `form` selects the computation: "auto" (absorbed for single-token cached decode steps,
  expanded otherwise), or forces "expanded" / "absorbed" everywhere (for comparisons and tests)."""

  def __init__(self, dim: int, num_heads: int, *, q_lora_rank: int, kv_lora_rank: int, qk_nope_head_dim: int,
               qk_rope_head_dim: int, v_head_dim: int, rope_theta: float, norm_eps: float, scoring: str,
               ssmax_bias: bool, std: float, out_std: float, rngs: nnx.Rngs, yarn: YaRN | None = None,
               impl: str = "auto", form: str = "auto", decode_impl: str = "xla"):
    self.num_heads = num_heads
    check_attention_impl(impl)
    self.impl = impl  # kernels/attention.py: how the expanded form (training, prefill) attends
    self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
    self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
    self.rope_theta, self.yarn = rope_theta, yarn
    # Softmax scale over the full q.k width; with YaRN, DeepSeek also multiplies it by mscale^2 (DeepSeek-V2's
    # long-context extension adjusts the attention entropy this way).
    self.softmax_scale = (1.0 / math.sqrt(qk_nope_head_dim + qk_rope_head_dim)
                          * (yarn.softmax_scale_factor() if yarn is not None else 1.0))
    if form not in FORMS:
      raise ValueError(f"unknown MLA form {form!r}; one of {FORMS}")
    self.form = form
    # Absorbed single-token decode steps: "xla" (the einsums below), "pallas" (the fused kernel in
    # kernels/mla_decode.py) or "auto" (pallas where it compiles natively).
    if decode_impl not in DECODE_IMPLS:  # here rather than at the first decode step
      raise ValueError(f"unknown decode impl {decode_impl!r}; one of {DECODE_IMPLS}")
    self.decode_impl = decode_impl
    qk_dim = qk_nope_head_dim + qk_rope_head_dim
    # Queries: direct (q_lora_rank = 0, DeepSeek-V2-Lite) or low-rank with a norm between (eq. 12-13).
    if q_lora_rank:
      self.wq_down = param(rngs, (dim, q_lora_rank), ("embed", "q_lora"), std=std)
      self.q_norm = RMSNorm(q_lora_rank, eps=norm_eps, axis_name="q_lora")
      self.wq_up = param(rngs, (q_lora_rank, num_heads, qk_dim), ("q_lora", "heads", "head_dim"), std=std)
      self.wq = None
    else:
      self.wq_down = self.q_norm = self.wq_up = None
      self.wq = param(rngs, (dim, num_heads, qk_dim), ("embed", "heads", "head_dim"), std=std)
    self.wkv_down = param(rngs, (dim, kv_lora_rank), ("embed", "kv_lora"), std=std)
    self.kv_norm = RMSNorm(kv_lora_rank, eps=norm_eps, axis_name="kv_lora")
    self.wk_rope = param(rngs, (dim, qk_rope_head_dim), ("embed", "head_dim"), std=std) if qk_rope_head_dim else None
    self.wk_up = param(rngs, (kv_lora_rank, num_heads, qk_nope_head_dim), ("kv_lora", "heads", "head_dim"), std=std)
    self.wv_up = param(rngs, (kv_lora_rank, num_heads, v_head_dim), ("kv_lora", "heads", "head_dim"), std=std)
    self.wo = param(rngs, (num_heads, v_head_dim, dim), ("heads", "head_dim", "embed"), std=out_std)
    if scoring not in ("softmax", "ssmax"):
      raise ValueError(f"unknown attention scoring {scoring!r}")
    self.ssmax_scale = param(None, (num_heads,), ("heads",), value=1.0) if scoring == "ssmax" else None
    self.ssmax_bias = param(None, (num_heads,), ("heads",), value=0.0) if scoring == "ssmax" and ssmax_bias else None

  # ------------------------------------------------------------------ cache
  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """Only what MLA needs: the normalised latent and the shared rotary key of every token."""
    return {"c_kv": jnp.zeros((batch, max_len, self.kv_lora_rank), dtype),
            "k_rope": jnp.zeros((batch, max_len, self.rope_dim), dtype)}

  # ------------------------------------------------------------------ pieces
  def _queries(self, x, positions):
    if self.wq is not None:
      q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(x.dtype))
    else:
      q_latent = self.q_norm(x @ self.wq_down[...].astype(x.dtype))
      q = jnp.einsum("btr,rhk->bthk", q_latent, self.wq_up[...].astype(x.dtype))
    q_nope, q_rope = q[..., :self.nope_dim], q[..., self.nope_dim:]
    if self.rope_dim:
      q_rope = apply_rope(q_rope, positions, self.rope_theta, self.yarn)
    return q_nope, q_rope

  def _latents(self, x, positions):
    c_kv = self.kv_norm(x @ self.wkv_down[...].astype(x.dtype))
    if self.rope_dim:
      k_rope = (x @ self.wk_rope[...].astype(x.dtype))[:, :, None, :]  # one rotary key for all heads
      k_rope = apply_rope(k_rope, positions, self.rope_theta, self.yarn)[:, :, 0, :]
    else:
      k_rope = jnp.zeros(x.shape[:2] + (0,), x.dtype)
    return c_kv, k_rope

  def _weights(self, logits, mask):
    return attention_weights(
        logits, mask,
        ssmax_scale=None if self.ssmax_scale is None else self.ssmax_scale[...],
        ssmax_bias=None if self.ssmax_bias is None else self.ssmax_bias[...])

  def _absorbed_decode_kernel(self, q_nope, q_rope, cache, positions, mask, scale, w_uk, w_uv):
    """The absorbed decode step as one fused Pallas kernel: the same scores, mask and (SSMax) softmax as the
    einsum path, but every head shares one read of each cache block (see kernels/mla_decode.py)."""
    q_latent = jnp.einsum("bqhn,chn->bqhc", q_nope, w_uk)[:, 0]  # W_UK folded into the query
    if self.ssmax_scale is not None:  # SSMax's s_h log n (+ b_h) is a per-(row, head) factor on the scale
      scale = scale * ssmax_multiplier(
          jnp.sum(mask, axis=-1), self.ssmax_scale[...],
          None if self.ssmax_bias is None else self.ssmax_bias[...])[..., 0]
    lengths = positions[:, 0] + 1  # causal_mask: cache slots j <= the query's position are visible
    out_latent, _ = mla_decode_attention(
        q_latent, q_rope[:, 0] if self.rope_dim else None, cache["c_kv"],
        cache["k_rope"] if self.rope_dim else None, lengths, scale=scale)
    return jnp.einsum("bhc,chv->bhv", out_latent.astype(w_uv.dtype), w_uv)[:, None]  # then W_UV

  # ------------------------------------------------------------------ forward
  def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None,
               lengths: jax.Array | None = None, segments: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
    """x [batch, seq, dim], positions [batch, seq], `segments` the document ids of packed rows (training only);
    the cache contract is that of `layers.cache`."""
    dtype = x.dtype
    q_nope, q_rope = self._queries(x, positions)
    c_kv, k_rope = self._latents(x, positions)
    if cache is None:
      key_positions = positions
    else:
      cache = {"c_kv": write_at(cache["c_kv"], c_kv, lengths), "k_rope": write_at(cache["k_rope"], k_rope, lengths)}
      c_kv, k_rope = cache["c_kv"].astype(dtype), cache["k_rope"].astype(dtype)
      key_positions = jnp.broadcast_to(jnp.arange(c_kv.shape[1], dtype=jnp.int32), c_kv.shape[:2])
    scale = self.softmax_scale
    absorbed = self.form == "absorbed" or (self.form == "auto" and cache is not None and x.shape[1] == 1)
    w_uk, w_uv = self.wk_up[...].astype(dtype), self.wv_up[...].astype(dtype)
    if absorbed:
      mask = visible(positions, key_positions, *((segments, segments) if cache is None else (None, None)))
    if (absorbed and cache is not None and x.shape[1] == 1
        and resolve_decode_impl(self.decode_impl) == "pallas"):
      out = self._absorbed_decode_kernel(q_nope, q_rope, cache, positions, mask, scale, w_uk, w_uv)
    elif absorbed:
      q_latent = jnp.einsum("bqhn,chn->bqhc", q_nope, w_uk)  # W_UK folded into the query
      logits = (jnp.einsum("bqhc,bkc->bhqk", q_latent, c_kv)
                + jnp.einsum("bqhr,bkr->bhqk", q_rope, k_rope))
      probs = self._weights(logits * scale, mask).astype(dtype)
      out_latent = jnp.einsum("bhqk,bkc->bqhc", probs, c_kv)  # attend over latents ...
      out = jnp.einsum("bqhc,chv->bqhv", out_latent, w_uv)  # ... then apply W_UV once per query
    else:
      # Expanded: per-head keys [k_nope_h ; k_rope] (the rotary key shared by all heads) and values, then the
      # same attention as MHA with q.k width nope + rope and value width v_head_dim.
      k_nope = jnp.einsum("bkc,chn->bkhn", c_kv, w_uk)
      values = jnp.einsum("bkc,chv->bkhv", c_kv, w_uv)
      k_rope_heads = jnp.broadcast_to(k_rope[:, :, None, :], k_rope.shape[:2] + (self.num_heads, self.rope_dim))
      out = dot_product_attention(
          jnp.concatenate([q_nope, q_rope], axis=-1), jnp.concatenate([k_nope, k_rope_heads], axis=-1), values,
          scale=scale, q_positions=positions, kv_positions=key_positions,
          q_segments=segments if cache is None else None, kv_segments=segments if cache is None else None,
          self_attention=cache is None, impl=self.impl,
          ssmax_scale=None if self.ssmax_scale is None else self.ssmax_scale[...],
          ssmax_bias=None if self.ssmax_bias is None else self.ssmax_bias[...])
    y = jnp.einsum("bqhv,hvd->bqd", out, self.wo[...].astype(dtype))
    return y, cache
