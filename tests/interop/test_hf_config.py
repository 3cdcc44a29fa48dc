"""The Hugging Face mapping without transformers: config fields are mapped or refused by name, safetensors are
read sharded or not, and an exported model imports back bit for bit."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from superlm_jax.errors import UserError
from superlm_jax.interop import hf as hf_lib
from superlm_jax.models.transformer import build_model
from tests.conftest import VARIANTS, tiny_model_config

LLAMA = {"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True, "hidden_act": "silu",
         "bos_token_id": 1, "eos_token_id": 2, "architectures": ["LlamaForCausalLM"]}


def test_llama_fields_are_mapped():
  m = hf_lib.config_from_hf(dict(LLAMA)).model
  assert (m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.d_ff) == (32, 2, 4, 2, 8, 48)
  assert (m.norm, m.positions, m.mlp, m.attention, m.use_bias) == ("rmsnorm", "rope", "swiglu", "mha", False)
  assert (m.rope_theta, m.norm_eps, m.tie_embeddings, m.max_seq_len) == (1e5, 1e-5, True, 64)


def test_old_style_yarn_rope_scaling_is_mapped():
  hf = dict(LLAMA, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                 "mscale": 0.8, "mscale_all_dim": 0.7})
  m = hf_lib.config_from_hf(hf).model
  assert (m.rope_scaling, m.rope_factor, m.rope_original_max_len) == ("yarn", 4.0, 16)
  assert (m.rope_mscale, m.rope_mscale_all_dim, m.rope_beta_fast, m.rope_beta_slow) == (0.8, 0.7, 32.0, 1.0)


@pytest.mark.parametrize("change, named", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type"),
    ({"sliding_window": 128}, "sliding_window"),
    ({"quantization_config": {"bits": 4}}, "quantization_config"),
    ({"model_type": "mistral"}, "model_type"),
])
def test_unsupported_fields_are_refused_by_name(change, named):
  with pytest.raises(UserError, match=named):
    hf_lib.config_from_hf(dict(LLAMA, **change))


def test_deepseek_v2_norm_topk_prob_is_refused():
  """transformers' DeepseekV2 router ignores norm_topk_prob; accepting True would silently compute otherwise."""
  hf = {"model_type": "deepseek_v2", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
        "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "kv_lora_rank": 16,
        "q_lora_rank": None, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64, "norm_topk_prob": True}
  with pytest.raises(UserError, match="norm_topk_prob"):
    hf_lib.config_from_hf(hf)
  hf["norm_topk_prob"] = False
  m = hf_lib.config_from_hf(hf).model
  assert (m.q_lora_rank, m.router_scoring, m.n_shared_experts, m.first_k_dense) == (0, "softmax", 2, 0)


@pytest.mark.parametrize("variant, model_type", [("gpt2_learned", "gpt2"), ("llama_gqa_untied", "llama"),
                                                 ("mla_qlora", "deepseek_v3")])
def test_export_then_import_is_bit_identical_with_sharded_files(variant, model_type, tmp_path):
  config = hf_lib.config_from_hf(dict(LLAMA))  # any full config; the model section is replaced below
  config.model = tiny_model_config(**VARIANTS[variant])
  if variant == "mla_qlora":
    config.model.update(n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=8, first_k_dense=1,
                        router_scoring="sigmoid", n_group=2, topk_group=1, rope_theta=10000.0)
  model = build_model(config.model, seed=3)
  if variant == "mla_qlora":  # a nonzero balance bias must travel as e_score_correction_bias
    moe = model.blocks[1].ffn
    moe.balance_bias[...] = jax.random.normal(jax.random.key(1), moe.balance_bias.shape)
  assert hf_lib.to_pretrained(model, config, tmp_path, max_shard_bytes=20_000) == model_type
  assert (tmp_path / hf_lib.SAFETENSORS_INDEX).is_file()
  assert len(json.loads((tmp_path / hf_lib.SAFETENSORS_INDEX).read_text())["weight_map"]) > 5
  again, again_config = hf_lib.from_pretrained(tmp_path)
  for key in ("d_model", "num_layers", "num_heads", "tie_embeddings", "attention", "n_routed_experts"):
    assert again_config.model[key] == config.model[key], key
  before, after = nnx.state(model).to_pure_dict(), nnx.state(again).to_pure_dict()
  assert jax.tree.structure(before) == jax.tree.structure(after)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  tokens = np.random.default_rng(0).integers(0, 97, (2, 12))
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(again(tokens)))


def test_export_refuses_what_transformers_cannot_compute(tmp_path):
  config = hf_lib.config_from_hf(dict(LLAMA))
  config.model = tiny_model_config(**VARIANTS["llama_mqa_ssmax"])
  with pytest.raises(UserError, match="scoring"):
    hf_lib.to_pretrained(build_model(config.model), config, tmp_path)
  assert not list(tmp_path.iterdir())


def test_missing_or_corrupt_checkpoints_are_one_line_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    hf_lib.from_pretrained(tmp_path / "nowhere")
  (tmp_path / "config.json").write_text(json.dumps(LLAMA))
  (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 8)
  with pytest.raises(UserError, match="pytorch_model.bin; only safetensors"):
    hf_lib.from_pretrained(tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"garbage")
  with pytest.raises(UserError, match="cannot read"):
    hf_lib.from_pretrained(tmp_path)


def test_scan_layout_exports_and_imports_the_same_checkpoint(tmp_path):
  """An MLA + MoE model (one dense block, then MoE: two stacks) in the scan layout writes the same tensors as in
  the loop layout, and imports back into either layout with the same logits."""
  from superlm_jax.models.layout import loop_to_scan
  config = hf_lib.config_from_hf(dict(LLAMA))
  config.model = tiny_model_config(**VARIANTS["mla_qlora"], num_layers=3, n_routed_experts=4, n_shared_experts=1,
                                   moe_intermediate_size=8, first_k_dense=1, router_scoring="sigmoid",
                                   rope_theta=10000.0)
  loop = build_model(config.model, seed=3)
  loop.blocks[2].ffn.balance_bias[...] = jax.random.normal(jax.random.key(1), (4,))
  scan_config = config.copy_and_resolve_references()
  scan_config.model.scan_layers = True
  scan = nnx.eval_shape(lambda: build_model(scan_config.model))
  state = nnx.state(scan)
  nnx.replace_by_pure_dict(state, loop_to_scan(nnx.state(loop).to_pure_dict(), config.model))
  nnx.update(scan, state)
  hf_lib.to_pretrained(loop, config, tmp_path / "loop")
  hf_lib.to_pretrained(scan, scan_config, tmp_path / "scan")
  written = [hf_lib.read_safetensors(tmp_path / name) for name in ("loop", "scan")]
  assert sorted(written[0]) == sorted(written[1])
  for key in written[0]:
    np.testing.assert_array_equal(np.asarray(written[0][key]), np.asarray(written[1][key]), err_msg=key)
  tokens = np.random.default_rng(0).integers(0, 97, (2, 12))
  again, again_config = hf_lib.from_pretrained(tmp_path / "scan", scan_layers=True)
  assert again_config.model.scan_layers and again.blocks is None
  np.testing.assert_allclose(np.asarray(again(tokens)), np.asarray(loop(tokens)), atol=1e-6)
