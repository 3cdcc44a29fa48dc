"""One decoder for every architecture in the roadmap, assembled from `config.model`.

GPT-2, Llama-style dense models, MiniDeepSeek and DeepSeek-MoE differ only in per-block choices: norm (LayerNorm |
RMSNorm), positions (learned | RoPE | none), attention (MHA/GQA/MQA | MLA) with softmax or SSMax scoring, and the
feed-forward slot (GELU MLP | SwiGLU | MoE). A model family is a config, not a class.

Calling convention (the public contract the sampler, trainer and parity tests use):
  ``model(tokens)`` -> logits [batch, seq, vocab] (float32);
  ``model(tokens, cache=cache)`` -> (logits, new_cache), see ``superlm_jax.layers.cache``;
  ``model(tokens, positions=p, segments=s)``: packed documents (positions restarting per document, document ids);
  ``model.hidden(...)`` the final-norm output, and ``model.output_head()`` the [embed, vocab] matrix, for a loss
  that never forms the whole logits (training/loss.py).

Two layouts of the blocks (`model.scan_layers`):
  loop  ``blocks``: one module per layer, run by a Python loop: XLA compiles every layer separately, so compile
        time grows with depth.
  scan  ``layer_stacks``: consecutive layers of the same structure (DeepSeek's dense first-k blocks, then the MoE
        blocks) are ONE module whose parameters have a leading `layers` axis (nnx.vmap at construction), run by
        nnx.scan: one layer body is compiled per stack, whatever the depth. `models/layout.py` converts
        parameters between the two layouts.
`remat` (train.remat) wraps each block in jax.checkpoint with the chosen policy in either layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from superlm_jax.config import REMAT_CHOICES
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

# train.remat -> what jax.checkpoint saves of each block for the backward pass (None: save nothing, recompute all).
REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert REMAT_CHOICES == ("none", *REMAT_POLICIES)  # the config's list of choices (superlm_jax/config.py)
# model.* keys that say how the model computes, not what it is: a checkpoint may be resumed or sampled with others.
RUNTIME_MODEL_KEYS = ("attention_impl",)


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
        yarn=yarn_from_config(cfg), impl=cfg.attention_impl)
  if cfg.attention == "mla":
    return MultiHeadLatentAttention(
        cfg.d_model, cfg.num_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        rope_theta=cfg.rope_theta, norm_eps=cfg.latent_norm_eps, scoring=cfg.scoring, ssmax_bias=cfg.ssmax_bias,
        std=cfg.init_std, out_std=residual_std(cfg.init_std, cfg.num_layers), rngs=rngs, yarn=yarn_from_config(cfg),
        impl=cfg.attention_impl)
  raise ValueError(f"unknown attention {cfg.attention!r}")


def router_spec(cfg: ml_collections.ConfigDict) -> RouterSpec:
  return RouterSpec(num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok, scoring=cfg.router_scoring,
                    norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
                    n_group=cfg.n_group, topk_group=cfg.topk_group)


def is_moe_layer(cfg: ml_collections.ConfigDict, layer: int) -> bool:
  return cfg.n_routed_experts > 0 and layer >= cfg.first_k_dense


def layer_groups(cfg: ml_collections.ConfigDict) -> list[tuple[int, int]]:
  """[start, stop) ranges of consecutive layers with the same block structure: the stacks of the scan layout.
  Blocks differ only in their feed-forward slot (dense before `first_k_dense`, MoE after), so at most two."""
  bounds = [0, min(cfg.first_k_dense, cfg.num_layers) if cfg.n_routed_experts else 0, cfg.num_layers]
  return [(start, stop) for start, stop in zip(bounds, bounds[1:]) if stop > start]


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

  def __call__(self, x, positions, cache=None, lengths=None, segments=None):
    h, cache = self.attn(self.attn_norm(x), positions, cache, lengths, segments)
    x = x + h
    x = x + self.ffn(self.ffn_norm(x))
    return x, cache


def stacked_blocks(cfg: ml_collections.ConfigDict, start: int, stop: int, rngs: nnx.Rngs) -> DecoderBlock:
  """Layers [start, stop) as one DecoderBlock whose variables have a leading `layers` axis (logical name "layers",
  which the sharding rules never split). Each layer draws its own initial weights."""

  @nnx.split_rngs(splits=stop - start)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return DecoderBlock(cfg, start, rngs)

  return make(rngs)


class Transformer(nnx.Module):
  """Token embedding (+ learned positions) -> blocks -> final norm -> (tied) output head."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, compute_dtype=jnp.float32,
               remat: str = "none"):
    if remat not in REMAT_CHOICES:
      raise ValueError(f"unknown remat {remat!r}; one of {REMAT_CHOICES}")
    self.config = cfg
    self.compute_dtype = jnp.dtype(compute_dtype)
    self.remat = remat
    self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, rngs=rngs)
    self.positions = (LearnedPositions(cfg.max_seq_len, cfg.d_model, std=cfg.init_std, rngs=rngs)
                      if cfg.positions == "learned" else None)
    if cfg.scan_layers:
      self.blocks = None
      self.layer_stacks = nnx.List([stacked_blocks(cfg, start, stop, rngs) for start, stop in layer_groups(cfg)])
    else:
      self.blocks = nnx.List([DecoderBlock(cfg, i, rngs) for i in range(cfg.num_layers)])
      self.layer_stacks = None
    self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, use_bias=cfg.use_bias)
    self.head = (None if cfg.tie_embeddings else
                 param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std))
    self.mesh_axes: MeshAxes | None = None  # See set_mesh_axes.

  def block_modules(self) -> list[DecoderBlock]:
    """The block modules: one per layer (loop layout) or one per stack of layers (scan layout)."""
    return list(self.blocks if self.blocks is not None else self.layer_stacks)

  def set_mesh_axes(self, axes: MeshAxes | None) -> None:
    """Runs the model across a device mesh (superlm_jax.sharding.mesh_axes): the residual stream stays split by
    batch rows, and MoE layers dispatch tokens to experts on other devices. None: the single-device program."""
    self.mesh_axes = axes
    for block in self.block_modules():
      if isinstance(block.ffn, MoE):
        block.ffn.mesh_axes = axes

  def set_attention_form(self, form: str) -> None:
    """MLA only: "auto" (absorbed decode steps, expanded otherwise), "expanded" or "absorbed" everywhere."""
    for block in self.block_modules():
      if isinstance(block.attn, MultiHeadLatentAttention):
        block.attn.form = form

  def set_decode_impl(self, impl: str) -> None:
    """MLA only: how absorbed single-token decode steps attend, "xla" (einsums), "pallas" (the fused kernel of
    kernels/mla_decode.py) or "auto" (pallas where it compiles natively, see `resolve_decode_impl`)."""
    resolve_decode_impl(impl)  # rejects unknown values here rather than at the first decode step
    for block in self.block_modules():
      if isinstance(block.attn, MultiHeadLatentAttention):
        block.attn.decode_impl = impl

  def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> DecodeCache:
    """One cache entry per block module: [batch, max_len, ...] arrays per layer, or [layers, batch, max_len, ...]
    per stack in the scan layout."""
    max_len = max_len or self.config.max_seq_len
    dtype = dtype or self.compute_dtype
    if self.blocks is not None:
      layers = tuple(block.attn.init_cache(batch, max_len, dtype) for block in self.blocks)
    else:
      layers = tuple(
          {name: jnp.zeros((stop - start,) + a.shape, a.dtype)
           for name, a in block.attn.init_cache(batch, max_len, dtype).items()}
          for block, (start, stop) in zip(self.layer_stacks, layer_groups(self.config)))
    return DecodeCache(layers=layers, lengths=jnp.zeros((batch,), jnp.int32))

  def _run_block(self, block, x, positions, layer_cache, start, segments, stacked: bool):
    """One block module over x: a layer, or (stacked) its layers by nnx.scan; under jax.checkpoint if remat."""
    if layer_cache is None:  # training / scoring: x is the only thing carried
      def layer(block, x):
        return block(x, positions, None, start, segments)[0]
    else:
      def layer(block, x, layer_cache):
        return block(x, positions, layer_cache, start, segments)

    if self.remat != "none":
      layer = nnx.remat(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=not stacked)
    args = (block, x) if layer_cache is None else (block, x, layer_cache)
    if stacked:
      in_axes, out_axes = ((0, nnx.Carry), nnx.Carry) if layer_cache is None else ((0, nnx.Carry, 0), (nnx.Carry, 0))
      layer = nnx.scan(layer, in_axes=in_axes, out_axes=out_axes)
    out = layer(*args)
    return (out, None) if layer_cache is None else out

  def hidden(self, tokens: jax.Array, positions: jax.Array | None = None, cache: DecodeCache | None = None,
             segments: jax.Array | None = None) -> tuple[jax.Array, DecodeCache | None]:
    """The final-norm output [batch, seq, embed] (compute dtype) and the new cache (None without one)."""
    batch, seq = tokens.shape
    start = jnp.zeros((batch,), jnp.int32) if cache is None else cache.lengths
    if positions is None:
      positions = start[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]
    x = self.embed(tokens, self.compute_dtype)
    if self.positions is not None:
      x = x + self.positions(positions, self.compute_dtype)
    x = constrain_batch(x, self.mesh_axes)
    new_layers = []
    for i, block in enumerate(self.block_modules()):
      x, layer_cache = self._run_block(block, x, positions, None if cache is None else cache.layers[i], start,
                                       segments, stacked=self.blocks is None)
      x = constrain_batch(x, self.mesh_axes)
      new_layers.append(layer_cache)
    x = self.final_norm(x)
    if cache is None:
      return x, None
    return x, DecodeCache(layers=tuple(new_layers), lengths=cache.lengths + seq)

  def output_head(self) -> jax.Array:
    """The [embed, vocab] output projection in the compute dtype (the embedding table when tied)."""
    w = self.embed.embedding[...].T if self.head is None else self.head[...]
    return w.astype(self.compute_dtype)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache: DecodeCache | None = None,
               segments: jax.Array | None = None):
    x, new_cache = self.hidden(tokens, positions, cache, segments)
    logits = (x @ self.output_head()).astype(jnp.float32)
    return logits if cache is None else (logits, new_cache)


def moe_layers(model: Transformer) -> list[tuple[MoE, int]]:
  """(MoE module, number of layers it holds) in layer order: 1 per module in the loop layout, a stack's depth in
  the scan layout (its variables then have a leading layers axis)."""
  if model.blocks is not None:
    return [(block.ffn, 1) for block in model.blocks if isinstance(block.ffn, MoE)]
  return [(block.ffn, stop - start) for block, (start, stop) in zip(model.layer_stacks, layer_groups(model.config))
          if isinstance(block.ffn, MoE)]


def forward_with_moe_stats(model: Transformer, tokens: jax.Array, positions: jax.Array | None = None,
                           segments: jax.Array | None = None) -> tuple[jax.Array, list[dict]]:
  """(final hidden states, per-MoE-layer router statistics in layer order) via `nnx.capture`; [] for dense models.
  Statistics sown inside a scanned stack come out with a leading layers axis and are split per layer."""
  (x, _), captured = nnx.capture(model.hidden, MoEStats)(tokens, positions, None, segments)
  flat = sorted(nnx.to_flat_state(captured), key=lambda item: tuple(str(k).zfill(6) for k in item[0]))
  stats = []
  for path, variable in flat:
    value = variable.get_value()[0]
    if path[0] == "layer_stacks":
      depth = jax.tree.leaves(value)[0].shape[0]
      stats.extend(jax.tree.map(lambda a, i=i: a[i], value) for i in range(depth))
    else:
      stats.append(value)
  return x, stats


def update_balance_biases(model: Transformer, loads: jax.Array, rate: float) -> None:
  """Aux-loss-free balancing: b += rate * sign(mean load - load) for each MoE layer (loads [moe_layers, E])."""
  offset = 0
  for moe, depth in moe_layers(model):
    layer_loads = loads[offset:offset + depth] if model.blocks is None else loads[offset]
    moe.balance_bias[...] = update_balance_bias(moe.balance_bias[...], layer_loads, rate)
    offset += depth


def build_model(cfg: ml_collections.ConfigDict, *, seed: int = 0, compute_dtype=jnp.float32,
                remat: str = "none") -> Transformer:
  return Transformer(cfg, rngs=nnx.Rngs(params=seed), compute_dtype=compute_dtype, remat=remat)
