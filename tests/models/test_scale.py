"""What lets real sizes train: scan over layers, packed documents, rematerialisation and the fused loss, each
against the plain path it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from superlm_jax.models.options import RuntimeOptions
from superlm_jax.data.pipeline import document_segments
from superlm_jax.models.layout import loop_to_scan, scan_to_loop
from superlm_jax.models.transformer import build_model, forward_with_moe_stats
from superlm_jax.training.loss import cross_entropy, head_cross_entropy
from tests.conftest import VARIANTS, numpy_init, tiny_model_config

MOE = dict(norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False, n_routed_experts=4, num_experts_per_tok=2,
           n_shared_experts=1, moe_intermediate_size=16, num_layers=3)
LAYOUT_CASES = {
    "gpt2": VARIANTS["gpt2_learned"],
    "llama_gqa": VARIANTS["llama_gqa_untied"],
    "mla": VARIANTS["mla_qlora"],
    "moe_first_dense": dict(MOE, first_k_dense=1),  # two stacks: 1 dense block, 2 MoE blocks
    "moe_mla": dict(MOE, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
}


def _loop_and_scan(overrides, seed=0, remat="none"):
  loop_cfg = tiny_model_config(**overrides)
  loop = numpy_init(lambda: build_model(loop_cfg), seed=seed, std=0.05)  # about the real init scale
  scan_cfg = tiny_model_config(**overrides, scan_layers=True)
  scan = nnx.eval_shape(lambda: build_model(scan_cfg, options=RuntimeOptions(remat=remat)))
  state = nnx.state(scan)
  nnx.replace_by_pure_dict(state, loop_to_scan(nnx.state(loop).to_pure_dict(), loop_cfg))
  nnx.update(scan, state)
  return loop, scan, loop_cfg


@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
def test_scan_layout_equals_loop(case):
  loop, scan, cfg = _loop_and_scan(LAYOUT_CASES[case])
  assert scan.blocks is None and len(scan.layer_stacks) == (2 if case == "moe_first_dense" else 1)
  tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, cfg.vocab_size)
  full = loop(tokens)
  # 1e-5: the scan body compiles separately from the unrolled layers, so float32 sums reassociate differently
  # depending on the CPU (1.5e-6 on a 2-core AMD EPYC; below 1e-6 on the Intel Xeon this was written on).
  np.testing.assert_allclose(scan(tokens), full, atol=1e-5, rtol=0)
  # Cached decoding through the stacked cache: a prefill of 12 tokens, then one token at a time.
  cache = scan.init_cache(2, 32)
  logits, cache = scan(tokens[:, :12], cache=cache)
  np.testing.assert_allclose(logits, full[:, :12], atol=1e-5, rtol=0)
  for t in range(12, 15):
    logits, cache = scan(tokens[:, t:t + 1], cache=cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=0)
  # MoE router statistics come out per layer, in layer order, in both layouts.
  (_, loop_stats), (_, scan_stats) = forward_with_moe_stats(loop, tokens), forward_with_moe_stats(scan, tokens)
  assert len(loop_stats) == len(scan_stats) == sum(cfg.n_routed_experts > 0 and i >= cfg.first_k_dense
                                                   for i in range(cfg.num_layers))
  for a, b in zip(loop_stats, scan_stats):
    np.testing.assert_allclose(a["load"], b["load"], atol=1e-7)
  # And back: the loop layout is recovered exactly.
  back = scan_to_loop(nnx.state(scan, nnx.Param).to_pure_dict(), cfg)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(nnx.state(loop, nnx.Param).to_pure_dict())):
    np.testing.assert_array_equal(a, b)


def test_scan_stacks_carry_the_layers_axis_name():
  cfg = tiny_model_config(**LAYOUT_CASES["moe_first_dense"], scan_layers=True)
  model = nnx.eval_shape(lambda: build_model(cfg))
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    if path[0] == "layer_stacks":
      assert variable.get_metadata()["out_sharding"][0] == "layers", path


@pytest.mark.parametrize("remat, scan_layers", [("full", False), ("full", True), ("dots_saveable", True)])
def test_remat_changes_memory_not_gradients(remat, scan_layers):
  overrides = dict(LAYOUT_CASES["llama_gqa"], scan_layers=scan_layers)
  cfg = tiny_model_config(**overrides)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  grads = []
  for policy in ("none", remat):
    model = numpy_init(lambda: build_model(cfg, options=RuntimeOptions(remat=policy)), seed=3, std=0.2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads.append(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens) ** 2))(params))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(b, a, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("variant, impl", [("gpt2_learned", "xla"), ("llama_gqa_untied", "xla_chunked"),
                                           ("mla_nope_ssmax_untied", "xla"), ("mla_nope_ssmax_untied", "xla_chunked")])
def test_packed_documents_see_only_themselves(variant, impl):
  """Three documents packed into one row (EOS opening each after the first) give each document exactly the
  logits it gets alone, at positions starting from 0."""
  cfg = tiny_model_config(**VARIANTS[variant], attention_impl=impl)
  model = numpy_init(lambda: build_model(cfg), seed=4, std=0.3)
  eos = 1
  rng = np.random.default_rng(0)
  docs = [np.concatenate([[eos], rng.integers(2, cfg.vocab_size, n)]) for n in (9, 14, 6)]
  docs[0] = docs[0][1:]  # the first piece of a window starts mid-document, without an EOS
  row = np.concatenate(docs)[None]
  packed = document_segments(row, eos)
  logits = model(jnp.asarray(row), positions=jnp.asarray(packed["positions"]),
                 segments=jnp.asarray(packed["segments"]))
  start = 0
  for doc in docs:
    alone = model(jnp.asarray(doc)[None])
    np.testing.assert_allclose(logits[:, start:start + len(doc)], alone, atol=2e-5, rtol=1e-5)
    start += len(doc)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_head_loss_equals_full_logits(label_smoothing, masked):
  """Chunked head + cross-entropy (with a ragged last chunk) equals the loss of the whole logits matrix, and so
  do its gradients with respect to the hidden states and the head."""
  keys = jax.random.split(jax.random.key(5), 4)
  hidden = jax.random.normal(keys[0], (3, 37, 16))
  head = 0.5 * jax.random.normal(keys[1], (16, 101))
  targets = jax.random.randint(keys[2], (3, 37), 0, 101)
  mask = jax.random.bernoulli(keys[3], 0.7, (3, 37)) if masked else None

  def full(h, w):
    return cross_entropy(h @ w, targets, label_smoothing=label_smoothing, mask=mask)

  def fused(h, w):
    return head_cross_entropy(h, w, targets, label_smoothing=label_smoothing, mask=mask, chunk_size=16)

  for a, b in zip(fused(hidden, head), full(hidden, head)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  g_fused = jax.grad(lambda h, w: fused(h, w)[0], argnums=(0, 1))(hidden, head)
  g_full = jax.grad(lambda h, w: full(h, w)[0], argnums=(0, 1))(hidden, head)
  for a, b in zip(g_fused, g_full):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  # The chunked step never forms a [tokens, vocab] array; the one-matrix path does.
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda h, w: fused(h, w)[0], argnums=(0, 1)))(hidden, head))
  assert "111,101]" not in jaxpr and "[16,101]" in jaxpr


def test_scan_layout_decays_the_same_parameters():
  """Weight decay goes to matrices only; a stack of norm scales ([layers, d]) is not a matrix."""
  from superlm_jax.models.spec import ModelSpec
  from superlm_jax.training.optim import decay_mask
  loop, scan, cfg = _loop_and_scan(LAYOUT_CASES["moe_first_dense"])
  flat = [{tuple(str(k) for k in path): bool(v) for path, v in nnx.to_flat_state(decay_mask(nnx.state(m, nnx.Param)))}
          for m in (loop, scan)]
  stack_of = {str(i): str(s) for s, (a, b) in enumerate(ModelSpec.from_config(cfg).layer_groups) for i in range(a, b)}
  expected = {(("layer_stacks", stack_of[p[1]]) + p[2:] if p[0] == "blocks" else p): v for p, v in flat[0].items()}
  assert flat[1] == expected
  assert not flat[1][("layer_stacks", "0", "attn_norm", "scale")] and flat[1][("layer_stacks", "0", "ffn", "up")]
