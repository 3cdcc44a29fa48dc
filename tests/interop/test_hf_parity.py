"""Parity with Hugging Face `transformers` (PyTorch CPU): tiny random models of every supported type are built and
saved by transformers itself, converted, and must give the same logits (max |diff| <= 1e-4 in float32) and the same
20 greedy tokens through our KV-cache decode (absorbed MLA for DeepSeek). Export goes back bit for bit.

Needs the `[interop]` extra (torch==2.13.0, transformers); skipped without it.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from superlm_jax.generate.decode import Generator, SamplingParams  # noqa: E402
from superlm_jax.interop import hf as hf_lib  # noqa: E402
from superlm_jax.layers.moe import RouterBias  # noqa: E402

VOCAB = 97
_DEEPSEEK = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=8, num_experts_per_tok=2,
                 max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
_LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
_GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    "gpt2": ("GPT2", dict(_GPT2)),
    "gpt2_exact_gelu_untied": ("GPT2", dict(_GPT2, activation_function="gelu", n_inner=48,
                                            tie_word_embeddings=False)),
    "llama_mqa_tied": ("Llama", dict(_LLAMA, num_key_value_heads=1, tie_word_embeddings=True,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e5})),
    "llama_gqa2_untied_yarn": ("Llama", dict(_LLAMA, num_key_value_heads=2, tie_word_embeddings=False,
                                             rope_parameters=dict(_YARN))),
    "deepseek_v2_direct_q_greedy": ("DeepseekV2", dict(_DEEPSEEK, q_lora_rank=None, n_shared_experts=1,
                                                       first_k_dense_replace=1, topk_method="greedy")),
    "deepseek_v2_qlora_groups_tied": ("DeepseekV2", dict(_DEEPSEEK, q_lora_rank=12, n_shared_experts=2,
                                                         first_k_dense_replace=0, topk_method="group_limited_greedy",
                                                         n_group=4, topk_group=2, routed_scaling_factor=2.0,
                                                         tie_word_embeddings=True)),
    "deepseek_v3_qlora_sigmoid_groups": ("DeepseekV3", dict(_DEEPSEEK, q_lora_rank=12, n_shared_experts=1,
                                                            first_k_dense_replace=1, n_group=2, topk_group=1,
                                                            norm_topk_prob=True, routed_scaling_factor=2.5)),
    "deepseek_v3_direct_q_tied_yarn": ("DeepseekV3", dict(_DEEPSEEK, q_lora_rank=None, n_shared_experts=1,
                                                          first_k_dense_replace=1, n_group=1, topk_group=1,
                                                          norm_topk_prob=False, routed_scaling_factor=1.0,
                                                          tie_word_embeddings=True, rope_interleave=False,
                                                          rope_parameters=dict(_YARN, mscale=0.707,
                                                                               mscale_all_dim=0.707))),
}


def _randomize(model, seed: int) -> None:
  """Random weights everywhere (transformers initialises some to zero/one), random router correction biases."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
      noise = torch.randn(tensor.shape, generator=generator)
      if "norm" in name or ".ln_" in name:
        tensor.copy_(1.0 + 0.1 * noise)
      elif "e_score_correction_bias" in name:
        tensor.copy_(0.05 * noise)
      elif tensor.is_floating_point() and "rotary" not in name and name in dict(model.named_parameters()):
        tensor.copy_(0.1 * noise)


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
  """(case name, transformers model, our model, our config, HF directory)."""
  family, kwargs = CASES[request.param]
  torch.manual_seed(0)
  config = getattr(transformers, f"{family}Config")(**kwargs)
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  reference = getattr(transformers, f"{family}LMHeadModel" if family == "GPT2" else f"{family}ForCausalLM")(config)
  _randomize(reference, seed=len(request.param))
  reference.eval()
  path = tmp_path_factory.mktemp(request.param)
  reference.save_pretrained(path)
  model, our_config = hf_lib.from_pretrained(path)
  return request.param, reference, model, our_config, path


def _reference_logits(reference, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return reference(torch.from_numpy(tokens).long()).logits.numpy()


def test_logits_match_transformers(converted):
  name, reference, model, _, _ = converted
  tokens = np.random.default_rng(1).integers(0, VOCAB, (3, 40))
  ours = np.asarray(model(jnp.asarray(tokens)))
  theirs = _reference_logits(reference, tokens)
  assert ours.shape == theirs.shape == (3, 40, VOCAB)
  assert np.abs(theirs).max() > 0.1, "degenerate reference logits"
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0, err_msg=name)


def test_greedy_generation_matches_transformers(converted):
  """20 greedy tokens through our cache (prefill + single-token steps; DeepSeek decodes in absorbed form)."""
  name, reference, model, _, _ = converted
  prompts = np.random.default_rng(2).integers(0, VOCAB, (2, 7))
  with torch.no_grad():
    theirs = reference.generate(torch.from_numpy(prompts).long(), max_new_tokens=20, min_new_tokens=20,
                                do_sample=False, attention_mask=torch.ones(prompts.shape, dtype=torch.long))
  theirs = theirs[:, prompts.shape[1]:].numpy()
  generator = Generator(model, absorb=True)
  ours = generator.generate(prompts.tolist(), SamplingParams(max_new_tokens=20, temperature=0.0))
  assert np.array_equal(np.asarray(ours), theirs), f"{name}: ours {ours} vs transformers {theirs.tolist()}"


def test_export_round_trip_is_bit_identical(converted, tmp_path):
  """Ours -> HF directory: the tensors transformers saved come back bit for bit, transformers loads the export to
  the identical model, and importing the export again gives the identical parameters."""
  name, reference, model, config, path = converted
  hf_config = json.loads((path / "config.json").read_text())
  model_type = hf_config["model_type"]
  written = hf_lib.to_pretrained(model, config, tmp_path, model_type=model_type,
                                 rope_interleave=hf_config.get("rope_interleave", True))
  assert written == model_type
  original = hf_lib.read_safetensors(path)
  exported = hf_lib.read_safetensors(tmp_path)
  for key, value in exported.items():
    assert key in original, f"{name}: exported an unexpected tensor {key}"
    assert np.array_equal(value, original[key]), f"{name}: {key} changed in the round trip"
  reloaded_reference = type(reference).from_pretrained(tmp_path, attn_implementation="eager").eval()
  tokens = np.random.default_rng(3).integers(0, VOCAB, (2, 24))
  np.testing.assert_array_equal(_reference_logits(reloaded_reference, tokens), _reference_logits(reference, tokens))
  again, again_config = hf_lib.from_pretrained(tmp_path)
  assert again_config.model.to_dict() == config.model.to_dict()
  for kind in (nnx.Param, RouterBias):
    before, after = nnx.state(model, kind).to_pure_dict(), nnx.state(again, kind).to_pure_dict()
    assert jax.tree.structure(before) == jax.tree.structure(after)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))), name


def test_absorbed_and_expanded_decode_agree_on_a_converted_deepseek(converted):
  name, _, model, config, _ = converted
  if config.model.attention != "mla":
    pytest.skip("MLA only")
  prompts = np.random.default_rng(4).integers(0, VOCAB, (2, 5)).tolist()
  params = SamplingParams(max_new_tokens=12, temperature=0.0)
  absorbed = Generator(model, absorb=True).generate(prompts, params)
  expanded = Generator(model, absorb=False).generate(prompts, params)
  assert absorbed == expanded, name
