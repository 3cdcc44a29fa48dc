"""The fused MLA decode kernel against a float64 NumPy formula, in the Pallas interpreter on CPU.

The kernel body is one; what differs per backend is its plan (padding, block sizes, cache blocking, scalar
prefetch). Each plan runs here in interpret mode, so the GPU and TPU parameterisations are checked for numbers too;
without the hardware the tests can only check that the kernel lowers for GPU/TPU (no GPU/TPU in CI). On a GPU or
TPU the plans of that backend compile natively instead (`interpret_for`): benchmarks/device_suite.py runs this file
there.

The interpreter fills every output buffer with NaN before the kernel runs (`uninitialized_value`), which is the
poison that shows an output element the kernel never wrote (`test_interpreter_poisons_unwritten_outputs` pins that).
"""

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import pallas as pl

from superlm_jax.config import base_config, validate
from superlm_jax.errors import UserError
from superlm_jax.generate.decode import Generator, SamplingParams
from superlm_jax.kernels import mla_decode as kernel
from superlm_jax.layers import mla as mla_layer
from superlm_jax.layers.mla import MultiHeadLatentAttention
from superlm_jax.models.transformer import build_model
from tests.conftest import VARIANTS, numpy_init, tiny_model_config


def random_inputs(seed, batch, heads, cache_len, latent, rope, dtype):
  """Fresh N(0, 1) queries and cache (never zeros), rounded to `dtype` once; the reference reads the same values."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q_latent = jax.random.normal(keys[0], (batch, heads, latent)).astype(dtype)
  c_kv = jax.random.normal(keys[1], (batch, cache_len, latent)).astype(dtype)
  q_rope = jax.random.normal(keys[2], (batch, heads, rope)).astype(dtype) if rope else None
  k_rope = jax.random.normal(keys[3], (batch, cache_len, rope)).astype(dtype) if rope else None
  return q_latent, q_rope, c_kv, k_rope


def reference(q_latent, q_rope, c_kv, k_rope, lengths, scale):
  """softmax(scale * (q_latent . c + q_rope . k_rope)) over the first `length` keys, @ c; and the LSE. float64."""
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
  scores = np.einsum("bhc,btc->bht", f64(q_latent), f64(c_kv))
  if q_rope is not None:
    scores += np.einsum("bhr,btr->bht", f64(q_rope), f64(k_rope))
  scale = np.asarray(scale, np.float64)
  scores *= scale[..., None] if scale.ndim == 2 else scale
  out = np.zeros(q_latent.shape)
  lse = np.zeros(q_latent.shape[:2])
  for b, n in enumerate(np.asarray(lengths)):
    s = scores[b, :, :n]
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    out[b] = (p / p.sum(-1, keepdims=True)) @ f64(c_kv)[b, :n]
    lse[b] = (m + np.log(p.sum(-1, keepdims=True)))[:, 0]
  return out, lse


def interpret_for(backend: str) -> bool:
  """Plans of the machine's own accelerator compile natively; any other plan (every plan on CPU) is interpreted."""
  return backend == "cpu" or backend != jax.default_backend()


def assert_matches(got, want, dtype):
  tol = 1e-5 if dtype == jnp.float32 else 2e-2  # relative to the output's scale
  for g, w in zip(got, want):
    g = np.asarray(g)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max())


# (backend plan, dtype, batch, heads, cache_len, latent, rope, lengths, block_t, num_splits, per-head scale)
CASES = {
    # Lengths around a 64-key block boundary, one block per split: 1 key, a block minus one, exactly, plus one.
    "boundaries_f32": ("cpu", jnp.float32, 4, 8, 192, 64, 32, [1, 63, 64, 65], 64, 3, False),
    # The GPU plan: heads 8 -> 16 padded, rope 32, clamped windows, an SSMax-like per-(row, head) scale.
    "gpu_plan_f32": ("gpu", jnp.float32, 4, 8, 200, 64, 32, [1, 63, 64, 65], 32, 4, True),
    "gpu_plan_bf16_nope_h1": ("gpu", jnp.bfloat16, 2, 1, 4097, 16, 0, [4097, 1000], 64, 8, False),
    # 40 heads -> 64 padded, two groups of 32 heads (two programs per split); rope 6 -> 16, latent 24 -> 32 padded.
    "gpu_plan_h40_groups": ("gpu", jnp.float32, 2, 40, 100, 24, 6, [100, 37], 32, 2, True),
    # The TPU plan: the cache blocked per split, the edge block past T read as NaN by the interpreter.
    "tpu_plan_bf16": ("tpu", jnp.bfloat16, 3, 8, 1000, 128, 64, [1000, 257, 1], 128, 4, False),
    "tpu_plan_f32_nope_h16": ("tpu", jnp.float32, 2, 16, 4097, 32, 0, [4097, 64], None, None, True),
    # Default CPU plans: long (4097, three splits, the last window clamped), heads 16 with rope 64, bf16.
    "long_f32_nope_h1": ("cpu", jnp.float32, 2, 1, 4097, 16, 0, [4097, 1000], None, None, False),
    "h16_rope64_bf16": ("cpu", jnp.bfloat16, 2, 16, 1024, 128, 64, [1000, 513], None, 2, False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_reference(name):
  backend, dtype, batch, heads, cache_len, latent, rope, lengths, block_t, num_splits, per_head = CASES[name]
  q_latent, q_rope, c_kv, k_rope = random_inputs(sorted(CASES).index(name), batch, heads, cache_len, latent, rope,
                                                 dtype)
  scale = 1.0 / math.sqrt(latent + rope)
  if per_head:  # what the MLA layer passes under SSMax: scale * s_h * log(n_b)
    scale = scale * jax.random.uniform(jax.random.key(99), (batch, heads), minval=0.5, maxval=3.0)
  lengths = jnp.asarray(lengths, jnp.int32)
  got = kernel.mla_decode_attention(q_latent, q_rope, c_kv, k_rope, lengths, scale=scale, backend=backend,
                                    interpret=interpret_for(backend), block_t=block_t, num_splits=num_splits)
  assert got[0].shape == (batch, heads, latent) and got[0].dtype == jnp.float32
  assert got[1].shape == (batch, heads) and got[1].dtype == jnp.float32
  assert_matches(got, reference(q_latent, q_rope, c_kv, k_rope, lengths, scale), dtype)


def test_interpreter_poisons_unwritten_outputs():
  """The premise of the next test: an output element no program writes comes back as NaN in interpret mode."""
  def write_first_row_only(x_ref, o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]
  out = pl.pallas_call(write_first_row_only, out_shape=jax.ShapeDtypeStruct((2, 8), jnp.float32), grid=(2,),
                       in_specs=[pl.BlockSpec((1, 8), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((1, 8), lambda i: (i, 0)), interpret=True)(jnp.ones((2, 8)))
  assert np.isfinite(np.asarray(out[0])).all() and np.isnan(np.asarray(out[1])).all()


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_every_partial_written_and_empty_splits_neutral(backend):
  """Every (row, split) program writes all of its partial (no NaN poison left, padded heads included); splits past
  a row's length hold the neutral (m = -1e30, l = 0, acc = 0); a row of length 0 (not a valid decode input) gives
  out = 0 and lse = -inf, not NaN, and leaves the other rows exact."""
  batch, heads, cache_len, latent, rope = 3, 4, 300, 32, 16
  q_latent, q_rope, c_kv, k_rope = random_inputs(7, batch, heads, cache_len, latent, rope, jnp.float32)
  lengths = jnp.asarray([0, 5, 130], jnp.int32)
  block_t = 128 if backend == "tpu" else 32
  plan = kernel.plan_decode(batch, heads, cache_len, latent, rope, jnp.float32, backend=backend,
                            interpret=interpret_for(backend), block_t=block_t, num_splits=5)
  assert plan.num_splits >= 3
  acc, m, l = (np.asarray(a) for a in kernel.mla_decode_partials(q_latent, q_rope, c_kv, k_rope, lengths, plan,
                                                                 scale=0.2))
  assert not any(np.isnan(a).any() for a in (acc, m, l))
  starts = np.arange(plan.num_splits) * plan.split_len
  for b, n in enumerate(np.asarray(lengths)):
    empty = starts >= n
    assert (m[b, empty] == -1e30).all() and (l[b, empty] == 0).all() and (acc[b, empty] == 0).all()
    assert (l[b, ~empty] > 0).all()
  out, lse = kernel.combine_partials(*(jnp.asarray(a) for a in (acc, m, l)))
  out, lse = np.asarray(out)[:, :heads, :latent], np.asarray(lse)[:, :heads]
  assert (out[0] == 0).all() and (lse[0] == -np.inf).all()
  want = reference(q_latent[1:], q_rope[1:], c_kv[1:], k_rope[1:], lengths[1:], 0.2)
  assert_matches((out[1:], lse[1:]), want, jnp.float32)


@pytest.mark.parametrize("backend,platform,target", [("gpu", "cuda", "triton"), ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("shape", [(64, 16, 4096, 512, 64, jnp.bfloat16), (8, 128, 4096, 512, 64, jnp.bfloat16),
                                   (3, 5, 100, 24, 6, jnp.float32), (2, 1, 4097, 512, 0, jnp.float32)],
                         ids=["deepseek_v2_lite_bf16", "deepseek_v3_heads128_bf16", "odd_sizes_f32", "nope_f32"])
def test_lowers_for_gpu_and_tpu_without_the_hardware(backend, platform, target, shape):
  """jax lowers a Pallas kernel for another platform on this CPU: Triton IR (Pallas' own checks: power-of-two
  tensors, 2-D dots) or Mosaic (block shapes (8, 128)-divisible or whole, verified MLIR). Compiling that IR
  (Triton -> PTX, Mosaic layout passes) happens in the device's compiler and is NOT checked here."""
  batch, heads, cache_len, latent, rope, dtype = shape
  args = [jax.ShapeDtypeStruct(s, d) for s, d in [((batch, heads, latent), dtype), ((batch, heads, rope), dtype),
                                                   ((batch, cache_len, latent), dtype),
                                                   ((batch, cache_len, rope), dtype), ((batch,), jnp.int32)]]
  fn = jax.jit(functools.partial(kernel.mla_decode_attention, scale=0.1, backend=backend, interpret=False))
  text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert target in text and "mla_decode" in text


@functools.partial(jax.jit, static_argnums=0)
def layer_call(graphdef, state, x, start, cache):
  """One jitted layer call on tokens at positions start + [0, seq) (decode_impl lives in the static graphdef)."""
  batch, seq = x.shape[:2]
  positions = jnp.broadcast_to(start + jnp.arange(seq), (batch, seq))
  return nnx.merge(graphdef, state)(x, positions, cache, jnp.full((batch,), start, jnp.int32))


@pytest.mark.parametrize("rope_dim,scoring", [(8, "softmax"), (0, "ssmax")])
def test_mla_layer_decode_steps_match_the_einsum_path(rope_dim, scoring):
  """The layer's absorbed decode step with the kernel equals the XLA einsum path, with rope and with SSMax."""
  def make(decode_impl):  # the same weights for every decode_impl
    attn = numpy_init(lambda: MultiHeadLatentAttention(
        32, 4, q_lora_rank=10, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=rope_dim, v_head_dim=5,
        rope_theta=100.0, norm_eps=1e-6, scoring=scoring, ssmax_bias=scoring == "ssmax", std=0.4, out_std=0.4,
        rngs=nnx.Rngs(0), decode_impl=decode_impl), seed=rope_dim, std=0.4)
    if attn.ssmax_scale is not None:
      attn.ssmax_scale[...] = jnp.asarray([0.5, 1.0, 1.5, 2.0])
      attn.ssmax_bias[...] = jnp.asarray([0.1, -0.2, 0.0, 0.3])
    return attn

  attn = make("xla")
  x = jax.random.normal(jax.random.key(rope_dim), (2, 10, 32))
  _, prefilled = layer_call(*nnx.split(attn), x[:, :7], 0, attn.init_cache(2, 16, jnp.float32))
  steps = {}
  for impl in ("xla", "pallas"):
    graphdef, state = nnx.split(make(impl))
    cache, ys = prefilled, []
    for t in range(7, 10):
      y, cache = layer_call(graphdef, state, x[:, t:t + 1], t, cache)
      ys.append(y)
    steps[impl] = np.asarray(jnp.concatenate(ys, 1))
  np.testing.assert_allclose(steps["pallas"], steps["xla"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["mla_qlora", "mla_nope_ssmax_untied"])
def test_generator_greedy_tokens_match_xla_path(variant):
  """Whole-model greedy decoding of a ragged batch: the kernel gives the same tokens as the einsum path. Weights
  drawn with a larger std than init so the tiny model does not just echo its last token."""
  model = numpy_init(lambda: build_model(tiny_model_config(**VARIANTS[variant]), seed=0), seed=5, std=0.3)
  prompts = [[5, 17, 3, 42, 8, 1, 60], [9, 2], [33, 44, 55, 66]]
  params = SamplingParams(max_new_tokens=10, temperature=0.0)
  tokens = {impl: Generator(model, decode_impl=impl).generate(prompts, params) for impl in ("xla", "pallas")}
  assert tokens["pallas"] == tokens["xla"]
  assert len({t for row in tokens["xla"] for t in row}) > 3  # not a degenerate constant continuation


def test_decode_impl_config_and_auto_resolution():
  config = base_config()
  assert config.decode.impl == "auto"
  assert kernel.resolve_decode_impl("pallas") == "pallas" and kernel.resolve_decode_impl("xla") == "xla"
  with pytest.raises(ValueError, match="unknown decode impl"):
    kernel.resolve_decode_impl("triton")
  config.decode.impl = "triton"
  with pytest.raises(UserError, match="decode.impl"):
    validate(config)
  with pytest.raises(UserError, match="decode.impl"):
    Generator(nnx.eval_shape(lambda: build_model(tiny_model_config(**VARIANTS["mla_qlora"]))), decode_impl="triton")


def fake_device(platform: str, kind: str, capability: str | None = None):
  """A stand-in for jax.devices()[0]: CUDA devices carry `compute_capability` ("9.0"), others do not."""
  device = types.SimpleNamespace(platform=platform, device_kind=kind)
  if capability is not None:
    device.compute_capability = capability
  return device


@pytest.mark.parametrize("device,want,notice", [
    (fake_device("cpu", "cpu"), "xla", False),  # the kernel would only run in the interpreter: silently XLA
    (fake_device("tpu", "TPU v5 lite"), "pallas", False),
    (fake_device("gpu", "NVIDIA H200", "9.0"), "pallas", False),
    (fake_device("gpu", "NVIDIA A100-SXM4-80GB", "8.0"), "pallas", False),
    (fake_device("gpu", "Tesla T4", "7.5"), "xla", True),  # Colab's free GPU: Triton cannot compile the kernel
    (fake_device("gpu", "AMD Instinct MI300X"), "xla", True),  # no CUDA compute capability to judge by
], ids=["cpu", "tpu", "h200", "a100", "t4", "no_capability"])
def test_auto_picks_the_kernel_only_where_it_compiles(monkeypatch, capsys, device, want, notice):
  monkeypatch.setattr(kernel, "_default_device", lambda: device)
  monkeypatch.setattr(kernel, "_notices_printed", set())
  for _ in range(3):  # resolved at every trace: the notice must not repeat
    assert kernel.resolve_decode_impl("auto") == want
  assert kernel.resolve_decode_impl("pallas") == "pallas" and kernel.resolve_decode_impl("xla") == "xla"
  printed = capsys.readouterr()
  assert printed.out == ""
  if notice:
    assert printed.err.count("\n") == 1 and device.device_kind in printed.err and "XLA path" in printed.err
  else:
    assert printed.err == ""


def test_t4_model_decodes_with_the_xla_path(monkeypatch, capsys):
  """decode.impl=auto on a faked T4: the model's absorbed steps never reach the kernel, and the notice is one line."""
  monkeypatch.setattr(kernel, "_default_device", lambda: fake_device("gpu", "Tesla T4", "7.5"))
  monkeypatch.setattr(kernel, "_notices_printed", set())
  monkeypatch.setattr(mla_layer, "mla_decode_attention", lambda *a, **k: pytest.fail("the kernel was called"))
  model = numpy_init(lambda: build_model(tiny_model_config(**VARIANTS["mla_qlora"]), seed=0), seed=5, std=0.3)
  tokens = Generator(model, decode_impl="auto").generate([[5, 17, 3]], SamplingParams(max_new_tokens=3,
                                                                                        temperature=0.0))
  assert len(tokens[0]) == 3
  assert capsys.readouterr().err.count("decode.impl=auto") == 1
