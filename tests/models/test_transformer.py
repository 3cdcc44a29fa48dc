"""Whole-model properties for every attention/position/scoring variant."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from superlm_jax.models import accounting
from superlm_jax.models.transformer import build_model
from tests.conftest import tiny_model_config


def random_tokens(seed, shape, vocab=97):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def test_causality(variant_config):
  """Changing token t+1 (and everything after it) never changes logits at positions <= t."""
  model = build_model(variant_config, seed=1)
  tokens = random_tokens(0, (2, 24))
  base = model(tokens)
  for t in (0, 7, 22):
    changed = tokens.at[:, t + 1:].set(random_tokens(t + 10, (2, 24 - t - 1)))
    assert not np.array_equal(np.asarray(changed), np.asarray(tokens))
    logits = model(changed)
    np.testing.assert_array_equal(np.asarray(logits[:, :t + 1]), np.asarray(base[:, :t + 1]))
    assert np.abs(np.asarray(logits[:, t + 1:] - base[:, t + 1:])).max() > 1e-6


def test_cached_decode_equals_full_forward(variant_config):
  """Prefill 13 tokens, then decode one token at a time: every logit equals the uncached forward."""
  model = build_model(variant_config, seed=2)
  tokens = random_tokens(1, (3, 30))
  full = model(tokens)
  cache = model.init_cache(3, variant_config.max_seq_len)
  logits, cache = model(tokens[:, :13], cache=cache)
  pieces = [logits]
  for t in range(13, 30):
    logits, cache = model(tokens[:, t:t + 1], cache=cache)
    pieces.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(full), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [30, 30, 30])


def test_ragged_prompts_share_a_batch(variant_config):
  """Rows with different prompt lengths, right-padded in one prefill, decode exactly like each row alone."""
  model = build_model(variant_config, seed=3)
  lengths = [5, 11, 8]
  tokens = np.asarray(random_tokens(4, (3, 16)))
  cache = model.init_cache(3, 32)
  _, cache = model(jnp.asarray(tokens[:, :11]), cache=cache)  # padded to the longest prompt
  cache = cache.with_lengths(jnp.asarray(lengths))
  nxt = random_tokens(5, (3, 4))
  steps = []
  for t in range(4):
    logits, cache = model(nxt[:, t:t + 1], cache=cache)
    steps.append(logits[:, 0])
  for row, n in enumerate(lengths):
    alone = model(jnp.concatenate([jnp.asarray(tokens[row:row + 1, :n]), nxt[row:row + 1]], axis=1))
    np.testing.assert_allclose(np.asarray(jnp.stack(steps, 1)[row]), np.asarray(alone[0, n:]), rtol=1e-5, atol=1e-5)


def test_parameter_count_matches_accounting(variant_config):
  model = build_model(variant_config)
  actual = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert actual == accounting.parameter_count(variant_config)["total"]


def test_every_parameter_has_logical_axis_names(variant_config):
  model = build_model(variant_config)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim, path


def test_kv_cache_bytes_per_token():
  cfg = tiny_model_config(num_kv_heads=2)
  model = build_model(cfg)
  cache = model.init_cache(1, 10, jnp.bfloat16)
  measured = sum(a.nbytes for layer in cache.layers for a in layer.values()) / 10
  assert measured == accounting.kv_cache_bytes_per_token(cfg, bytes_per_value=2)


def test_bfloat16_compute_is_close_to_float32():
  cfg = tiny_model_config(norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False)
  tokens = random_tokens(6, (2, 16))
  f32 = build_model(cfg, seed=0)(tokens)
  bf16 = build_model(cfg, seed=0, compute_dtype=jnp.bfloat16)(tokens)
  assert bf16.dtype == jnp.float32  # logits are always returned in float32
  assert np.abs(np.asarray(bf16 - f32)).max() < 0.05 * np.abs(np.asarray(f32)).max() + 0.05
