"""Hugging Face checkpoints in and out: `gpt2`, `llama` (SmolLM2 is one), `deepseek_v2` and `deepseek_v3`.

    model, config = from_pretrained("path/to/hf_dir")      # config.json + *.safetensors (sharded or not)
    to_pretrained(model, config, "path/to/out_dir")        # the reverse; transformers loads it

The mapping is explicit in both directions, field by field and tensor by tensor, and the parity tests
(tests/interop) check it against `transformers` itself: same logits to 1e-4 and the same greedy tokens.

Rules:
  * Every config field that changes what the model computes is mapped or refused: an unsupported value is a
    `HFConversionError` naming the field. Fields that cannot change the eval-mode forward pass (dropout rates,
    token ids, initializer ranges, ...) are listed in `_INERT_FIELDS`; anything else unknown is refused too, so a
    new transformers feature is never silently dropped.
  * Layout: transformers' `nn.Linear` stores [out, in]; ours are [in, (heads, head_dim) | out] with named axes.
    DeepSeek's rotary features are interleaved pairs (2i, 2i+1) (`rope_interleave`, and always in DeepSeek-V2);
    ours rotate halves (i, i + d/2) like Llama, so the rotary rows of the query and shared-key projections are
    permuted once here. q.k is unchanged because both sides get the same permutation.
  * Round trips are exact: only transposes, reshapes, splits, concatenations and permutations, in float32
    (a bf16 checkpoint is upcast exactly).

transformers and torch are never imported here: safetensors files are read and written with the `flax` backend.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from superlm_jax.config import base_config, validate
from superlm_jax.errors import UserError
from superlm_jax.layers.moe import RouterBias
from superlm_jax.models import layout

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "deepseek_v2", "deepseek_v3")
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# Fields that cannot change logits in eval mode, per model type (plus the common ones).
_COMMON_INERT = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "output_attentions",
    "output_hidden_states", "return_dict", "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "task_specific_params", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "finetuning_task", "_attn_implementation_autoset", "auto_map", "output_router_logits",
    "router_aux_loss_coef", "pretraining_tp", "attention_dropout", "keys_to_ignore_at_inference",
}
_INERT_FIELDS = {
    "gpt2": _COMMON_INERT | {"attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_activation",
                             "summary_first_dropout", "summary_proj_to_labels", "summary_type", "summary_use_proj",
                             "reorder_and_upcast_attn", "n_ctx"},
    "llama": _COMMON_INERT,
    # DeepSeek: head_dim / qk_head_dim are derived; aux_loss_alpha / seq_aux / ep_size only concern training or
    # parallelism; multi-token-prediction modules (num_nextn_predict_layers) never feed the next-token logits.
    "deepseek_v2": _COMMON_INERT | {"head_dim", "qk_head_dim", "aux_loss_alpha", "seq_aux", "ep_size"},
    "deepseek_v3": _COMMON_INERT | {"head_dim", "qk_head_dim", "aux_loss_alpha", "seq_aux", "ep_size",
                                    "num_nextn_predict_layers", "num_mtp_layers"},
}


class HFConversionError(UserError):
  """A Hugging Face checkpoint (or a model to export) that we cannot represent exactly."""


# ====================================================================================== config mapping
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


class _Fields:
  """Reads an HF config dict, remembering which fields were consumed so leftovers can be refused."""

  def __init__(self, hf: dict, model_type: str):
    self.hf, self.model_type, self.used = hf, model_type, set()

  def get(self, key: str, default: Any = None) -> Any:
    self.used.add(key)
    value = self.hf.get(key, default)
    return default if value is None else value

  def require(self, key: str, allowed, default: Any = None):
    value = self.get(key, default)
    if value not in allowed:
      raise HFConversionError(f"{self.model_type} config field {key}={value!r} is not supported "
                              f"(supported: {', '.join(map(repr, allowed))})")
    return value

  def check_leftovers(self) -> None:
    unknown = sorted(set(self.hf) - self.used - _INERT_FIELDS[self.model_type])
    if unknown:
      raise HFConversionError(f"{self.model_type} config field {unknown[0]} is not supported by superlm_jax "
                              f"(unknown fields: {', '.join(unknown)})")


def _rope_settings(f: _Fields, m: ml_collections.ConfigDict, default_theta: float) -> None:
  """RoPE base and scaling from `rope_parameters` (transformers >= 5) or `rope_theta`/`rope_scaling` (older)."""
  params = dict(f.get("rope_parameters") or f.get("rope_scaling") or {})
  theta = params.pop("rope_theta", None)
  m.rope_theta = float(theta if theta is not None else f.get("rope_theta", default_theta))
  kind = params.pop("rope_type", params.pop("type", "default"))
  if params.pop("partial_rotary_factor", 1.0) != 1.0:
    raise HFConversionError(f"{f.model_type} config field partial_rotary_factor is not supported (must be 1)")
  if kind == "default":
    if params:
      raise HFConversionError(f"{f.model_type} rope_parameters {sorted(params)} are not supported with "
                              "rope_type 'default'")
    return
  if kind != "yarn":
    raise HFConversionError(f"{f.model_type} config field rope_parameters.rope_type={kind!r} is not supported "
                            "(supported: 'default', 'yarn')")
  max_pos = f.get("max_position_embeddings")
  original = params.pop("original_max_position_embeddings", None) or f.get("original_max_position_embeddings",
                                                                            max_pos)
  factor = params.pop("factor", None)
  m.rope_scaling = "yarn"
  m.rope_factor = float(factor if factor is not None else max_pos / original)
  m.rope_original_max_len = int(original)
  m.rope_beta_fast = float(params.pop("beta_fast", None) or 32.0)
  m.rope_beta_slow = float(params.pop("beta_slow", None) or 1.0)
  m.rope_mscale = float(params.pop("mscale", None) or 0.0)
  m.rope_mscale_all_dim = float(params.pop("mscale_all_dim", None) or 0.0)
  m.rope_attention_factor = float(params.pop("attention_factor", None) or 0.0)
  m.rope_truncate = bool(params.pop("truncate", True))
  if params:
    raise HFConversionError(f"{f.model_type} rope_parameters field {sorted(params)[0]} is not supported")


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """Our full config (base defaults + the model section mapped from the HF config dict)."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise HFConversionError(f"config field model_type={model_type!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  config = base_config()
  config.name = f"hf:{model_type}"
  m = config.model
  f = _Fields(hf, model_type)
  f.get("model_type")
  m.vocab_size = int(f.get("vocab_size"))
  if model_type == "gpt2":
    m.update(norm="layernorm", positions="learned", attention="mha", use_bias=True, scoring="softmax")
    m.d_model, m.num_layers, m.num_heads = int(f.get("n_embd")), int(f.get("n_layer")), int(f.get("n_head"))
    m.num_kv_heads, m.head_dim = 0, 0
    m.d_ff = int(f.get("n_inner") or 4 * m.d_model)
    m.max_seq_len = int(f.get("n_positions", 1024))
    m.norm_eps = float(f.get("layer_norm_epsilon", 1e-5))
    act = f.require("activation_function", ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu"), "gelu_new")
    m.mlp = "gelu_exact" if act == "gelu" else "gelu"
    f.require("scale_attn_weights", (True,), True)
    f.require("scale_attn_by_inverse_layer_idx", (False,), False)
    f.require("add_cross_attention", (False,), False)
    m.tie_embeddings = bool(f.get("tie_word_embeddings", True))
  else:
    m.update(norm="rmsnorm", positions="rope", scoring="softmax", use_bias=False, mlp="swiglu")
    m.d_model, m.num_layers = int(f.get("hidden_size")), int(f.get("num_hidden_layers"))
    m.num_heads = int(f.get("num_attention_heads"))
    m.d_ff = int(f.get("intermediate_size"))
    m.max_seq_len = int(f.get("max_position_embeddings"))
    m.norm_eps = float(f.get("rms_norm_eps", 1e-6))
    m.tie_embeddings = bool(f.get("tie_word_embeddings", False))
    f.require("hidden_act", ("silu",), "silu")
    f.require("attention_bias", (False,), False)
    f.require("mlp_bias", (False,), False)
    _rope_settings(f, m, 10000.0)
    if model_type == "llama":
      m.attention = "mha"
      m.num_kv_heads = int(f.get("num_key_value_heads", m.num_heads))
      m.head_dim = int(f.get("head_dim", m.d_model // m.num_heads))
    else:
      _deepseek_settings(f, m, model_type)
  f.check_leftovers()
  config.data.max_length = min(config.data.max_length, m.max_seq_len)
  config.data.stride = min(config.data.stride, config.data.max_length)
  validate(config)
  return config


# transformers' defaults for DeepSeek fields a config.json may leave out (DeepseekV2Config / DeepseekV3Config).
_DEEPSEEK_DEFAULTS = {
    "deepseek_v2": dict(first_k_dense_replace=0, norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2,
                        topk_method="greedy"),
    "deepseek_v3": dict(first_k_dense_replace=3, norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=1,
                        n_group=8, topk_group=4),
}


def _deepseek_settings(f: _Fields, m: ml_collections.ConfigDict, model_type: str) -> None:
  defaults = _DEEPSEEK_DEFAULTS[model_type]
  m.attention = "mla"
  f.get("num_key_value_heads")  # MLA's keys/values come from the latent per head; transformers reads it for caches
  m.q_lora_rank = int(f.get("q_lora_rank", 0) or 0)  # None = direct query projection
  m.kv_lora_rank = int(f.get("kv_lora_rank"))
  m.qk_nope_head_dim, m.qk_rope_head_dim = int(f.get("qk_nope_head_dim")), int(f.get("qk_rope_head_dim"))
  m.v_head_dim = int(f.get("v_head_dim"))
  m.latent_norm_eps = 1e-6  # transformers' (and DeepSeek's) q_a/kv_a layernorms use the RMSNorm default
  if not m.qk_rope_head_dim:
    raise HFConversionError(f"{model_type} config field qk_rope_head_dim=0 is not supported")
  # Every block from first_k_dense_replace on is MoE (moe_layer_freq 1 is all transformers implements).
  f.require("moe_layer_freq", (1,), 1)
  m.n_routed_experts = int(f.get("n_routed_experts"))
  m.n_shared_experts = int(f.get("n_shared_experts", defaults["n_shared_experts"]))
  m.num_experts_per_tok = int(f.get("num_experts_per_tok"))
  m.moe_intermediate_size = int(f.get("moe_intermediate_size"))
  m.routed_scaling_factor = float(f.get("routed_scaling_factor", defaults["routed_scaling_factor"]))
  m.first_k_dense = min(int(f.get("first_k_dense_replace", defaults["first_k_dense_replace"])), m.num_layers)
  m.moe_dispatch = "dropless"  # transformers never drops tokens
  if model_type == "deepseek_v2":
    m.router_scoring = "softmax"
    f.require("scoring_func", ("softmax",), "softmax")
    method = f.require("topk_method", ("greedy", "group_limited_greedy"), "greedy")
    # transformers' DeepseekV2 router never renormalises the top-k weights, whatever norm_topk_prob says.
    f.require("norm_topk_prob", (False,), False)
    m.norm_topk_prob = False
    if method == "group_limited_greedy":
      m.n_group, m.topk_group = int(f.get("n_group")), int(f.get("topk_group"))
    else:
      f.get("n_group"), f.get("topk_group")
      m.n_group = m.topk_group = 1
  else:
    m.router_scoring = "sigmoid"
    f.require("scoring_func", ("sigmoid",), "sigmoid")
    f.require("topk_method", ("noaux_tc",), "noaux_tc")
    m.norm_topk_prob = bool(f.get("norm_topk_prob", defaults["norm_topk_prob"]))
    m.n_group = int(f.get("n_group", defaults["n_group"]))
    m.topk_group = int(f.get("topk_group", defaults["topk_group"]))
    if m.n_routed_experts // m.n_group < 2 and m.first_k_dense < m.num_layers:
      raise HFConversionError(f"{model_type} config fields n_group={m.n_group} / n_routed_experts="
                              f"{m.n_routed_experts}: groups need >= 2 experts (DeepSeek-V3 scores top-2 per group)")
    f.get("rope_interleave")  # handled when the weights are permuted


def rope_interleaved(hf: dict) -> bool:
  """Whether the checkpoint's rotary features are interleaved pairs: DeepSeek-V2 always, V3 unless disabled."""
  if hf["model_type"] == "deepseek_v2":
    return True
  if hf["model_type"] == "deepseek_v3":
    return bool(hf.get("rope_interleave", True))
  return False


def hf_config_from(config: ml_collections.ConfigDict, model_type: str | None = None,
                   rope_interleave: bool = True) -> dict:
  """The HF config dict for our model config (the inverse of `config_from_hf`); refuses what HF cannot express."""
  m = config.model
  model_type = model_type or infer_model_type(m)

  def refuse(what: str):
    raise HFConversionError(f"cannot export to {model_type}: {what}")

  if m.scoring != "softmax":
    refuse(f"model.scoring={m.scoring!r} (transformers has no Scalable-Softmax)")
  hf: dict[str, Any] = {"model_type": model_type, "vocab_size": m.vocab_size,
                        "tie_word_embeddings": bool(m.tie_embeddings), "dtype": "float32"}
  if model_type == "gpt2":
    if (m.norm, m.positions, m.attention, m.mlp) != ("layernorm", "learned", "mha", m.mlp) or m.mlp == "swiglu":
      refuse("GPT-2 needs norm=layernorm, positions=learned, attention=mha and a GELU MLP")
    if not m.use_bias or (m.num_kv_heads and m.num_kv_heads != m.num_heads) or m.n_routed_experts:
      refuse("GPT-2 needs use_bias=True, num_kv_heads = num_heads and no experts")
    if m.head_dim and m.head_dim * m.num_heads != m.d_model:
      refuse(f"GPT-2 needs head_dim = d_model / num_heads, got head_dim={m.head_dim}")
    hf.update(architectures=["GPT2LMHeadModel"], n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads,
              n_inner=m.d_ff, n_positions=m.max_seq_len, layer_norm_epsilon=m.norm_eps,
              activation_function="gelu" if m.mlp == "gelu_exact" else "gelu_new", scale_attn_weights=True,
              scale_attn_by_inverse_layer_idx=False, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    return hf
  if (m.norm, m.positions, m.mlp, m.use_bias) != ("rmsnorm", "rope", "swiglu", False):
    refuse("Llama/DeepSeek need norm=rmsnorm, positions=rope, mlp=swiglu and use_bias=False")
  hf.update(hidden_size=m.d_model, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
            intermediate_size=m.d_ff, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
            hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=0.0,
            rope_parameters=_hf_rope_parameters(m))
  if model_type == "llama":
    if m.attention != "mha" or m.n_routed_experts:
      refuse("Llama needs attention=mha and no experts")
    hf.update(architectures=["LlamaForCausalLM"], num_key_value_heads=m.num_kv_heads or m.num_heads,
              head_dim=m.head_dim or m.d_model // m.num_heads)
    return hf
  if m.attention != "mla":
    refuse("DeepSeek needs attention=mla")
  if m.latent_norm_eps != 1e-6:
    refuse(f"model.latent_norm_eps={m.latent_norm_eps} (transformers fixes 1e-6)")
  moe = m.n_routed_experts > 0
  if not moe:  # a dense MLA model: every block dense, the expert settings unused
    experts = dict(n_routed_experts=1, n_shared_experts=0, num_experts_per_tok=1, moe_intermediate_size=m.d_ff,
                   first_k_dense_replace=m.num_layers, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                   norm_topk_prob=model_type == "deepseek_v3")
  else:
    experts = dict(n_routed_experts=m.n_routed_experts, n_shared_experts=m.n_shared_experts,
                   num_experts_per_tok=m.num_experts_per_tok,
                   moe_intermediate_size=m.moe_intermediate_size or m.d_ff, first_k_dense_replace=m.first_k_dense,
                   n_group=m.n_group, topk_group=m.topk_group, routed_scaling_factor=m.routed_scaling_factor,
                   norm_topk_prob=bool(m.norm_topk_prob))
  if model_type == "deepseek_v2":
    if moe and m.router_scoring != "softmax":
      refuse("DeepSeek-V2 routes with softmax scores (export a sigmoid router as deepseek_v3)")
    if moe and m.norm_topk_prob:
      refuse("model.norm_topk_prob=True (transformers' DeepseekV2 never renormalises the top-k weights)")
    experts["topk_method"] = "group_limited_greedy" if experts["n_group"] > 1 else "greedy"
    if experts["n_group"] == 1:
      experts["n_group"] = experts["topk_group"] = None
  else:
    if moe and m.router_scoring != "sigmoid":
      refuse("DeepSeek-V3 routes with sigmoid scores (export a softmax router as deepseek_v2)")
    if moe and m.n_routed_experts // m.n_group < 2:
      refuse("DeepSeek-V3 groups need >= 2 experts each")
    experts["rope_interleave"] = rope_interleave
  hf.update(experts)
  hf.update(architectures=["DeepseekV3ForCausalLM" if model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"],
            num_key_value_heads=m.num_heads, q_lora_rank=m.q_lora_rank or None, kv_lora_rank=m.kv_lora_rank,
            qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim)
  return hf


def _hf_rope_parameters(m: ml_collections.ConfigDict) -> dict:
  if m.rope_scaling == "none":
    return {"rope_type": "default", "rope_theta": m.rope_theta}
  params = {"rope_type": "yarn", "rope_theta": m.rope_theta, "factor": m.rope_factor,
            "original_max_position_embeddings": m.rope_original_max_len, "beta_fast": m.rope_beta_fast,
            "beta_slow": m.rope_beta_slow, "truncate": m.rope_truncate}
  for key, value in (("mscale", m.rope_mscale), ("mscale_all_dim", m.rope_mscale_all_dim),
                     ("attention_factor", m.rope_attention_factor)):
    if value:
      params[key] = value
  return params


def infer_model_type(m: ml_collections.ConfigDict) -> str:
  """The HF model type that can hold a model config: gpt2, llama, deepseek_v3 (sigmoid router or dense MLA) or
  deepseek_v2 (softmax router)."""
  if m.attention == "mla":
    return "deepseek_v2" if m.n_routed_experts and m.router_scoring == "softmax" else "deepseek_v3"
  if m.norm == "layernorm":
    return "gpt2"
  return "llama"


# ====================================================================================== safetensors I/O
def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of `path`/model.safetensors, or of the shards listed in model.safetensors.index.json."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  index = path / SAFETENSORS_INDEX
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (path / SAFETENSORS_FILE).is_file():
    files = [SAFETENSORS_FILE]
  else:
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    raise HFConversionError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {path}"
                            + (f" (found {', '.join(found)}; only safetensors are read)" if found else ""))
  tensors = {}
  for name in files:
    file = path / name
    if not file.is_file():
      raise HFConversionError(f"{SAFETENSORS_INDEX} in {path} lists {name}, which does not exist")
    try:
      with safe_open(str(file), framework="flax") as f:
        for key in f.keys():
          tensors[key] = np.asarray(f.get_tensor(key))
    except Exception as e:  # noqa: BLE001 (a corrupt file surfaces as several error types)
      raise HFConversionError(f"cannot read {file}: {' '.join(str(e).split())[:200]}") from e
  return tensors


def write_safetensors(tensors: dict[str, np.ndarray], path: str | pathlib.Path, dtype=jnp.float32,
                      max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `tensors` as model.safetensors, or as numbered shards plus an index when over `max_shard_bytes`."""
  from safetensors.flax import save_file  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  shards: list[dict[str, Any]] = [{}]
  size = 0
  for key in sorted(tensors):
    value = jnp.asarray(tensors[key], dtype=dtype)
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = value
    size += value.nbytes
  metadata = {"format": "pt"}  # transformers checks this tag
  if len(shards) == 1:
    save_file(shards[0], str(path / SAFETENSORS_FILE), metadata=metadata)
    (path / SAFETENSORS_INDEX).unlink(missing_ok=True)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(path / name), metadata=metadata)
    weight_map.update({key: name for key in shard})
  total = sum(v.nbytes for shard in shards for v in shard.values())
  (path / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2) + "\n")


# ====================================================================================== weight mapping
def _deinterleave(rope_dim: int) -> np.ndarray:
  """Our rotary feature i is the checkpoint's feature perm[i]: even features first, then odd ones."""
  return np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])


class _Tensors:
  """HF tensors by name with a consumption check, so an unexpected tensor is an error rather than ignored."""

  def __init__(self, tensors: dict[str, np.ndarray]):
    self.tensors = tensors
    self.used: set[str] = set()

  def __contains__(self, key: str) -> bool:
    return key in self.tensors

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self.tensors:
      raise HFConversionError(f"tensor {key} is missing from the checkpoint")
    self.used.add(key)
    return np.asarray(self.tensors[key], np.float32)

  def check_leftovers(self, ignorable=lambda key: False) -> None:
    unknown = sorted(k for k in set(self.tensors) - self.used if not ignorable(k))
    if unknown:
      raise HFConversionError(f"tensor {unknown[0]} is not used by the converted model "
                              f"({len(unknown)} unused: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''})")


def _linear_in(w: np.ndarray, *out_shape: int) -> np.ndarray:
  """nn.Linear weight [out, in] -> ours [in, *out_shape]."""
  return w.T.reshape(w.shape[1], *out_shape)


def _linear_out(w: np.ndarray) -> np.ndarray:
  """Ours [in, *out] -> nn.Linear weight [out, in]."""
  return w.reshape(w.shape[0], -1).T


def params_from_hf(tensors: dict[str, np.ndarray], hf: dict, config: ml_collections.ConfigDict):
  """(params, model_state) as nested pure dicts in the layout of `Transformer(config.model)`."""
  m = config.model
  model_type = hf["model_type"]
  if model_type == "gpt2":
    t = _Tensors({(k if k.startswith("transformer.") or k.startswith("lm_head.") else "transformer." + k): v
                  for k, v in tensors.items()})
    params = _gpt2_from_hf(t, m)
    t.check_leftovers(lambda k: k.endswith((".attn.bias", ".attn.masked_bias")))
    return params, {}
  t = _Tensors(tensors)
  params: dict[str, Any] = {"embed": {"embedding": t["model.embed_tokens.weight"]},
                            "final_norm": {"scale": t["model.norm.weight"]}, "blocks": {}}
  model_state: dict[str, Any] = {}
  for i in range(m.num_layers):
    p = f"model.layers.{i}."
    block = {"attn_norm": {"scale": t[p + "input_layernorm.weight"]},
             "ffn_norm": {"scale": t[p + "post_attention_layernorm.weight"]}}
    if model_type == "llama":
      hd, kv = m.head_dim or m.d_model // m.num_heads, m.num_kv_heads or m.num_heads
      block["attn"] = {"wq": _linear_in(t[p + "self_attn.q_proj.weight"], m.num_heads, hd),
                       "wk": _linear_in(t[p + "self_attn.k_proj.weight"], kv, hd),
                       "wv": _linear_in(t[p + "self_attn.v_proj.weight"], kv, hd),
                       "wo": t[p + "self_attn.o_proj.weight"].T.reshape(m.num_heads, hd, m.d_model)}
    else:
      block["attn"] = _mla_from_hf(t, p + "self_attn.", m, rope_interleaved(hf))
    if m.n_routed_experts and i >= m.first_k_dense:
      block["ffn"], bias = _moe_from_hf(t, p + "mlp.", m, model_type)
      model_state.setdefault("blocks", {})[i] = {"ffn": {"balance_bias": bias}}
    else:
      block["ffn"] = _swiglu_from_hf(t, p + "mlp.")
    params["blocks"][i] = block
  if not m.tie_embeddings:
    params["head"] = t["lm_head.weight"].T
  num_layers = m.num_layers

  def ignorable(key: str) -> bool:
    # Tied checkpoints may still carry lm_head; rotary caches are buffers; MTP modules sit past the last layer.
    if key == "lm_head.weight" and m.tie_embeddings:
      return True
    if key.endswith("rotary_emb.inv_freq"):
      return True
    parts = key.split(".")
    return len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() and int(parts[2]) >= num_layers

  t.check_leftovers(ignorable)
  return params, model_state


def _swiglu_from_hf(t: _Tensors, p: str) -> dict:
  return {"gate": t[p + "gate_proj.weight"].T, "up": t[p + "up_proj.weight"].T, "down": t[p + "down_proj.weight"].T}


def _gpt2_from_hf(t: _Tensors, m: ml_collections.ConfigDict) -> dict:
  d, h = m.d_model, m.num_heads
  hd = d // h
  params: dict[str, Any] = {"embed": {"embedding": t["transformer.wte.weight"]},
                            "positions": {"embedding": t["transformer.wpe.weight"]},
                            "final_norm": {"scale": t["transformer.ln_f.weight"], "bias": t["transformer.ln_f.bias"]},
                            "blocks": {}}
  for i in range(m.num_layers):
    p = f"transformer.h.{i}."
    qkv_w, qkv_b = t[p + "attn.c_attn.weight"], t[p + "attn.c_attn.bias"]  # Conv1D: [in, out]
    wq, wk, wv = np.split(qkv_w, 3, axis=1)
    bq, bk, bv = np.split(qkv_b, 3)
    params["blocks"][i] = {
        "attn_norm": {"scale": t[p + "ln_1.weight"], "bias": t[p + "ln_1.bias"]},
        "attn": {"wq": wq.reshape(d, h, hd), "wk": wk.reshape(d, h, hd), "wv": wv.reshape(d, h, hd),
                 "bq": bq.reshape(h, hd), "bk": bk.reshape(h, hd), "bv": bv.reshape(h, hd),
                 "wo": t[p + "attn.c_proj.weight"].reshape(h, hd, d), "bo": t[p + "attn.c_proj.bias"]},
        "ffn_norm": {"scale": t[p + "ln_2.weight"], "bias": t[p + "ln_2.bias"]},
        "ffn": {"up": t[p + "mlp.c_fc.weight"], "up_bias": t[p + "mlp.c_fc.bias"],
                "down": t[p + "mlp.c_proj.weight"], "down_bias": t[p + "mlp.c_proj.bias"]}}
  if not m.tie_embeddings:
    params["head"] = t["lm_head.weight"].T
  return params


def _mla_from_hf(t: _Tensors, p: str, m: ml_collections.ConfigDict, interleaved: bool) -> dict:
  h, nope, rope, v, c = m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
  perm = _deinterleave(rope) if interleaved else np.arange(rope)
  query_perm = np.concatenate([np.arange(nope), nope + perm])  # within each head: nope features, then rotary
  attn: dict[str, Any] = {}
  if m.q_lora_rank:
    attn["wq_down"] = t[p + "q_a_proj.weight"].T
    attn["q_norm"] = {"scale": t[p + "q_a_layernorm.weight"]}
    attn["wq_up"] = _linear_in(t[p + "q_b_proj.weight"], h, nope + rope)[..., query_perm]
  else:
    attn["wq"] = _linear_in(t[p + "q_proj.weight"], h, nope + rope)[..., query_perm]
  kv_a = t[p + "kv_a_proj_with_mqa.weight"]  # [kv_lora + rope, d]: the latent, then the shared rotary key
  attn["wkv_down"] = kv_a[:c].T
  attn["wk_rope"] = kv_a[c:].T[:, perm]
  attn["kv_norm"] = {"scale": t[p + "kv_a_layernorm.weight"]}
  kv_b = t[p + "kv_b_proj.weight"].reshape(h, nope + v, c)  # per head: key (no position) rows, then value rows
  attn["wk_up"] = kv_b[:, :nope].transpose(2, 0, 1)
  attn["wv_up"] = kv_b[:, nope:].transpose(2, 0, 1)
  attn["wo"] = t[p + "o_proj.weight"].T.reshape(h, v, m.d_model)
  return attn


def _moe_from_hf(t: _Tensors, p: str, m: ml_collections.ConfigDict, model_type: str) -> tuple[dict, np.ndarray]:
  e = m.n_routed_experts
  if p + "experts.gate_up_proj" in t:  # transformers' fused in-memory layout: [E, 2I, d] and [E, d, I]
    gate_up = t[p + "experts.gate_up_proj"]
    hidden = gate_up.shape[1] // 2
    w_gate, w_up = gate_up[:, :hidden].transpose(0, 2, 1), gate_up[:, hidden:].transpose(0, 2, 1)
    w_down = t[p + "experts.down_proj"].transpose(0, 2, 1)
  else:  # checkpoints: one gate/up/down per expert
    w_gate = np.stack([t[f"{p}experts.{j}.gate_proj.weight"].T for j in range(e)])
    w_up = np.stack([t[f"{p}experts.{j}.up_proj.weight"].T for j in range(e)])
    w_down = np.stack([t[f"{p}experts.{j}.down_proj.weight"].T for j in range(e)])
  ffn: dict[str, Any] = {"router": t[p + "gate.weight"].T, "w_gate": w_gate, "w_up": w_up, "w_down": w_down}
  if m.n_shared_experts:
    ffn["shared"] = _swiglu_from_hf(t, p + "shared_experts.")
  bias_key = p + "gate.e_score_correction_bias"
  if model_type == "deepseek_v3" and bias_key in t:
    bias = t[bias_key]
  else:
    bias = np.zeros((e,), np.float32)
  return ffn, bias


def hf_from_params(params: dict, model_state: dict, config: ml_collections.ConfigDict,
                   model_type: str, rope_interleave: bool = True) -> dict[str, np.ndarray]:
  """HF tensors (nn.Linear layout, DeepSeek rotary rows interleaved) from our nested pure-dict params."""
  m = config.model
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  out: dict[str, np.ndarray] = {}
  if model_type == "gpt2":
    out["transformer.wte.weight"] = params["embed"]["embedding"]
    out["transformer.wpe.weight"] = params["positions"]["embedding"]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = (params["final_norm"]["scale"],
                                                                    params["final_norm"]["bias"])
    for i in range(m.num_layers):
      b, p = params["blocks"][i], f"transformer.h.{i}."
      a = b["attn"]
      d = m.d_model
      out[p + "ln_1.weight"], out[p + "ln_1.bias"] = b["attn_norm"]["scale"], b["attn_norm"]["bias"]
      out[p + "ln_2.weight"], out[p + "ln_2.bias"] = b["ffn_norm"]["scale"], b["ffn_norm"]["bias"]
      out[p + "attn.c_attn.weight"] = np.concatenate([a[k].reshape(d, -1) for k in ("wq", "wk", "wv")], axis=1)
      out[p + "attn.c_attn.bias"] = np.concatenate([a[k].reshape(-1) for k in ("bq", "bk", "bv")])
      out[p + "attn.c_proj.weight"], out[p + "attn.c_proj.bias"] = a["wo"].reshape(-1, d), a["bo"]
      f = b["ffn"]
      out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = f["up"], f["up_bias"]
      out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = f["down"], f["down_bias"]
    if not m.tie_embeddings:
      out["lm_head.weight"] = params["head"].T
    return out
  out["model.embed_tokens.weight"] = params["embed"]["embedding"]
  out["model.norm.weight"] = params["final_norm"]["scale"]
  for i in range(m.num_layers):
    b, p = params["blocks"][i], f"model.layers.{i}."
    out[p + "input_layernorm.weight"] = b["attn_norm"]["scale"]
    out[p + "post_attention_layernorm.weight"] = b["ffn_norm"]["scale"]
    a = b["attn"]
    if model_type == "llama":
      for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
        out[f"{p}self_attn.{theirs}.weight"] = _linear_out(a[ours])
      out[p + "self_attn.o_proj.weight"] = a["wo"].reshape(-1, m.d_model).T
    else:
      out.update(_mla_to_hf(a, p + "self_attn.", m, interleave=model_type == "deepseek_v2" or rope_interleave))
    f = b["ffn"]
    if "router" in f:
      out[p + "mlp.gate.weight"] = f["router"].T
      for j in range(f["w_up"].shape[0]):
        out[f"{p}mlp.experts.{j}.gate_proj.weight"] = f["w_gate"][j].T
        out[f"{p}mlp.experts.{j}.up_proj.weight"] = f["w_up"][j].T
        out[f"{p}mlp.experts.{j}.down_proj.weight"] = f["w_down"][j].T
      if "shared" in f:
        out.update(_swiglu_to_hf(f["shared"], p + "mlp.shared_experts."))
      bias = np.asarray(model_state["blocks"][i]["ffn"]["balance_bias"], np.float32)
      if model_type == "deepseek_v3":
        out[p + "mlp.gate.e_score_correction_bias"] = bias
      elif np.any(bias):
        raise HFConversionError(f"cannot export to deepseek_v2: block {i} has a nonzero router balance bias "
                                "(DeepSeek-V2 has no e_score_correction_bias)")
    else:
      out.update(_swiglu_to_hf(f, p + "mlp."))
  if not m.tie_embeddings:
    out["lm_head.weight"] = params["head"].T
  return out


def _swiglu_to_hf(f: dict, p: str) -> dict:
  return {p + "gate_proj.weight": f["gate"].T, p + "up_proj.weight": f["up"].T, p + "down_proj.weight": f["down"].T}


def _mla_to_hf(a: dict, p: str, m: ml_collections.ConfigDict, interleave: bool) -> dict:
  nope, rope, c = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
  inverse = np.argsort(_deinterleave(rope)) if interleave else np.arange(rope)
  query_inverse = np.concatenate([np.arange(nope), nope + inverse])
  out = {}
  if "wq_down" in a:
    out[p + "q_a_proj.weight"] = a["wq_down"].T
    out[p + "q_a_layernorm.weight"] = a["q_norm"]["scale"]
    out[p + "q_b_proj.weight"] = _linear_out(a["wq_up"][..., query_inverse])
  else:
    out[p + "q_proj.weight"] = _linear_out(a["wq"][..., query_inverse])
  out[p + "kv_a_proj_with_mqa.weight"] = np.concatenate([a["wkv_down"].T, a["wk_rope"][:, inverse].T], axis=0)
  out[p + "kv_a_layernorm.weight"] = a["kv_norm"]["scale"]
  kv_b = np.concatenate([a["wk_up"].transpose(1, 2, 0), a["wv_up"].transpose(1, 2, 0)], axis=1)  # [h, nope+v, c]
  out[p + "kv_b_proj.weight"] = kv_b.reshape(-1, c)
  out[p + "o_proj.weight"] = a["wo"].reshape(-1, m.d_model).T
  return out


# ====================================================================================== public API
def _abstract_model(config: ml_collections.ConfigDict):
  from superlm_jax.models.transformer import Transformer  # pylint: disable=import-outside-toplevel
  return nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))


def _fill(abstract_state: nnx.State, values: dict, what: str) -> nnx.State:
  """Replaces the abstract leaves with `values` (same nesting), checking every shape."""
  expected = abstract_state.to_pure_dict()
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  try:
    flat_values = dict(jax.tree_util.tree_flatten_with_path(values)[0])
  except Exception as e:  # noqa: BLE001
    raise HFConversionError(f"cannot map the {what}: {e}") from e
  missing = set(flat_expected) - set(flat_values)
  extra = set(flat_values) - set(flat_expected)
  if missing or extra:
    name = jax.tree_util.keystr(sorted(missing or extra, key=str)[0])
    raise HFConversionError(f"converted {what} do not match the model ({'missing' if missing else 'unexpected'} "
                            f"{name})")
  for path, leaf in flat_expected.items():
    if tuple(flat_values[path].shape) != tuple(leaf.shape):
      raise HFConversionError(f"converted {what} {jax.tree_util.keystr(path)} has shape "
                              f"{tuple(flat_values[path].shape)}, the model expects {tuple(leaf.shape)}")
  state = jax.tree.map(lambda leaf, v: jnp.asarray(v, leaf.dtype), expected, values)
  nnx.replace_by_pure_dict(abstract_state, state)
  return abstract_state


def from_pretrained(path: str | pathlib.Path, *, scan_layers: bool = False):
  """(model, config) from a local Hugging Face directory: config.json + model.safetensors (or shards), in the
  loop layout of the blocks or, with `scan_layers`, the scan layout (models/layout.py)."""
  hf = read_hf_config(path)
  config = config_from_hf(hf)
  tensors = read_safetensors(path)
  params, model_state = params_from_hf(tensors, hf, config)
  if scan_layers:
    config.model.scan_layers = True
    params, model_state = layout.loop_to_scan(params, config.model), layout.loop_to_scan(model_state, config.model)
  graphdef, abstract_params, abstract_rest = nnx.split(_abstract_model(config), nnx.Param, ...)
  params_state = _fill(abstract_params, params, "parameters")
  rest_state = _fill(abstract_rest, model_state, "model state")
  return nnx.merge(graphdef, params_state, rest_state), config


def to_pretrained(model: nnx.Module, config: ml_collections.ConfigDict, path: str | pathlib.Path, *,
                  model_type: str | None = None, dtype: str = "float32", rope_interleave: bool = True,
                  max_shard_bytes: int = 5 * 2**30) -> str:
  """Writes `model` as a Hugging Face directory (config.json + safetensors) that transformers loads; returns the
  model type written (default: inferred, see `infer_model_type`). `dtype` "float32" (exact) or "bfloat16";
  `rope_interleave` (DeepSeek-V3) writes the rotary rows interleaved, DeepSeek's own layout."""
  hf = hf_config_from(config, model_type, rope_interleave)
  if dtype not in ("float32", "bfloat16"):
    raise HFConversionError(f"dtype={dtype!r} is not float32 or bfloat16")
  hf["dtype"] = dtype
  # The Hugging Face side is one tensor per layer: a scan-layout model is cut into its layers first.
  params = layout.scan_to_loop(nnx.state(model, nnx.Param).to_pure_dict(), config.model)
  biases = layout.scan_to_loop(nnx.state(model, RouterBias).to_pure_dict(), config.model)
  tensors = hf_from_params(params, biases, config, hf["model_type"], rope_interleave)
  path = pathlib.Path(path)
  write_safetensors(tensors, path, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
                    max_shard_bytes=max_shard_bytes)
  (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
  return hf["model_type"]

