"""config.json <-> config.model for `gpt2`, `llama`, `deepseek_v2` and `deepseek_v3`, both ways from one table.

Each model type is a tuple of rules (`_RULES`); `config_from_hf` calls every rule's `read`, `hf_config_from` every
rule's `write`, so each field is declared once for both directions:

  Field(ours, hf)   a config.model key <-> a config.json field: the HF default, a categorical value map, the spec
                    attribute exported for derived widths, and what an expert-less model writes instead
  Fixed(hf, value)  an HF field supported at one value: any other is refused on import; written on export
  Written(hf, v)    an HF field that cannot change the eval-mode logits (dropout, architectures) or that the weight
                    mapping reads (rope_interleave): any value is read, `v` is written
  Ours(key, value)  a config.model value the model type implies: set on import, required on export
  Check(...)        a condition on several keys, checked after import and before export
  _Rope, _V2Groups  the two structured fields (rope_parameters; DeepSeek-V2's topk_method with n_group)

Every config field that changes what the model computes is mapped or refused: an unsupported value is a
`HFConversionError` naming the field. Fields that cannot change the eval-mode forward pass are read by a `Written`
rule or listed in `_INERT_FIELDS`; anything else unknown is refused, so a new transformers feature is never silently
dropped. Export reads the values through `ModelSpec`, so derived widths (head_dim, num_kv_heads, expert_hidden) are
resolved by the one rule in models/spec.py.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import ml_collections

from superlm_jax.config import base_config, validate
from superlm_jax.interop import HFConversionError
from superlm_jax.models.spec import ModelSpec

# Fields that cannot change logits in eval mode, per model type (plus the common ones).
_COMMON_INERT = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "output_attentions",
    "output_hidden_states", "return_dict", "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "task_specific_params", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "finetuning_task", "_attn_implementation_autoset", "auto_map", "output_router_logits",
    "router_aux_loss_coef", "pretraining_tp", "attention_dropout", "keys_to_ignore_at_inference",
}
# DeepSeek: head_dim / qk_head_dim are derived; aux_loss_alpha / seq_aux / ep_size only concern training or
# parallelism; multi-token-prediction modules (num_nextn_predict_layers) never feed the next-token logits.
_DEEPSEEK_INERT = _COMMON_INERT | {"head_dim", "qk_head_dim", "aux_loss_alpha", "seq_aux", "ep_size"}
_INERT_FIELDS = {
    "gpt2": _COMMON_INERT | {"summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
                             "summary_use_proj", "reorder_and_upcast_attn", "n_ctx"},
    "llama": _COMMON_INERT,
    "deepseek_v2": _DEEPSEEK_INERT,
    "deepseek_v3": _DEEPSEEK_INERT | {"num_nextn_predict_layers", "num_mtp_layers"},
}


def read_hf_config(path: str | pathlib.Path) -> dict:
  path = pathlib.Path(path)
  if not path.is_dir():
    raise HFConversionError(f"Hugging Face checkpoint directory {path} does not exist")
  config_path = path / "config.json"
  if not config_path.is_file():
    raise HFConversionError(f"no config.json in {path}: not a Hugging Face model directory")
  try:
    return json.loads(config_path.read_text())
  except ValueError as e:
    raise HFConversionError(f"cannot parse {config_path}: {e}") from e


# ====================================================================================== the two directions
class _Reader:
  """An HF config dict being read into `m` (config.model), remembering the fields consumed so leftovers are refused."""

  def __init__(self, hf: dict, model_type: str, m: ml_collections.ConfigDict):
    self.hf, self.model_type, self.m, self.used = hf, model_type, m, set()

  def get(self, key: str, default: Any = None) -> Any:
    self.used.add(key)
    value = self.hf.get(key, default)
    return default if value is None else value

  def require(self, key: str, allowed, default: Any = None, why: str = ""):
    value = self.get(key, default)
    if value not in allowed:
      self.refuse(f"{key}={value!r} is not supported (supported: {', '.join(map(repr, allowed))})"
                  + (f": {why}" if why else ""))
    return value

  def refuse(self, what: str):
    raise HFConversionError(f"{self.model_type} config field {what}")

  def check_leftovers(self) -> None:
    unknown = sorted(set(self.hf) - self.used - _INERT_FIELDS[self.model_type])
    if unknown:
      self.refuse(f"{unknown[0]} is not supported by superlm_jax (unknown fields: {', '.join(unknown)})")


@dataclasses.dataclass
class _Writer:
  """The HF config dict being written for `spec` (`rope_interleave`: DeepSeek-V3's rotary layout, an export option)."""
  spec: ModelSpec
  model_type: str
  rope_interleave: bool
  hf: dict

  @property
  def moe(self) -> bool:
    return self.spec.n_routed_experts > 0

  def refuse(self, what: str):
    raise HFConversionError(f"cannot export to {self.model_type}: {what}")


def _resolve(value: Any, source: Any) -> Any:
  """A rule's constant, or its value computed from `source` (config.model on import, the writer on export)."""
  return value(source) if callable(value) else value


_UNSET = object()


# ====================================================================================== rule kinds
@dataclasses.dataclass(frozen=True)
class Field:
  """config.model[ours] <-> config.json[hf].

  `kind` converts the JSON value (int, float, bool); `default` is transformers' value for an absent or null field (a
  callable of config.model when derived; None: the field is required). `values` maps a categorical field's HF
  values to ours: other HF values are refused on import, and export writes the first HF spelling of each of ours
  (an ours without one is refused). `source` is the ModelSpec attribute exported when it is not `ours` (a resolved
  width). `at_most` bounds the imported value by another key. `dense` is written instead when the model has no
  experts (DeepSeek's expert fields for a dense MLA model). `null_zero` writes 0 as null."""
  ours: str
  hf: str
  kind: Callable = int
  default: Any = None
  values: dict | None = None
  source: str | None = None
  at_most: str | None = None
  dense: Any = _UNSET
  null_zero: bool = False
  why: str = ""

  def read(self, r: _Reader) -> None:
    default = _resolve(self.default, r.m)
    if self.values is not None:
      value = self.values[r.require(self.hf, tuple(self.values), default, self.why)]
    else:
      value = r.get(self.hf, default)
      if value is None:
        r.refuse(f"{self.hf} is missing")
      value = self.kind(value)
    r.m[self.ours] = min(value, r.m[self.at_most]) if self.at_most else value

  def write(self, w: _Writer) -> None:
    if self.dense is not _UNSET and not w.moe:
      w.hf[self.hf] = _resolve(self.dense, w.spec)
      return
    value = getattr(w.spec, self.source or self.ours)
    if self.values is not None:
      spelling = {ours: hf for hf, ours in reversed(self.values.items())}
      if value not in spelling:
        w.refuse(f"model.{self.ours}={value!r} ({self.why or 'supported: ' + ', '.join(map(repr, spelling))})")
      value = spelling[value]
    else:
      value = self.kind(value)
    w.hf[self.hf] = None if self.null_zero and not value else value


@dataclasses.dataclass(frozen=True)
class Fixed:
  """config.json[hf] supported at `value` only. With `written` False it is only checked on import: fields only
  DeepSeek's own config.json carries (transformers' config classes take no such argument) and GPT-2's
  add_cross_attention, which transformers leaves off."""
  hf: str
  value: Any
  written: bool = True

  def read(self, r: _Reader) -> None:
    r.require(self.hf, (self.value,), self.value)

  def write(self, w: _Writer) -> None:
    if self.written:
      w.hf[self.hf] = self.value


@dataclasses.dataclass(frozen=True)
class Written:
  """config.json[hf] accepted with any value on import, written as `value` (a constant or a callable of the writer)."""
  hf: str
  value: Any

  def read(self, r: _Reader) -> None:
    r.get(self.hf)

  def write(self, w: _Writer) -> None:
    w.hf[self.hf] = _resolve(self.value, w)


def _any_value(spec: ModelSpec) -> bool:
  del spec
  return True


@dataclasses.dataclass(frozen=True)
class Ours:
  """config.model[key] = value for this model type on import; on export the spec must satisfy `holds` (default:
  have that value), for models with experts only when `moe_only`."""
  key: str
  value: Any
  why: str = ""
  holds: Callable[[ModelSpec], bool] | None = None
  moe_only: bool = False

  def read(self, r: _Reader) -> None:
    r.m[self.key] = self.value

  def write(self, w: _Writer) -> None:
    if self.moe_only and not w.moe:
      return
    if not (self.holds(w.spec) if self.holds else getattr(w.spec, self.key) == self.value):
      w.refuse(f"model.{self.key}={getattr(w.spec, self.key)!r} ({self.why or f'needs {self.value!r}'})")


@dataclasses.dataclass(frozen=True)
class Check:
  """A condition `holds` on config.model keys (read as config.model on import, as the spec on export)."""
  fields: str  # the HF fields named when an import fails
  holds: Callable[[Any], bool]
  why: str

  def read(self, r: _Reader) -> None:
    if not self.holds(r.m):
      r.refuse(f"{self.fields}: {self.why}")

  def write(self, w: _Writer) -> None:
    if not self.holds(w.spec):
      w.refuse(self.why)


# YaRN's scalars: (config.model key, rope_parameters key, transformers' default). Keys off by default (0) are only
# written when set.
_YARN_FIELDS = (("rope_beta_fast", "beta_fast", 32.0), ("rope_beta_slow", "beta_slow", 1.0),
                ("rope_mscale", "mscale", 0.0), ("rope_mscale_all_dim", "mscale_all_dim", 0.0),
                ("rope_attention_factor", "attention_factor", 0.0), ("rope_truncate", "truncate", True))


class _Rope:
  """RoPE base and scaling <-> `rope_parameters` (transformers >= 5); older `rope_theta` / `rope_scaling` are read."""

  def read(self, r: _Reader) -> None:
    m = r.m
    params = dict(r.get("rope_parameters") or r.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None)
    m.rope_theta = float(theta if theta is not None else r.get("rope_theta", 10000.0))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
      r.refuse("partial_rotary_factor is not supported (must be 1)")
    if kind == "default":
      if params:
        r.refuse(f"rope_parameters {sorted(params)} are not supported with rope_type 'default'")
      return
    if kind != "yarn":
      r.refuse(f"rope_parameters.rope_type={kind!r} is not supported (supported: 'default', 'yarn')")
    original = params.pop("original_max_position_embeddings", None) or r.get("original_max_position_embeddings",
                                                                             m.max_seq_len)
    factor = params.pop("factor", None)
    m.rope_scaling = "yarn"
    m.rope_factor = float(factor if factor is not None else m.max_seq_len / original)
    m.rope_original_max_len = int(original)
    for ours, hf, default in _YARN_FIELDS:  # as transformers reads them: `get(k) or default`, `get("truncate", True)`
      value = params.pop(hf, None)
      m[ours] = bool(default if value is None else value) if isinstance(default, bool) else float(value or default)
    if params:
      r.refuse(f"rope_parameters.{sorted(params)[0]} is not supported")

  def write(self, w: _Writer) -> None:
    s = w.spec
    if s.rope_scaling == "none":
      w.hf["rope_parameters"] = {"rope_type": "default", "rope_theta": s.rope_theta}
      return
    params = {"rope_type": "yarn", "rope_theta": s.rope_theta, "factor": s.rope_factor,
              "original_max_position_embeddings": s.rope_original_max_len}
    params.update({hf: getattr(s, ours) for ours, hf, default in _YARN_FIELDS if getattr(s, ours) or default})
    w.hf["rope_parameters"] = params


class _V2Groups:
  """DeepSeek-V2's `topk_method`: "greedy" (one group: n_group / topk_group unused, null) or "group_limited_greedy"
  over n_group groups."""

  def read(self, r: _Reader) -> None:
    method = r.require("topk_method", ("greedy", "group_limited_greedy"), "greedy")
    groups = {key: r.get(key) for key in ("n_group", "topk_group")}
    for key, value in groups.items():
      if method == "group_limited_greedy" and value is None:
        r.refuse(f"{key} is missing (topk_method='group_limited_greedy')")
      r.m[key] = int(value) if method == "group_limited_greedy" else 1

  def write(self, w: _Writer) -> None:
    grouped = w.moe and w.spec.n_group > 1
    w.hf["topk_method"] = "group_limited_greedy" if grouped else "greedy"
    w.hf["n_group"], w.hf["topk_group"] = (w.spec.n_group, w.spec.topk_group) if grouped else (None, None)


def _architecture(name: str) -> Written:
  """transformers' class for the checkpoint (`architectures` is inert on import)."""
  return Written("architectures", lambda w: [name])


# ====================================================================================== the table
_COMMON = (Field("vocab_size", "vocab_size"), Ours("scoring", "softmax", "transformers has no Scalable-Softmax"),
           Written("dtype", "float32"))
_GPT2 = _COMMON + (
    Ours("norm", "layernorm"), Ours("positions", "learned"), Ours("attention", "mha"), Ours("use_bias", True),
    Ours("n_routed_experts", 0, "GPT-2 has no experts"),
    Field("d_model", "n_embd"), Field("num_layers", "n_layer"), Field("num_heads", "n_head"),
    Ours("num_kv_heads", 0, "GPT-2 needs num_kv_heads = num_heads", holds=lambda s: s.num_kv_heads == s.num_heads),
    Ours("head_dim", 0, "GPT-2 needs head_dim = d_model / num_heads",
         holds=lambda s: s.head_dim * s.num_heads == s.d_model),
    Field("d_ff", "n_inner", default=lambda m: 4 * m.d_model), Field("max_seq_len", "n_positions", default=1024),
    Field("norm_eps", "layer_norm_epsilon", float, default=1e-5),
    Field("mlp", "activation_function", default="gelu_new", why="GPT-2 needs a GELU MLP",
          values={"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu", "gelu": "gelu_exact"}),
    Fixed("scale_attn_weights", True), Fixed("scale_attn_by_inverse_layer_idx", False),
    Fixed("add_cross_attention", False, written=False),
    Field("tie_embeddings", "tie_word_embeddings", bool, default=True),
    _architecture("GPT2LMHeadModel"),
    Written("attn_pdrop", 0.0), Written("embd_pdrop", 0.0), Written("resid_pdrop", 0.0))
_DECODER = _COMMON + (  # Llama and DeepSeek: pre-norm RMSNorm, RoPE, SwiGLU, no biases
    Ours("norm", "rmsnorm"), Ours("positions", "rope"), Ours("mlp", "swiglu"), Ours("use_bias", False),
    Field("d_model", "hidden_size"), Field("num_layers", "num_hidden_layers"),
    Field("num_heads", "num_attention_heads"), Field("d_ff", "intermediate_size"),
    Field("max_seq_len", "max_position_embeddings"), Field("norm_eps", "rms_norm_eps", float, default=1e-6),
    Field("tie_embeddings", "tie_word_embeddings", bool, default=False),
    Fixed("hidden_act", "silu"), Fixed("attention_bias", False), Fixed("mlp_bias", False),
    Written("attention_dropout", 0.0), _Rope())
_LLAMA = _DECODER + (
    Ours("attention", "mha"), Ours("n_routed_experts", 0, "Llama has no experts"),
    Field("num_kv_heads", "num_key_value_heads", default=lambda m: m.num_heads),
    Field("head_dim", "head_dim", default=lambda m: m.d_model // m.num_heads),
    _architecture("LlamaForCausalLM"))
_MLA = _DECODER + (
    Ours("attention", "mla"),
    # MLA's keys and values come from the latent per head; transformers reads this field for its caches.
    Written("num_key_value_heads", lambda w: w.spec.num_heads),
    Field("q_lora_rank", "q_lora_rank", default=0, null_zero=True),  # null: a direct query projection
    Field("kv_lora_rank", "kv_lora_rank"), Field("qk_nope_head_dim", "qk_nope_head_dim"),
    Field("qk_rope_head_dim", "qk_rope_head_dim"), Field("v_head_dim", "v_head_dim"),
    Check("qk_rope_head_dim", lambda m: m.qk_rope_head_dim > 0, "must be > 0 (MLA has a rotary key)"),
    Ours("latent_norm_eps", 1e-6, "transformers fixes 1e-6"),  # its q_a / kv_a layernorms: the RMSNorm default
    Fixed("moe_layer_freq", 1, written=False),  # every block from first_k_dense on is MoE: all transformers does
    Field("n_routed_experts", "n_routed_experts", dense=1),
    Field("num_experts_per_tok", "num_experts_per_tok", dense=1),
    Field("moe_intermediate_size", "moe_intermediate_size", source="expert_hidden", dense=lambda s: s.d_ff),
    Ours("moe_dispatch", "dropless", holds=_any_value))  # transformers never drops tokens


def _deepseek(defaults: dict) -> tuple:
  """The MLA rules with one DeepSeek version's defaults (transformers' DeepseekV2Config / DeepseekV3Config)."""
  return _MLA + (
      Field("n_shared_experts", "n_shared_experts", default=defaults["n_shared_experts"], dense=0),
      Field("routed_scaling_factor", "routed_scaling_factor", float, default=defaults["routed_scaling_factor"],
            dense=1.0),
      Field("first_k_dense", "first_k_dense_replace", default=defaults["first_k_dense_replace"],
            at_most="num_layers", dense=lambda s: s.num_layers))


_DEEPSEEK_V2 = _deepseek(dict(first_k_dense_replace=0, routed_scaling_factor=1.0, n_shared_experts=2)) + (
    Ours("router_scoring", "softmax", "DeepSeek-V2 routes with softmax scores; export a sigmoid router as "
         "deepseek_v3", moe_only=True),
    Fixed("scoring_func", "softmax", written=False), _V2Groups(),
    Field("norm_topk_prob", "norm_topk_prob", values={False: False}, default=False, dense=False,
          why="transformers' DeepseekV2 never renormalises the top-k weights"),
    _architecture("DeepseekV2ForCausalLM"))
_DEEPSEEK_V3 = _deepseek(dict(first_k_dense_replace=3, routed_scaling_factor=2.5, n_shared_experts=1)) + (
    Ours("router_scoring", "sigmoid", "DeepSeek-V3 routes with sigmoid scores; export a softmax router as "
         "deepseek_v2", moe_only=True),
    Fixed("scoring_func", "sigmoid", written=False), Fixed("topk_method", "noaux_tc", written=False),
    Field("norm_topk_prob", "norm_topk_prob", bool, default=True, dense=True),
    Field("n_group", "n_group", default=8, dense=1), Field("topk_group", "topk_group", default=4, dense=1),
    Check("n_group / n_routed_experts",
          lambda m: not (m.n_routed_experts and m.first_k_dense < m.num_layers) or m.n_routed_experts // m.n_group >= 2,
          "DeepSeek-V3 groups need >= 2 experts each (it scores the top 2 per group)"),
    Written("rope_interleave", lambda w: w.rope_interleave),  # the weight mapping permutes the rotary rows
    _architecture("DeepseekV3ForCausalLM"))
_RULES = {"gpt2": _GPT2, "llama": _LLAMA, "deepseek_v2": _DEEPSEEK_V2, "deepseek_v3": _DEEPSEEK_V3}
SUPPORTED_MODEL_TYPES = tuple(_RULES)


# ====================================================================================== public API
def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """Our full config (base defaults + the model section mapped from the HF config dict)."""
  model_type = hf.get("model_type")
  if model_type not in _RULES:
    raise HFConversionError(f"config field model_type={model_type!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  config = base_config()
  config.name = f"hf:{model_type}"
  reader = _Reader(hf, model_type, config.model)
  reader.get("model_type")
  for rule in _RULES[model_type]:
    rule.read(reader)
  reader.check_leftovers()
  config.data.max_length = min(config.data.max_length, config.model.max_seq_len)
  config.data.stride = min(config.data.stride, config.data.max_length)
  validate(config)
  return config


def hf_config_from(config: ml_collections.ConfigDict, model_type: str | None = None,
                   rope_interleave: bool = True) -> dict:
  """The HF config dict for our model config (the inverse of `config_from_hf`); refuses what HF cannot express."""
  model_type = model_type or infer_model_type(config.model)
  if model_type not in _RULES:
    raise HFConversionError(f"cannot export to {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  if config.model.mtp_depth:  # DeepSeek-V3's num_nextn_predict_layers: its tensor mapping is not written yet
    raise HFConversionError(f"cannot export model.mtp_depth={config.model.mtp_depth}: the multi-token-prediction "
                            "modules have no Hugging Face mapping yet")
  writer = _Writer(ModelSpec.from_config(config.model), model_type, rope_interleave, {"model_type": model_type})
  for rule in _RULES[model_type]:
    rule.write(writer)
  return writer.hf


def infer_model_type(m: ml_collections.ConfigDict) -> str:
  """The HF model type that can hold a model config: gpt2, llama, deepseek_v3 (sigmoid router or dense MLA) or
  deepseek_v2 (softmax router)."""
  if m.attention == "mla":
    return "deepseek_v2" if m.n_routed_experts and m.router_scoring == "softmax" else "deepseek_v3"
  if m.norm == "layernorm":
    return "gpt2"
  return "llama"


def rope_interleaved(hf: dict) -> bool:
  """Whether the checkpoint's rotary features are interleaved pairs: DeepSeek-V2 always, V3 unless disabled."""
  if hf["model_type"] == "deepseek_v2":
    return True
  if hf["model_type"] == "deepseek_v3":
    return bool(hf.get("rope_interleave", True))
  return False
