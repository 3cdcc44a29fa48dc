"""Attention probabilities of a built model, per layer and head, without any hook in the model's own layers.

An `AttentionProbe` that wraps a block's attention module is put in the module's slot of a copy of the model (as
`analysis.probes.DownProjProbe` does for MLPs): it runs the module unchanged, so the model computes exactly what it
did, and sows the softmax weights the module's queries and keys give, [batch, heads, q, k] in float32:

  MHA/GQA/MQA  softmax(q k^T / sqrt(head_dim)) over the visible keys, each KV head shared by its query group;
  MLA          the scores of the absorbed form, (W_UK^T q_nope) . c_kv + q_rope . k_rope, times the softmax scale
               (equal to the expanded form's, DeepSeek-V2 sec. 2.1.2).
Both use the modules' own projections and scoring core (`kernels.attention.attention_weights`: mask, softmax or
SSMax), so the weights are those the model attends with, not a re-derivation that could drift from it.

    weights = attention_maps(model, tokens)       # [layers, batch, heads, seq, seq]
    stats = head_statistics(weights)              # {"first", "previous", ...}: [layers, heads] arrays

Only forward passes without a cache are probed (training and scoring); the probe passes a cache through untouched.
Blocks must be one module per layer (the loop layout): restore with `generate.restore.load_model(..., layout="loop")`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from superlm_jax.kernels.attention import attention_weights, visible
from superlm_jax.layers.attention import Attention
from superlm_jax.layers.mla import MultiHeadLatentAttention
from superlm_jax.layers.rope import apply_rope


def attention_probabilities(attn: nnx.Module, x: jax.Array, positions: jax.Array,
                            segments: jax.Array | None = None) -> jax.Array:
  """The attention weights [batch, heads, q, k] (float32) of `attn` (an `Attention` or a `MultiHeadLatentAttention`)
  for its input x [batch, seq, dim] (the block's normed residual stream) at `positions` [batch, seq], queries and
  keys being the same tokens; `segments` [batch, seq]: document ids of packed rows."""
  mask = visible(positions, positions, segments, segments)
  ssmax = dict(ssmax_scale=None if attn.ssmax_scale is None else attn.ssmax_scale[...],
               ssmax_bias=None if attn.ssmax_bias is None else attn.ssmax_bias[...])
  if isinstance(attn, MultiHeadLatentAttention):
    q_nope, q_rope = attn._queries(x, positions)
    c_kv, k_rope = attn._latents(x, positions)
    q_latent = jnp.einsum("bqhn,chn->bqhc", q_nope, attn.wk_up[...].astype(x.dtype))
    logits = (jnp.einsum("bqhc,bkc->bhqk", q_latent, c_kv) + jnp.einsum("bqhr,bkr->bhqk", q_rope, k_rope))
    return attention_weights(logits * attn.softmax_scale, mask, **ssmax)
  if isinstance(attn, Attention):
    q = attn._project(x, attn.wq, attn.bq)
    k = attn._project(x, attn.wk, attn.bk)
    if attn.rope_theta is not None:
      q = apply_rope(q, positions, attn.rope_theta, attn.yarn)
      k = apply_rope(k, positions, attn.rope_theta, attn.yarn)
    k = jnp.repeat(k, attn.num_heads // attn.num_kv_heads, axis=2)  # query head h reads KV head h // group
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(attn.head_dim)
    return attention_weights(logits, mask, **ssmax)
  raise TypeError(f"no attention probabilities for a {type(attn).__name__}")


class AttentionProbe(nnx.Module):
  """An attention module's stand-in: returns what the module returns and, on a forward pass without a cache, sows
  its attention weights [batch, heads, q, k] as the `nnx.Intermediate` "attention_weights"."""

  def __init__(self, attn: nnx.Module):
    self.attn = attn

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    return self.attn.init_cache(batch, max_len, dtype)

  def __call__(self, x, positions, cache=None, lengths=None, segments=None):
    y, cache_out = self.attn(x, positions, cache, lengths, segments)
    if cache is None:
      self.sow(nnx.Intermediate, "attention_weights", attention_probabilities(self.attn, x, positions, segments))
    return y, cache_out


def with_attention_probes(model: nnx.Module) -> nnx.Module:
  """A copy of `model` (new modules over the same arrays: `model` is left as it is) with an `AttentionProbe` in
  place of every block's attention module."""
  if getattr(model, "blocks", None) is None:
    raise ValueError("attention maps need one module per layer: restore the model in the loop layout "
                     "(generate.restore.load_model(..., layout='loop') or models.layout.scan_to_loop)")
  copy = nnx.merge(*nnx.split(model))
  for block in copy.blocks:
    block.attn = AttentionProbe(block.attn)
  return copy


def attention_maps(model: nnx.Module, tokens: jax.Array, positions: jax.Array | None = None,
                   segments: jax.Array | None = None) -> jax.Array:
  """Attention weights [layers, batch, heads, seq, seq] (float32) of one forward pass of `model` (a `Transformer`
  in the loop layout) over tokens [batch, seq]; row i of a map is what query i attends to (it sums to 1).
  The pass is one jitted program (op-by-op, a first call would compile every operation on its own)."""
  graphdef, state = nnx.split(with_attention_probes(model))

  @jax.jit
  def weights(state, tokens, positions, segments):
    _, captured = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(tokens, positions, None, segments)
    return jnp.stack([captured["blocks"][i]["attn"]["attention_weights"].get_value()[0]
                      for i in range(len(model.blocks))])

  return weights(state, jnp.asarray(tokens), positions, segments)


def head_statistics(weights: jax.Array | np.ndarray, skip_rows: int = 1) -> dict[str, np.ndarray]:
  """Per-head summaries of attention weights [layers, batch, heads, q, q] (what `attention_maps` returns) or
  [layers, heads, q, q], averaged over the query rows from `skip_rows` on (row 0 can only see itself) and over the
  batch: {name: [layers, heads]} (float64) for
    first     the weight on key 0 (an "attention sink" takes most of it);
    previous  the weight on key i - 1 (a previous-token head);
    self      the weight on key i;
    distance  the expected distance i - j to the attended key, in tokens;
    entropy   the entropy of the row in nats (0: one key; log(i + 1): uniform over the keys row i sees)."""
  w = np.asarray(weights, np.float64)
  if w.ndim == 4:
    w = w[:, None]
  if w.ndim != 5 or w.shape[-1] != w.shape[-2] or not 1 <= skip_rows < w.shape[-1]:
    raise ValueError(f"weights of shape {w.shape} are not [layers, (batch,) heads, q, q] with q > skip_rows >= 1")
  rows = np.arange(skip_rows, w.shape[-1])
  w_rows = w[..., rows, :]  # [layers, batch, heads, rows, k]
  logs = np.log(np.where(w_rows > 0, w_rows, 1.0))
  stats = {"first": w_rows[..., 0], "previous": w[..., rows, rows - 1], "self": w[..., rows, rows],
           "distance": np.sum(w_rows * np.maximum(rows[:, None] - np.arange(w.shape[-1])[None, :], 0), axis=-1),
           "entropy": -np.sum(w_rows * logs, axis=-1)}
  return {name: value.mean(axis=(1, 3)) for name, value in stats.items()}
