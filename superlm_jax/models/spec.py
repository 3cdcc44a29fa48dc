"""`ModelSpec`: `config.model` resolved once into what the model is, like Gemma's `TransformerConfig`.

`config.model` is what a user writes: "0 means derived" defaults (head_dim, num_kv_heads, moe_intermediate_size),
strings for dtypes, flat YaRN and router keys. Everything that builds, counts, shards or converts a model reads the
spec instead, so each of those rules is written once, here:

    spec = ModelSpec.from_config(config.model, compute_dtype="bfloat16")
    spec.head_dim, spec.num_kv_heads, spec.expert_hidden   # resolved widths
    spec.yarn, spec.router                                  # layer-level specs (None when off)
    spec.moe_layers, spec.layer_groups                      # which blocks are MoE; the scan layout's stacks
    spec.d_model, spec.attention, ...                       # every other config.model key, as given

The spec is frozen and hashable, so it can be a static attribute of a module and a jit static argument.
`superlm_jax.config.validate_model` checks the values first (one line naming the key), so a spec is always valid.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections

from superlm_jax.config import validate_model
from superlm_jax.layers.rope import YaRN
from superlm_jax.layers.router import RouterSpec

# train.compute_dtype / decode.weights names -> dtypes: the one place a dtype string is parsed.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_dtype(name: str) -> jnp.dtype:
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; one of {tuple(DTYPES)}")
  return jnp.dtype(DTYPES[name])


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A validated `config.model` with every derived value resolved (see the module docstring)."""
  model: ml_collections.FrozenConfigDict  # The keys as given; read them as attributes of the spec.
  compute_dtype: Any  # jnp.dtype of the matmuls; master weights stay float32.
  head_dim: int  # MHA/GQA per-head width (head_dim, or d_model // num_heads).
  num_kv_heads: int  # Key/value heads (num_kv_heads, or num_heads: MHA).
  expert_hidden: int  # Hidden width of each routed/shared expert (moe_intermediate_size, or d_ff).
  yarn: YaRN | None  # RoPE context extension (rope_scaling="yarn"), else None.
  router: RouterSpec | None  # How MoE layers route (None for dense models).
  moe_layers: tuple[int, ...]  # Blocks whose feed-forward slot is an MoE (DeepSeek: from first_k_dense on).
  layer_groups: tuple[tuple[int, int], ...]  # [start, stop) runs of same-structure blocks: the scan stacks.

  @classmethod
  def from_config(cls, model_cfg: ml_collections.ConfigDict, compute_dtype: Any = "float32") -> "ModelSpec":
    validate_model(model_cfg)
    m = model_cfg
    dtype = parse_dtype(compute_dtype) if isinstance(compute_dtype, str) else jnp.dtype(compute_dtype)
    moe = m.n_routed_experts > 0
    first_moe = min(m.first_k_dense, m.num_layers) if moe else m.num_layers
    # Blocks differ only in their feed-forward slot (dense before first_k_dense, MoE after): at most two stacks.
    bounds = [0, first_moe if moe else 0, m.num_layers]
    yarn = None if m.rope_scaling == "none" else YaRN(
        factor=m.rope_factor, original_max_len=m.rope_original_max_len, beta_fast=m.rope_beta_fast,
        beta_slow=m.rope_beta_slow, mscale=m.rope_mscale, mscale_all_dim=m.rope_mscale_all_dim,
        attention_factor=m.rope_attention_factor, truncate=m.rope_truncate)
    router = RouterSpec(num_experts=m.n_routed_experts, top_k=m.num_experts_per_tok, scoring=m.router_scoring,
                        norm_topk_prob=m.norm_topk_prob, routed_scaling_factor=m.routed_scaling_factor,
                        n_group=m.n_group, topk_group=m.topk_group) if moe else None
    return cls(
        model=ml_collections.FrozenConfigDict(m), compute_dtype=dtype,
        head_dim=m.head_dim or m.d_model // m.num_heads, num_kv_heads=m.num_kv_heads or m.num_heads,
        expert_hidden=m.moe_intermediate_size or m.d_ff, yarn=yarn, router=router,
        moe_layers=tuple(range(first_moe, m.num_layers)),
        layer_groups=tuple((a, b) for a, b in zip(bounds, bounds[1:]) if b > a))

  def __getattr__(self, name: str):
    # Only called for names that are not fields: the config.model keys given as is (d_model, attention, ...).
    if name.startswith("__") or name == "model":
      raise AttributeError(name)
    try:
      return getattr(self.model, name)
    except AttributeError:
      raise AttributeError(f"ModelSpec has no field or config.model key {name!r}") from None

  def is_moe_layer(self, layer: int) -> bool:
    return layer in self.moe_layers

  def to_config(self) -> ml_collections.ConfigDict:
    """A mutable copy of the model keys as given (e.g. to change one and build another spec)."""
    return ml_collections.ConfigDict(self.model.to_dict())

  def replace(self, **model_keys) -> "ModelSpec":
    """The spec of the same config with some model keys changed (validated again)."""
    cfg = self.to_config()
    cfg.update(**model_keys)
    return ModelSpec.from_config(cfg, self.compute_dtype)


def model_spec(model_cfg: "ml_collections.ConfigDict | ModelSpec", compute_dtype: Any = "float32") -> ModelSpec:
  """`model_cfg` as a spec: a ModelSpec is returned as is, a config.model is resolved."""
  if isinstance(model_cfg, ModelSpec):
    return model_cfg
  return ModelSpec.from_config(model_cfg, compute_dtype)
