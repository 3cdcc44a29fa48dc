"""What a configuration costs, computed from the config alone: parameters, training FLOPs per token and KV-cache
bytes per token. Used for MFU logging, reports and comparing architectures before building them."""

from __future__ import annotations

import ml_collections

from superlm_jax.models.transformer import head_dim, is_moe_layer, num_kv_heads


def _attention_matmul_params(cfg: ml_collections.ConfigDict) -> int:
  d, h = cfg.d_model, cfg.num_heads
  if cfg.attention == "mla":
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    query = d * cfg.q_lora_rank + cfg.q_lora_rank * h * qk if cfg.q_lora_rank else d * h * qk
    latent = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # c_kv down-projection and the shared rotary key
    up = cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return query + latent + up + h * cfg.v_head_dim * d
  return d * head_dim(cfg) * (2 * h + 2 * num_kv_heads(cfg))  # q, o and k, v projections.


def _ffn_matmul_params(cfg: ml_collections.ConfigDict, layer: int) -> tuple[int, int]:
  """(total, active per token) matmul weights of a block's feed-forward slot."""
  matrices = 3 if cfg.mlp == "swiglu" else 2
  if not is_moe_layer(cfg, layer):
    dense = matrices * cfg.d_model * cfg.d_ff
    return dense, dense
  expert = matrices * cfg.d_model * (cfg.moe_intermediate_size or cfg.d_ff)
  shared = cfg.n_shared_experts * expert
  router = cfg.d_model * cfg.n_routed_experts
  return (router + shared + cfg.n_routed_experts * expert,
          router + shared + cfg.num_experts_per_tok * expert)


def _attention_params_per_layer(cfg: ml_collections.ConfigDict) -> int:
  """Projections plus MLA's latent norm scales, attention biases and SSMax scales of one attention module."""
  hd, kvh = head_dim(cfg), num_kv_heads(cfg)
  per_layer = _attention_matmul_params(cfg)
  if cfg.attention == "mla":
    per_layer += cfg.kv_lora_rank + cfg.q_lora_rank  # RMSNorm scales of the latents
  elif cfg.use_bias:
    per_layer += hd * (cfg.num_heads + 2 * kvh) + cfg.d_model
  if cfg.scoring == "ssmax":
    per_layer += cfg.num_heads * (2 if cfg.ssmax_bias else 1)
  return per_layer


def attention_parameter_count(cfg: ml_collections.ConfigDict) -> int:
  """Parameters of all attention modules."""
  return cfg.num_layers * _attention_params_per_layer(cfg)


def _ffn_params(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
  """(total, active per token) parameters of all feed-forward slots, biases included."""
  total = active = 0
  for layer in range(cfg.num_layers):
    layer_total, layer_active = _ffn_matmul_params(cfg, layer)
    bias = (cfg.d_ff + cfg.d_model) if cfg.use_bias and not is_moe_layer(cfg, layer) else 0
    total += layer_total + bias
    active += layer_active + bias
  return total, active


def parameter_count(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """{'total', 'active', 'embedding', 'non_embedding'} parameter counts, norms and biases included. 'active' is
  what one token uses (MoE: shared + k routed experts); it equals 'total' for dense models."""
  norm = cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.use_bias else 1)
  embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  if cfg.positions == "learned":
    embedding += cfg.max_seq_len * cfg.d_model
  ffn_total, ffn_active = _ffn_params(cfg)
  shared = attention_parameter_count(cfg) + cfg.num_layers * 2 * norm + norm  # + block norms + final norm
  return {"total": embedding + shared + ffn_total, "active": embedding + shared + ffn_active,
          "embedding": embedding, "non_embedding": shared + ffn_total}


def flops_per_token(cfg: ml_collections.ConfigDict, seq_len: int, training: bool = True) -> float:
  """Model FLOPs per token (Chowdhery et al. 2022, PaLM, appendix B): 6 N + 12 L H Q T for training, where N
  counts the matmul weights a token uses (MoE: shared + k routed experts and the router; the output head
  included, tied or not) and the second term is the attention scores and weighted sum over T keys. A forward pass
  is a third of it. Causal masking is not discounted, by convention."""
  n_matmul = (cfg.num_layers * _attention_matmul_params(cfg)
              + sum(_ffn_matmul_params(cfg, layer)[1] for layer in range(cfg.num_layers))
              + cfg.d_model * cfg.vocab_size)
  if cfg.attention == "mla":  # scores over nope + rope width, weighted sum over v width (expanded form)
    score_dims = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) / 2
  else:
    score_dims = head_dim(cfg)
  attention = 12 * cfg.num_layers * cfg.num_heads * score_dims * seq_len
  total = 6 * n_matmul + attention
  return total if training else total / 3


def kv_cache_values_per_token(cfg: ml_collections.ConfigDict) -> int:
  """Values the decode cache holds per token and layer: MHA/GQA store K and V for each KV head; MLA stores the
  latent c_kv and the one shared rotary key (DeepSeek-V3: 512 + 64 vs 2 * 128 heads * 128 for MHA)."""
  if cfg.attention == "mla":
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim
  return 2 * num_kv_heads(cfg) * head_dim(cfg)


def kv_cache_bytes_per_token(cfg: ml_collections.ConfigDict, bytes_per_value: int = 2) -> int:
  """Bytes the decode cache holds per token over all layers (bf16 by default)."""
  return cfg.num_layers * kv_cache_values_per_token(cfg) * bytes_per_value
