"""What a configuration costs, computed from the config alone: parameters, training FLOPs per token and KV-cache
bytes per token. Used for MFU logging, reports and comparing architectures before building them."""

from __future__ import annotations

import ml_collections

from superlm_jax.models.spec import ModelSpec, model_spec


def _attention_matmul_params(spec: ModelSpec) -> int:
  d, h = spec.d_model, spec.num_heads
  if spec.attention == "mla":
    qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
    query = d * spec.q_lora_rank + spec.q_lora_rank * h * qk if spec.q_lora_rank else d * h * qk
    latent = d * (spec.kv_lora_rank + spec.qk_rope_head_dim)  # c_kv down-projection and the shared rotary key
    up = spec.kv_lora_rank * h * (spec.qk_nope_head_dim + spec.v_head_dim)
    return query + latent + up + h * spec.v_head_dim * d
  return d * spec.head_dim * (2 * h + 2 * spec.num_kv_heads)  # q, o and k, v projections.


def _ffn_matmul_params(spec: ModelSpec, layer: int) -> tuple[int, int]:
  """(total, active per token) matmul weights of a block's feed-forward slot."""
  matrices = 3 if spec.mlp == "swiglu" else 2
  if not spec.is_moe_layer(layer):
    dense = matrices * spec.d_model * spec.d_ff
    return dense, dense
  expert = matrices * spec.d_model * spec.expert_hidden
  shared = spec.n_shared_experts * expert
  router = spec.d_model * spec.n_routed_experts
  return (router + shared + spec.n_routed_experts * expert,
          router + shared + spec.num_experts_per_tok * expert)


def _attention_params_per_layer(spec: ModelSpec) -> int:
  """Projections plus MLA's latent norm scales, attention biases and SSMax scales of one attention module."""
  hd, kvh = spec.head_dim, spec.num_kv_heads
  per_layer = _attention_matmul_params(spec)
  if spec.attention == "mla":
    per_layer += spec.kv_lora_rank + spec.q_lora_rank  # RMSNorm scales of the latents
  elif spec.use_bias:
    per_layer += hd * (spec.num_heads + 2 * kvh) + spec.d_model
  if spec.scoring == "ssmax":
    per_layer += spec.num_heads * (2 if spec.ssmax_bias else 1)
  return per_layer


def attention_parameter_count(spec: ModelSpec | ml_collections.ConfigDict) -> int:
  """Parameters of all attention modules."""
  spec = model_spec(spec)
  return spec.num_layers * _attention_params_per_layer(spec)


def _ffn_params(spec: ModelSpec) -> tuple[int, int]:
  """(total, active per token) parameters of all feed-forward slots, biases included."""
  total = active = 0
  for layer in range(spec.num_layers):
    layer_total, layer_active = _ffn_matmul_params(spec, layer)
    bias = (spec.d_ff + spec.d_model) if spec.use_bias and not spec.is_moe_layer(layer) else 0
    total += layer_total + bias
    active += layer_active + bias
  return total, active


def parameter_count(spec: ModelSpec | ml_collections.ConfigDict) -> dict[str, int]:
  """{'total', 'active', 'embedding', 'non_embedding', 'mtp'} parameter counts, norms and biases included.
  'active' is what one token uses (MoE: shared + k routed experts); it equals 'total' for dense models. 'mtp': the
  multi-token-prediction modules (model.mtp_depth; each 3 norms, the [2 d, d] projection and a dense block), which
  training uses and decoding does not; counted in 'total', 'active' and 'non_embedding'."""
  spec = model_spec(spec)
  norm = spec.d_model * (2 if spec.norm == "layernorm" and spec.use_bias else 1)
  embedding = spec.vocab_size * spec.d_model * (1 if spec.tie_embeddings else 2)
  if spec.positions == "learned":
    embedding += spec.max_seq_len * spec.d_model
  ffn_total, ffn_active = _ffn_params(spec)
  shared = attention_parameter_count(spec) + spec.num_layers * 2 * norm + norm  # + block norms + final norm
  dense_ffn = _ffn_matmul_params(spec, -1)[0] + ((spec.d_ff + spec.d_model) if spec.use_bias else 0)
  mtp = spec.mtp_depth * (3 * norm + 2 * spec.d_model ** 2 + _attention_params_per_layer(spec) + 2 * norm + dense_ffn)
  shared += mtp
  return {"total": embedding + shared + ffn_total, "active": embedding + shared + ffn_active,
          "embedding": embedding, "non_embedding": shared + ffn_total, "mtp": mtp}


def flops_per_token(spec: ModelSpec | ml_collections.ConfigDict, seq_len: int, training: bool = True) -> float:
  """Model FLOPs per token (Chowdhery et al. 2022, PaLM, appendix B): 6 N + 12 L H Q T for training, where N
  counts the matmul weights a token uses (MoE: shared + k routed experts and the router; the output head
  included, tied or not) and the second term is the attention scores and weighted sum over T keys. A forward pass
  is a third of it. Causal masking is not discounted, by convention."""
  spec = model_spec(spec)
  n_matmul = (spec.num_layers * _attention_matmul_params(spec)
              + sum(_ffn_matmul_params(spec, layer)[1] for layer in range(spec.num_layers))
              + spec.d_model * spec.vocab_size)
  if spec.attention == "mla":  # scores over nope + rope width, weighted sum over v width (expanded form)
    score_dims = (spec.qk_nope_head_dim + spec.qk_rope_head_dim + spec.v_head_dim) / 2
  else:
    score_dims = spec.head_dim
  attention = 12 * spec.num_layers * spec.num_heads * score_dims * seq_len
  total = 6 * n_matmul + attention
  return total if training else total / 3


def kv_cache_values_per_token(spec: ModelSpec | ml_collections.ConfigDict) -> int:
  """Values the decode cache holds per token and layer: MHA/GQA store K and V for each KV head; MLA stores the
  latent c_kv and the one shared rotary key (DeepSeek-V3: 512 + 64 vs 2 * 128 heads * 128 for MHA)."""
  spec = model_spec(spec)
  if spec.attention == "mla":
    return spec.kv_lora_rank + spec.qk_rope_head_dim
  return 2 * spec.num_kv_heads * spec.head_dim


def kv_cache_bytes_per_token(spec: ModelSpec | ml_collections.ConfigDict, bytes_per_value: int = 2) -> int:
  """Bytes the decode cache holds per token over all layers (bf16 by default)."""
  spec = model_spec(spec)
  return spec.num_layers * kv_cache_values_per_token(spec) * bytes_per_value
