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
from superlm_jax.layers.attention import Attention
from superlm_jax.layers.cache import DecodeCache, check_room
from superlm_jax.layers.embed import Embed, LearnedPositions
from superlm_jax.layers.initializers import param
from superlm_jax.layers.mla import MultiHeadLatentAttention
from superlm_jax.layers.mlp import MLP, residual_std
from superlm_jax.layers.moe import MoE, MoEStats
from superlm_jax.layers.norms import make_norm
from superlm_jax.layers.partitioning import constrain_batch
from superlm_jax.models.options import RuntimeOptions
from superlm_jax.models.spec import ModelSpec, model_spec

# train.remat -> what jax.checkpoint saves of each block for the backward pass (None: save nothing, recompute all).
REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert REMAT_CHOICES == ("none", *REMAT_POLICIES)  # the config's list of choices (superlm_jax/config.py)
# model.* keys that say how the model computes, not what it is: a checkpoint may be resumed or sampled with others.
RUNTIME_MODEL_KEYS = ("attention_impl",)


def make_attention(spec: ModelSpec, options: RuntimeOptions, rngs: nnx.Rngs) -> nnx.Module:
  """The attention slot. Every kind implements `__call__(x, positions, cache, lengths) -> (y, cache)` and
  `init_cache(batch, max_len, dtype)`."""
  out_std = residual_std(spec.init_std, spec.num_layers)
  if spec.attention == "mha":
    return Attention(
        spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim, use_bias=spec.use_bias,
        rope_theta=spec.rope_theta if spec.positions == "rope" else None, scoring=spec.scoring,
        ssmax_bias=spec.ssmax_bias, std=spec.init_std, out_std=out_std, rngs=rngs, yarn=spec.yarn,
        impl=spec.attention_impl)
  return MultiHeadLatentAttention(
      spec.d_model, spec.num_heads, q_lora_rank=spec.q_lora_rank, kv_lora_rank=spec.kv_lora_rank,
      qk_nope_head_dim=spec.qk_nope_head_dim, qk_rope_head_dim=spec.qk_rope_head_dim, v_head_dim=spec.v_head_dim,
      rope_theta=spec.rope_theta, norm_eps=spec.latent_norm_eps, scoring=spec.scoring, ssmax_bias=spec.ssmax_bias,
      std=spec.init_std, out_std=out_std, rngs=rngs, yarn=spec.yarn, impl=spec.attention_impl,
      form=options.mla_form, decode_impl=options.decode_impl)


def make_feed_forward(spec: ModelSpec, options: RuntimeOptions, layer: int, rngs: nnx.Rngs) -> nnx.Module:
  """The feed-forward slot: any `__call__(x) -> y` of width d_model. MoE in `spec.moe_layers`."""
  out_std = residual_std(spec.init_std, spec.num_layers)
  if spec.is_moe_layer(layer):
    return MoE(spec.d_model, spec=spec.router, expert_hidden=spec.expert_hidden, num_shared=spec.n_shared_experts,
               activation=spec.mlp, dispatch=spec.moe_dispatch, capacity_factor=spec.capacity_factor,
               std=spec.init_std, out_std=out_std, rngs=rngs, mesh_axes=options.mesh_axes)
  return MLP(spec.d_model, spec.d_ff, activation=spec.mlp, use_bias=spec.use_bias, std=spec.init_std,
             out_std=out_std, rngs=rngs)


class DecoderBlock(nnx.Module):
  """Pre-norm residual block (GPT-2, Radford et al. 2019 sec. 2.3): x + attn(norm(x)), then x + ffn(norm(x))."""

  def __init__(self, spec: ModelSpec, options: RuntimeOptions, layer: int, rngs: nnx.Rngs):
    self.attn_norm = make_norm(spec.norm, spec.d_model, eps=spec.norm_eps, use_bias=spec.use_bias)
    self.attn = make_attention(spec, options, rngs)
    self.ffn_norm = make_norm(spec.norm, spec.d_model, eps=spec.norm_eps, use_bias=spec.use_bias)
    self.ffn = make_feed_forward(spec, options, layer, rngs)

  def __call__(self, x, positions, cache=None, lengths=None, segments=None):
    h, cache = self.attn(self.attn_norm(x), positions, cache, lengths, segments)
    x = x + h
    x = x + self.ffn(self.ffn_norm(x))
    return x, cache


class MTPModule(nnx.Module):
  """Multi-token prediction module k (DeepSeek-V3, arXiv 2412.19437 sec. 2.2, eq. 21-22):
      h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],   h^k = TRM_k(h'),   logits = OutHead(norm(h^k))
  with the model's own embedding and output head (shared, not copied). The paper writes the concatenation with
  h^{k-1} first; DeepSeek-V3's checkpoints (`eh_proj`, read by vLLM and SGLang) put the embedding first, which is
  the same function with M's columns swapped, and is the order used here so their weights load as they are.
  TRM_k is one decoder block of the model's attention kind; its feed-forward is the dense MLP (an MoE block here
  would need its router statistics in the balancing losses: not done)."""

  def __init__(self, spec: ModelSpec, options: RuntimeOptions, rngs: nnx.Rngs):
    norm = lambda: make_norm(spec.norm, spec.d_model, eps=spec.norm_eps, use_bias=spec.use_bias)
    self.embed_norm, self.hidden_norm = norm(), norm()  # DeepSeek-V3's enorm, hnorm
    self.projection = param(rngs, (2 * spec.d_model, spec.d_model), (None, "embed"), std=spec.init_std)  # eh_proj
    self.block = DecoderBlock(spec, options, -1, rngs)  # layer -1: no MoE layer
    self.output_norm = norm()  # shared_head.norm: the head sees normalised states, as after the final norm

  def __call__(self, previous, next_embeddings, positions, segments=None, cache=None, lengths=None):
    """(h^k [batch, seq, embed], its normalised form for the output head, the block's new cache). With a cache
    (the block attention's, `init_cache`) the positions are written at [lengths, lengths + seq), as in
    `layers.cache`: how self-speculative decoding drafts (generate/speculative.py)."""
    x = jnp.concatenate([self.embed_norm(next_embeddings), self.hidden_norm(previous)], axis=-1)
    x = x @ self.projection[...].astype(x.dtype)
    start = jnp.zeros((x.shape[0],), jnp.int32) if lengths is None else lengths
    x, cache = self.block(x, positions, cache, start, segments)
    return x, self.output_norm(x), cache

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    return self.block.attn.init_cache(batch, max_len, dtype)


def stacked_blocks(spec: ModelSpec, options: RuntimeOptions, start: int, stop: int, rngs: nnx.Rngs) -> DecoderBlock:
  """Layers [start, stop) as one DecoderBlock whose variables have a leading `layers` axis (logical name "layers",
  which the sharding rules never split). Each layer draws its own initial weights."""

  @nnx.split_rngs(splits=stop - start)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return DecoderBlock(spec, options, start, rngs)

  return make(rngs)


class Transformer(nnx.Module):
  """Token embedding (+ learned positions) -> blocks -> final norm -> (tied) output head.

  `spec`: what the model is (a `ModelSpec`, or a `config.model` resolved to one in float32); `options`: how it
  computes (`RuntimeOptions`: mesh, MLA form, decode kernel, remat), fixed at construction.
  """

  def __init__(self, spec: ModelSpec | ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               options: RuntimeOptions = RuntimeOptions()):
    spec = model_spec(spec)
    self.spec, self.options = spec, options
    self.embed = Embed(spec.vocab_size, spec.d_model, std=spec.init_std, rngs=rngs)
    self.positions = (LearnedPositions(spec.max_seq_len, spec.d_model, std=spec.init_std, rngs=rngs)
                      if spec.positions == "learned" else None)
    if spec.scan_layers:
      self.blocks = None
      self.layer_stacks = nnx.List([stacked_blocks(spec, options, start, stop, rngs)
                                    for start, stop in spec.layer_groups])
    else:
      self.blocks = nnx.List([DecoderBlock(spec, options, i, rngs) for i in range(spec.num_layers)])
      self.layer_stacks = None
    self.final_norm = make_norm(spec.norm, spec.d_model, eps=spec.norm_eps, use_bias=spec.use_bias)
    self.head = (None if spec.tie_embeddings else
                 param(rngs, (spec.d_model, spec.vocab_size), ("embed", "vocab"), std=spec.init_std))
    self.mtp = nnx.List([MTPModule(spec, options, rngs) for _ in range(spec.mtp_depth)]) if spec.mtp_depth else None

  @property
  def compute_dtype(self):
    return self.spec.compute_dtype

  def block_modules(self) -> list[DecoderBlock]:
    """The block modules: one per layer (loop layout) or one per stack of layers (scan layout)."""
    return list(self.blocks if self.blocks is not None else self.layer_stacks)

  def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> DecodeCache:
    """One cache entry per block module: [batch, max_len, ...] arrays per layer, or [layers, batch, max_len, ...]
    per stack in the scan layout."""
    max_len = max_len or self.spec.max_seq_len
    dtype = dtype or self.compute_dtype
    if self.blocks is not None:
      layers = tuple(block.attn.init_cache(batch, max_len, dtype) for block in self.blocks)
    else:
      layers = tuple(
          {name: jnp.zeros((stop - start,) + a.shape, a.dtype)
           for name, a in block.attn.init_cache(batch, max_len, dtype).items()}
          for block, (start, stop) in zip(self.layer_stacks, self.spec.layer_groups))
    return DecodeCache(layers=layers, lengths=jnp.zeros((batch,), jnp.int32))

  def _run_block(self, block, x, positions, layer_cache, start, segments, stacked: bool):
    """One block module over x: a layer, or (stacked) its layers by nnx.scan; under jax.checkpoint if remat."""
    if layer_cache is None:  # training / scoring: x is the only thing carried
      def layer(block, x):
        return block(x, positions, None, start, segments)[0]
    else:
      def layer(block, x, layer_cache):
        return block(x, positions, layer_cache, start, segments)

    if self.options.remat != "none":
      layer = nnx.remat(layer, policy=REMAT_POLICIES[self.options.remat], prevent_cse=not stacked)
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
    if cache is not None:  # [batch, max_len, ...] per layer, [layers, batch, max_len, ...] per stack (scan layout)
      check_room(start, seq, next(iter(cache.layers[0].values())).shape[1 if self.blocks is not None else 2])
    if positions is None:
      positions = start[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]
    mesh_axes = self.options.mesh_axes
    x = self.embed(tokens, self.compute_dtype)
    if self.positions is not None:
      x = x + self.positions(positions, self.compute_dtype)
    x = constrain_batch(x, mesh_axes)
    new_layers = []
    for i, block in enumerate(self.block_modules()):
      x, layer_cache = self._run_block(block, x, positions, None if cache is None else cache.layers[i], start,
                                       segments, stacked=self.blocks is None)
      x = constrain_batch(x, mesh_axes)
      new_layers.append(layer_cache)
    x = self.final_norm(x)
    if cache is None:
      return x, None
    return x, DecodeCache(layers=tuple(new_layers), lengths=cache.lengths + seq)

  def mtp_hidden(self, hidden: jax.Array, targets: jax.Array, positions: jax.Array | None = None,
                 segments: jax.Array | None = None) -> list[jax.Array]:
    """The normalised outputs of the MTP modules, [batch, seq, embed] each, for the output head.

    `hidden` is the model's final-norm output on `inputs` and `targets` the next tokens (targets[i] = t_{i+1}).
    Module k (1-based) at position i embeds t_{i+k} = targets[i + k - 1] and predicts t_{i+k+1} = targets[i + k]
    (`mtp_targets`); it is fed module k-1's h^{k-1} (the model's hidden for k = 1). Sequences keep their length:
    positions past seq - k have no token to embed (they embed token 0) and no target, and causal attention keeps
    them out of every earlier position."""
    batch, seq = targets.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None, :], (batch, seq))
    outputs, previous = [], hidden
    for k, module in enumerate(self.mtp or (), start=1):
      shifted = jnp.pad(targets[:, k - 1:], ((0, 0), (0, k - 1)))
      previous, normalised, _ = module(previous, self.embed(shifted, self.compute_dtype), positions, segments)
      outputs.append(normalised)
    return outputs

  def output_head(self) -> jax.Array:
    """The [embed, vocab] output projection in the compute dtype (the embedding table when tied)."""
    w = self.embed.embedding[...].T if self.head is None else self.head[...]
    return w.astype(self.compute_dtype)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache: DecodeCache | None = None,
               segments: jax.Array | None = None):
    x, new_cache = self.hidden(tokens, positions, cache, segments)
    logits = (x @ self.output_head()).astype(jnp.float32)
    return logits if cache is None else (logits, new_cache)


def mtp_targets(targets: jax.Array, k: int, segments: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(labels, mask) of MTP module k: labels[i] = targets[i + k] (t_{i+k+1}); mask False where i + k is past the
  sequence or, for packed documents, in another document than position i."""
  batch, seq = targets.shape
  labels = jnp.pad(targets[:, k:], ((0, 0), (0, k)))
  mask = jnp.broadcast_to(jnp.arange(seq)[None, :] < seq - k, (batch, seq))
  if segments is not None:
    mask = mask & (segments == jnp.pad(segments[:, k:], ((0, 0), (0, k)), constant_values=-1))
  return labels, mask


def build_model(spec: ModelSpec | ml_collections.ConfigDict, *, seed: int = 0, compute_dtype=None,
                options: RuntimeOptions = RuntimeOptions()) -> Transformer:
  """A model with freshly initialised weights (`seed`). `compute_dtype` (a name or dtype) resolves a config.model;
  a ModelSpec carries its own."""
  if compute_dtype is not None:
    if isinstance(spec, ModelSpec):
      raise ValueError("a ModelSpec carries its compute dtype; pass compute_dtype with a config.model only")
    spec = ModelSpec.from_config(spec, compute_dtype)
  return Transformer(spec, rngs=nnx.Rngs(params=seed), options=options)


def abstract_model(spec: ModelSpec | ml_collections.ConfigDict,
                   options: RuntimeOptions = RuntimeOptions()) -> Transformer:
  """The model with jax.ShapeDtypeStruct leaves (nothing computed): the one way to get a graph definition, the
  shapes a checkpoint restores into, or a model to lower for memory analysis."""
  return nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(0), options=options))


def with_options(model: Transformer, options: RuntimeOptions) -> Transformer:
  """A model with `model`'s weights (the same arrays, not copies) under other runtime options; `model` itself is
  unchanged. Its graph definition is rebuilt from the spec, which is what options are part of."""
  graphdef = nnx.graphdef(abstract_model(model.spec, options))
  # Values sown by an eager forward pass (nnx.Intermediate: MoE router statistics) are not part of the model.
  return nnx.merge(graphdef, nnx.state(model, nnx.Not(nnx.Intermediate)))


def for_inference(model: Transformer, options: RuntimeOptions = RuntimeOptions()) -> Transformer:
  """`model`'s weights (the same arrays) as the single-device program without remat under `options`, with dropless
  MoE dispatch: capacity dispatch shares expert slots among all tokens of a call, so a row's tokens (and the right
  padding of shorter rows) would change another row's result. Dropless computes each token on its own; the weights
  are the same. What the decoder (generate/decode.py) and the scorer (evaluation/scoring.py) run."""
  spec = model.spec if model.spec.moe_dispatch == "dropless" else model.spec.replace(moe_dispatch="dropless")
  # Values sown by an eager forward pass (nnx.Intermediate: MoE router statistics) are not part of the model.
  return nnx.merge(nnx.graphdef(abstract_model(spec, options)), nnx.state(model, nnx.Not(nnx.Intermediate)))


def moe_paths(spec: ModelSpec) -> list[tuple[tuple, int]]:
  """(path of an MoE module in the model, number of layers it holds) in layer order: the one place the order of
  MoE layers is defined. Loop layout: ("blocks", i, "ffn") per MoE layer; scan layout: ("layer_stacks", j, "ffn")
  for the stack of MoE layers, whose variables have a leading layers axis."""
  if not spec.scan_layers:
    return [(("blocks", i, "ffn"), 1) for i in spec.moe_layers]
  return [(("layer_stacks", j, "ffn"), stop - start) for j, (start, stop) in enumerate(spec.layer_groups)
          if spec.is_moe_layer(start)]


def _at(tree, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def forward_with_moe_stats(model: Transformer, tokens: jax.Array, positions: jax.Array | None = None,
                           segments: jax.Array | None = None) -> tuple[jax.Array, list[dict]]:
  """(final hidden states, per-MoE-layer router statistics in layer order) via `nnx.capture`; [] for dense models.
  Statistics sown inside a scanned stack come out with a leading layers axis and are split per layer."""
  (x, _), captured = nnx.capture(model.hidden, MoEStats)(tokens, positions, None, segments)
  stats = []
  for path, depth in moe_paths(model.spec):
    value = _at(captured, path)["stats"].get_value()[0]
    stats.extend([value] if not model.spec.scan_layers else
                 [jax.tree.map(lambda a, i=i: a[i], value) for i in range(depth)])
  return x, stats
