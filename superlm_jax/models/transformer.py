"""One decoder for every architecture in the roadmap, assembled from `config.model`.

GPT-2, Llama-style dense models (and, in later modules, MiniDeepSeek/DeepSeek-MoE) differ only in per-block choices:
norm (LayerNorm | RMSNorm), positions (learned | RoPE | none), attention (MHA/GQA/MQA, later MLA) with softmax or
SSMax scoring, and the feed-forward slot (GELU MLP | SwiGLU, later MoE). A model family is a config, not a class.

Calling convention (the public contract the sampler, trainer and parity tests use):
  ``model(tokens)`` -> logits [batch, seq, vocab] (float32);
  ``model(tokens, cache=cache)`` -> (logits, new_cache), see ``superlm_jax.layers.cache``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from superlm_jax.kernels.mla_decode import resolve_decode_impl
from superlm_jax.layers.attention import Attention
from superlm_jax.layers.cache import DecodeCache
from superlm_jax.layers.embed import Embed, LearnedPositions
from superlm_jax.layers.initializers import param
from superlm_jax.layers.mla import MultiHeadLatentAttention
from superlm_jax.layers.mlp import MLP, residual_std
from superlm_jax.layers.moe import MoE, MoEStats
from superlm_jax.layers.router import RouterSpec, update_balance_bias
from superlm_jax.layers.norms import make_norm
from superlm_jax.layers.partitioning import MeshAxes, constrain_batch
from superlm_jax.layers.rope import yarn_from_config


def head_dim(cfg: ml_collections.ConfigDict) -> int:
  return cfg.head_dim or cfg.d_model // cfg.num_heads


def num_kv_heads(cfg: ml_collections.ConfigDict) -> int:
  return cfg.num_kv_heads or cfg.num_heads


def make_attention(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The attention slot. Every kind implements `__call__(x, positions, cache, lengths) -> (y, cache)` and
  `init_cache(batch, max_len, dtype)`."""
  if cfg.attention == "mha":
    return Attention(
        cfg.d_model, cfg.num_heads, num_kv_heads(cfg), head_dim(cfg), use_bias=cfg.use_bias,
        rope_theta=cfg.rope_theta if cfg.positions == "rope" else None, scoring=cfg.scoring,
        ssmax_bias=cfg.ssmax_bias, std=cfg.init_std, out_std=residual_std(cfg.init_std, cfg.num_layers), rngs=rngs,
        yarn=yarn_from_config(cfg))
  if cfg.attention == "mla":
    return MultiHeadLatentAttention(
        cfg.d_model, cfg.num_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        rope_theta=cfg.rope_theta, norm_eps=cfg.latent_norm_eps, scoring=cfg.scoring, ssmax_bias=cfg.ssmax_bias,
        std=cfg.init_std, out_std=residual_std(cfg.init_std, cfg.num_layers), rngs=rngs, yarn=yarn_from_config(cfg))
  raise ValueError(f"unknown attention {cfg.attention!r}")


def router_spec(cfg: ml_collections.ConfigDict) -> RouterSpec:
  return RouterSpec(num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok, scoring=cfg.router_scoring,
                    norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
                    n_group=cfg.n_group, topk_group=cfg.topk_group)


def is_moe_layer(cfg: ml_collections.ConfigDict, layer: int) -> bool:
  return cfg.n_routed_experts > 0 and layer >= cfg.first_k_dense


def make_feed_forward(cfg: ml_collections.ConfigDict, layer: int, rngs: nnx.Rngs) -> nnx.Module:
  """The feed-forward slot: any `__call__(x) -> y` of width d_model. MoE from layer `first_k_dense` on."""
  if is_moe_layer(cfg, layer):
    return MoE(cfg.d_model, spec=router_spec(cfg), expert_hidden=cfg.moe_intermediate_size or cfg.d_ff,
               num_shared=cfg.n_shared_experts, activation=cfg.mlp, dispatch=cfg.moe_dispatch,
               capacity_factor=cfg.capacity_factor, std=cfg.init_std,
               out_std=residual_std(cfg.init_std, cfg.num_layers), rngs=rngs)
  return MLP(cfg.d_model, cfg.d_ff, activation=cfg.mlp, use_bias=cfg.use_bias, std=cfg.init_std,
             out_std=residual_std(cfg.init_std, cfg.num_layers), rngs=rngs)


class DecoderBlock(nnx.Module):
  """Pre-norm residual block (GPT-2, Radford et al. 2019 sec. 2.3): x + attn(norm(x)), then x + ffn(norm(x))."""

  def __init__(self, cfg: ml_collections.ConfigDict, layer: int, rngs: nnx.Rngs):
    self.attn_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, use_bias=cfg.use_bias)
    self.attn = make_attention(cfg, rngs)
    self.ffn_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, use_bias=cfg.use_bias)
    self.ffn = make_feed_forward(cfg, layer, rngs)

  def __call__(self, x, positions, cache=None, lengths=None):
    h, cache = self.attn(self.attn_norm(x), positions, cache, lengths)
    x = x + h
    x = x + self.ffn(self.ffn_norm(x))
    return x, cache


class Transformer(nnx.Module):
  """Token embedding (+ learned positions) -> blocks -> final norm -> (tied) output head."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, compute_dtype=jnp.float32):
    self.config = cfg
    self.compute_dtype = jnp.dtype(compute_dtype)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, rngs=rngs)
    self.positions = (LearnedPositions(cfg.max_seq_len, cfg.d_model, std=cfg.init_std, rngs=rngs)
                      if cfg.positions == "learned" else None)
    self.blocks = nnx.List([DecoderBlock(cfg, i, rngs) for i in range(cfg.num_layers)])
    self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, use_bias=cfg.use_bias)
    self.head = (None if cfg.tie_embeddings else
                 param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std))
    self.mesh_axes: MeshAxes | None = None  # See set_mesh_axes.

  def set_mesh_axes(self, axes: MeshAxes | None) -> None:
    """Runs the model across a device mesh (superlm_jax.sharding.mesh_axes): the residual stream stays split by
    batch rows, and MoE layers dispatch tokens to experts on other devices. None: the single-device program."""
    self.mesh_axes = axes
    for block in self.blocks:
      if isinstance(block.ffn, MoE):
        block.ffn.mesh_axes = axes

  def set_attention_form(self, form: str) -> None:
    """MLA only: "auto" (absorbed decode steps, expanded otherwise), "expanded" or "absorbed" everywhere."""
    for block in self.blocks:
      if isinstance(block.attn, MultiHeadLatentAttention):
        block.attn.form = form

  def set_decode_impl(self, impl: str) -> None:
    """MLA only: how absorbed single-token decode steps attend, "xla" (einsums), "pallas" (the fused kernel of
    kernels/mla_decode.py) or "auto" (pallas on GPU/TPU, xla on CPU)."""
    resolve_decode_impl(impl)  # rejects unknown values here rather than at the first decode step
    for block in self.blocks:
      if isinstance(block.attn, MultiHeadLatentAttention):
        block.attn.decode_impl = impl

  def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> DecodeCache:
    max_len = max_len or self.config.max_seq_len
    dtype = dtype or self.compute_dtype
    return DecodeCache(layers=tuple(block.attn.init_cache(batch, max_len, dtype) for block in self.blocks),
                       lengths=jnp.zeros((batch,), jnp.int32))

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache: DecodeCache | None = None):
    batch, seq = tokens.shape
    start = jnp.zeros((batch,), jnp.int32) if cache is None else cache.lengths
    if positions is None:
      positions = start[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]
    x = self.embed(tokens, self.compute_dtype)
    if self.positions is not None:
      x = x + self.positions(positions, self.compute_dtype)
    x = constrain_batch(x, self.mesh_axes)
    new_layers = []
    for i, block in enumerate(self.blocks):
      x, layer_cache = block(x, positions, None if cache is None else cache.layers[i], start)
      x = constrain_batch(x, self.mesh_axes)
      new_layers.append(layer_cache)
    x = self.final_norm(x)
    if self.head is None:
      logits = self.embed.attend(x)
    else:
      logits = x @ self.head[...].astype(x.dtype)
    logits = logits.astype(jnp.float32)
    if cache is None:
      return logits
    return logits, DecodeCache(layers=tuple(new_layers), lengths=cache.lengths + seq)


def forward_with_moe_stats(model: Transformer, tokens: jax.Array) -> tuple[jax.Array, list[dict]]:
  """(logits, per-MoE-layer router statistics in layer order) via `nnx.capture`; [] for dense models."""
  logits, captured = nnx.capture(model, MoEStats)(tokens)
  flat = sorted(nnx.to_flat_state(captured), key=lambda item: tuple(str(k).zfill(6) for k in item[0]))
  return logits, [variable.get_value()[0] for _, variable in flat]


def update_balance_biases(model: Transformer, loads: jax.Array, rate: float) -> None:
  """Aux-loss-free balancing: b += rate * sign(mean load - load) for each MoE layer (loads [moe_layers, E])."""
  moe_layers = [block.ffn for block in model.blocks if isinstance(block.ffn, MoE)]
  for layer, moe in enumerate(moe_layers):
    moe.balance_bias[...] = update_balance_bias(moe.balance_bias[...], loads[layer], rate)


def build_model(cfg: ml_collections.ConfigDict, *, seed: int = 0, compute_dtype=jnp.float32) -> Transformer:
  return Transformer(cfg, rngs=nnx.Rngs(params=seed), compute_dtype=compute_dtype)
