"""Scaled dot-product attention, arrays in and arrays out, with a choice of implementation.

Every attention kind of the library (MHA/GQA/MQA, MLA's expanded form) calls `dot_product_attention` with
q [batch, q_len, heads, qk_dim], k [batch, kv_len, kv_heads, qk_dim] and v [batch, kv_len, kv_heads, v_dim]
(kv_heads divides heads; v_dim may differ from qk_dim, as in MLA). Which keys a query sees is given by
positions and optional document (segment) ids, never by a materialised [q, k] mask from the caller:

    key j is visible to query i  iff  kv_positions[j] <= q_positions[i]  and  kv_segments[j] == q_segments[i].

That covers causal training (positions 0..T-1), packed documents (positions restart at every document, each
with its own segment id), and a query block over a decode cache (cache slot j holds position j; slots past a
row's length have larger positions than its queries, so they are never visible).

Implementations (`model.attention_impl`):
  xla          the reference: one einsum for the [q, k] scores, a float32 softmax, one einsum for the output.
               Its memory grows with q_len * kv_len per head: a 2k-context training step keeps
               [batch, heads, 2048, 2048] scores and probabilities of every layer for the backward pass.
  xla_chunked  tokamax's memory-efficient attention in plain XLA (Rabe & Staats 2021, arXiv 2112.05682): keys
  triton       in chunks with an online softmax, and a custom backward that recomputes them. tokamax
  mosaic       (google/tokamax, pinned in pyproject.toml) also has FlashAttention kernels (Dao et al. 2022) in
  cudnn        Pallas-Triton and Mosaic (GPU/TPU) and cuDNN's fused attention; they need a GPU (mosaic: or TPU).
  auto         what runs best on the backend: tokamax's Mosaic, then Triton kernel on GPU (the first that
               supports the chip and shapes), Mosaic on TPU, falling back to xla_chunked; on CPU the einsums for
               key lengths up to CPU_CHUNKED_MIN_KV (where they are faster and memory is no issue) and
               xla_chunked beyond. A single-token query (a decode step) always uses the einsums.

Scalable-Softmax (Nakanishi 2025, arXiv 2501.19399, eq. 2) multiplies query i's logits by s_h * log(n_i) (+ b_h),
n_i the number of keys it sees. The logits are linear in q, so the fused paths fold that factor into the query;
there n_i = q_position + 1, which equals the count the reference takes from the mask whenever a row's visible
keys are positions 0..q_position of its document, i.e. in every use above (tested).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from superlm_jax.errors import UserError

IMPLS = ("auto", "xla", "xla_chunked", "triton", "mosaic", "cudnn")
# Which backends each explicit implementation runs on (tokamax's kernels compile natively only there).
_BACKENDS = {"xla": ("cpu", "gpu", "tpu"), "xla_chunked": ("cpu", "gpu", "tpu"), "triton": ("gpu",),
             "cudnn": ("gpu",), "mosaic": ("gpu", "tpu")}
# On CPU, the einsum path is as fast as xla_chunked or faster up to this many keys (benchmarks/memory.py, and
# JAX_NOTES: 8 x 256 x 6 heads, gradient 44 ms einsum vs 52 ms chunked; at 2048 keys they take the same time).
CPU_CHUNKED_MIN_KV = 1024

_MASKED = -1e30  # Finite, so a fully masked row gives a uniform (not NaN) softmax; such rows are never read.


def check_attention_impl(impl: str, backend: str | None = None) -> None:
  """A one-line UserError for an unknown implementation or one this backend cannot run."""
  if impl not in IMPLS:
    raise UserError(f"model.attention_impl={impl!r} is not one of {IMPLS}")
  backend = backend or jax.default_backend()
  if impl != "auto" and backend not in _BACKENDS[impl]:
    raise UserError(f"model.attention_impl={impl!r} needs a {' or '.join(b.upper() for b in _BACKENDS[impl])}, "
                    f"but JAX runs on {backend.upper()}: use 'auto', 'xla' or 'xla_chunked'")


def resolve_attention_impl(impl: str, q_len: int, kv_len: int, backend: str | None = None) -> str | tuple[str, ...]:
  """The implementation(s) to run for these static lengths: a name, or tokamax names to try in order."""
  check_attention_impl(impl, backend)
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  if q_len == 1:
    return "xla"
  if backend == "gpu":
    return ("mosaic", "triton", "xla_chunked")
  if backend == "tpu":
    return ("mosaic", "xla_chunked")
  return "xla_chunked" if kv_len > CPU_CHUNKED_MIN_KV else "xla"


def visible(q_positions: jax.Array, kv_positions: jax.Array, q_segments: jax.Array | None = None,
            kv_segments: jax.Array | None = None) -> jax.Array:
  """[batch, q, k] bool: the visibility rule of the module docstring."""
  mask = kv_positions[:, None, :] <= q_positions[:, :, None]
  if q_segments is not None:
    mask &= kv_segments[:, None, :] == q_segments[:, :, None]
  return mask


def ssmax_multiplier(n_visible: jax.Array, scale: jax.Array, bias: jax.Array | None) -> jax.Array:
  """s_h * log(n_i) (+ b_h) for n_visible [batch, q] -> [batch, heads, q]."""
  mult = scale[None, :, None] * jnp.log(jnp.maximum(n_visible.astype(jnp.float32), 1.0))[:, None, :]
  if bias is not None:
    mult = mult + bias[None, :, None]
  return mult


def attention_weights(logits: jax.Array, mask: jax.Array, *, ssmax_scale: jax.Array | None = None,
                      ssmax_bias: jax.Array | None = None) -> jax.Array:
  """Softmax (or SSMax, n_i counted from `mask`) over keys of scaled logits [batch, heads, q, k], in float32."""
  logits = logits.astype(jnp.float32)
  if ssmax_scale is not None:
    logits = logits * ssmax_multiplier(jnp.sum(mask, axis=-1), ssmax_scale, ssmax_bias)[..., None]
  logits = jnp.where(mask[:, None, :, :], logits, _MASKED)
  return jax.nn.softmax(logits, axis=-1)


def _xla_attention(q, k, v, scale, mask, ssmax_scale, ssmax_bias):
  batch, q_len, heads, _ = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  qg = q.reshape(batch, q_len, kv_heads, groups, q.shape[-1])
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k).reshape(batch, heads, q_len, -1) * scale
  probs = attention_weights(logits, mask, ssmax_scale=ssmax_scale, ssmax_bias=ssmax_bias)
  probs = probs.reshape(batch, kv_heads, groups, q_len, -1).astype(v.dtype)
  return jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(batch, q_len, heads, v.shape[-1])


def import_tokamax():
  """tokamax, imported on first use (the einsum path never pays for it). tokamax reads its options from absl
  flags and, if nothing has parsed them yet, parses sys.argv itself, which fails on any foreign argument (a
  notebook's, pytest's -q). Our command lines parse their flags with absl.app; anywhere else the flags are
  marked parsed, leaving tokamax's options at their defaults."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  import tokamax

  return tokamax


def _tokamax_attention(q, k, v, scale, impl, q_positions, kv_positions, q_segments, kv_segments, self_attention,
                       ssmax_scale, ssmax_bias):
  tokamax = import_tokamax()

  if ssmax_scale is not None:  # fold s_h log(n_i) (+ b_h) into the query (module docstring)
    if self_attention and q_segments is None:  # n_i = i + 1 whatever the positions' offset
      n_visible = jnp.broadcast_to(jnp.arange(1, q.shape[1] + 1), q_positions.shape)
    else:  # documents and cache slots start at position 0
      n_visible = q_positions + 1
    mult = ssmax_multiplier(n_visible, ssmax_scale, ssmax_bias)  # [batch, heads, q]
    q = (q.astype(jnp.float32) * jnp.swapaxes(mult, 1, 2)[..., None]).astype(q.dtype)
  if self_attention and q_segments is None:
    mask, is_causal = None, True  # positions are 0..T-1 for queries and keys alike: the causal mask by index
  elif self_attention:
    # Index-causal within each contiguous document: kernels skip the blocks above the diagonal.
    mask, is_causal = (q_segments[:, :, None] == kv_segments[:, None, :])[:, None], True
  else:
    mask, is_causal = visible(q_positions, kv_positions, q_segments, kv_segments)[:, None], False
  return tokamax.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal,
                                       implementation=impl)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, q_positions: jax.Array,
                          kv_positions: jax.Array, q_segments: jax.Array | None = None,
                          kv_segments: jax.Array | None = None, self_attention: bool = False,
                          ssmax_scale: jax.Array | None = None, ssmax_bias: jax.Array | None = None,
                          impl: str = "auto") -> jax.Array:
  """softmax(scale * q k^T) v over the visible keys -> [batch, q_len, heads, v_dim] in v's dtype.

  `self_attention`: queries and keys are the same tokens (training, or a prefill from position 0 without a
  cache), so query i and key i have the same position and the rule is causal by index within documents.
  `ssmax_scale` / `ssmax_bias` [heads]: Scalable-Softmax's s_h and b_h.
  """
  chosen = resolve_attention_impl(impl, q.shape[1], k.shape[1])
  if chosen == "xla":
    mask = visible(q_positions, kv_positions, q_segments, kv_segments)
    return _xla_attention(q, k, v, scale, mask, ssmax_scale, ssmax_bias)
  out = _tokamax_attention(q, k, v, scale, chosen, q_positions, kv_positions, q_segments, kv_segments,
                           self_attention, ssmax_scale, ssmax_bias)
  return out.astype(v.dtype)
