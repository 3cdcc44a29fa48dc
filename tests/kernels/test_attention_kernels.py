"""The memory-efficient attention path (tokamax xla_chunked) against the einsum reference: forward and gradients,
every attention kind x scoring x masking, at float32 within 3e-5."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import VARIANTS, numpy_init, tiny_model_config
from superlm_jax.errors import UserError
from superlm_jax.kernels.attention import check_attention_impl, dot_product_attention, resolve_attention_impl
from superlm_jax.models.transformer import build_model


def _rand(key, shape, scale=1.0):
  return scale * jax.random.normal(key, shape, jnp.float32)


def _packed(batch, seq, rng):
  """Random document boundaries per row: segment ids and positions restarting at each document."""
  segments = np.zeros((batch, seq), np.int32)
  positions = np.zeros((batch, seq), np.int32)
  for b in range(batch):
    starts = np.sort(rng.choice(np.arange(1, seq), size=3, replace=False))
    seg = np.searchsorted(starts, np.arange(seq), side="right")
    segments[b] = seg
    positions[b] = np.arange(seq) - np.concatenate([[0], starts])[seg]
  return jnp.asarray(segments), jnp.asarray(positions)


# (heads, kv_heads, qk width, v width): MHA, GQA, MQA and MLA's expanded form (q.k width != value width).
KINDS = {"mha": (4, 4, 8, 8), "gqa": (4, 2, 8, 8), "mqa": (4, 1, 8, 8), "mla": (4, 4, 12, 6)}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("scoring", ["softmax", "ssmax_bias"])  # ssmax_bias covers the plain SSMax factor too
@pytest.mark.parametrize("masking", ["causal", "packed", "cache_prefill"])
def test_chunked_equals_reference(kind, scoring, masking):
  heads, kv_heads, qk, vd = KINDS[kind]
  batch, seq = 2, 40
  # zlib.crc32, not hash(): Python salts str hashes per process (PYTHONHASHSEED), which drew new inputs every run.
  keys = jax.random.split(jax.random.key(zlib.crc32(f"{kind}-{scoring}-{masking}".encode())), 6)
  q = _rand(keys[0], (batch, seq, heads, qk))
  kv_len = seq if masking != "cache_prefill" else 64
  k = _rand(keys[1], (batch, kv_len, kv_heads, qk))
  v = _rand(keys[2], (batch, kv_len, kv_heads, vd))
  ssmax = {}
  if scoring != "softmax":
    ssmax["ssmax_scale"] = jax.random.uniform(keys[3], (heads,), minval=0.5, maxval=2.0)
  if scoring == "ssmax_bias":
    ssmax["ssmax_bias"] = jax.random.uniform(keys[4], (heads,), minval=-0.5, maxval=0.5)
  arange = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  if masking == "causal":
    mask = dict(q_positions=arange, kv_positions=arange, self_attention=True)
  elif masking == "packed":
    segments, positions = _packed(batch, seq, np.random.default_rng(0))
    mask = dict(q_positions=positions, kv_positions=positions, q_segments=segments, kv_segments=segments,
                self_attention=True)
  else:  # a prompt block over a decode cache: per-row lengths (right-padded rows), keys at slots 0..kv_len-1
    lengths = jnp.asarray([0, 5], jnp.int32)
    mask = dict(q_positions=lengths[:, None] + arange,
                kv_positions=jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len)))

  def run(impl, q, k, v):
    return dot_product_attention(q, k, v, scale=0.3, impl=impl, **mask, **ssmax)

  ref, chunked = run("xla", q, k, v), run("xla_chunked", q, k, v)
  # float32 online softmax over key chunks vs one softmax: ~1e-5 apart at values of size ~3, outputs and
  # gradients alike (single elements reached 1.2e-5 and 1.4e-5 when the draws were salted per process).
  np.testing.assert_allclose(chunked, ref, atol=3e-5, rtol=1e-5)
  cotangent = _rand(keys[5], ref.shape)
  grads = [jax.grad(lambda *a, impl=impl: jnp.sum(run(impl, *a) * cotangent), argnums=(0, 1, 2))(q, k, v)
           for impl in ("xla", "xla_chunked")]
  for g_ref, g_chunked in zip(*grads):
    np.testing.assert_allclose(g_chunked, g_ref, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "mla_nope_ssmax_untied"])  # GQA + RoPE; MLA + SSMax
def test_model_logits_and_gradients_do_not_depend_on_impl(variant):
  """The whole decoder with attention_impl=xla_chunked equals the einsum reference, gradients included."""
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 97)
  outputs = []
  for impl in ("xla", "xla_chunked"):
    cfg = tiny_model_config(**VARIANTS[variant], attention_impl=impl)
    model = numpy_init(lambda: build_model(cfg), seed=0, std=0.2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens) ** 2)
    outputs.append((model(tokens), jax.grad(loss)(params)))
  np.testing.assert_allclose(outputs[1][0], outputs[0][0], atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(outputs[1][1]), jax.tree.leaves(outputs[0][1])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_auto_choice_per_backend():
  assert resolve_attention_impl("auto", 1, 4096, backend="gpu") == "xla"  # a decode step
  assert resolve_attention_impl("auto", 2048, 2048, backend="gpu")[0] == "mosaic"
  assert resolve_attention_impl("auto", 2048, 2048, backend="tpu") == ("mosaic", "xla_chunked")
  assert resolve_attention_impl("auto", 256, 256, backend="cpu") == "xla"
  assert resolve_attention_impl("auto", 2048, 2048, backend="cpu") == "xla_chunked"


@pytest.mark.parametrize("impl", ["triton", "cudnn", "mosaic", "flash"])
def test_impl_the_backend_cannot_run_is_one_clear_error(impl):
  with pytest.raises(UserError, match="attention_impl") as info:
    check_attention_impl(impl, backend="cpu")
  assert "\n" not in str(info.value)
  with pytest.raises(UserError, match="attention_impl"):  # at construction, before anything runs
    build_model(tiny_model_config(attention_impl=impl))
