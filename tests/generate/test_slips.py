"""Three slips of issue 16 (point 10), one test each: the training samples' repetition penalty, MoE generation that
depended on the other rows of the batch, and a decode cache that overwrote earlier slots when written past its end."""

import jax
import numpy as np
import pytest
from flax import nnx

from superlm_jax.errors import UserError
from superlm_jax.generate.decode import Generator, SamplingParams
from superlm_jax.layers.cache import overflowed
from superlm_jax.models.transformer import build_model
from tests.conftest import numpy_init, tiny_model_config


def test_training_samples_use_every_sample_setting():
  """The samples printed during training once ignored sample.repetition_penalty."""
  from superlm_jax.config import base_config
  from superlm_jax.training.loop import sample_params
  config = base_config()
  config.sample.update(repetition_penalty=1.7, temperature=0.6, top_k=5, top_p=0.9, max_new_tokens=200, seed=11)
  assert sample_params(config, step=40) == SamplingParams(max_new_tokens=64, temperature=0.6, top_k=5, top_p=0.9,
                                                          repetition_penalty=1.7, seed=40)
  config.sample.max_new_tokens = 9
  assert sample_params(config, step=3).max_new_tokens == 9


def _moe_model(dispatch):
  cfg = tiny_model_config(n_routed_experts=4, num_experts_per_tok=2, mlp="swiglu", use_bias=False, norm="rmsnorm",
                          positions="rope", first_k_dense=0, n_shared_experts=0, moe_dispatch=dispatch,
                          capacity_factor=0.5)
  return numpy_init(lambda: build_model(cfg), seed=3, std=0.3)


def test_moe_capacity_generation_does_not_depend_on_the_other_rows():
  """With capacity dispatch, tokens of other rows and right padding used to take expert slots from a row's tokens.
  The generator decodes dropless: a row's continuation is the same alone, beside other rows, and under a model
  built with dropless dispatch (same weights)."""
  capacity, dropless = _moe_model("capacity"), _moe_model("dropless")
  rng = np.random.default_rng(0)
  row = rng.integers(1, 97, 5).tolist()
  others = [rng.integers(1, 97, 13).tolist(), rng.integers(1, 97, 2).tolist()]
  params = SamplingParams(max_new_tokens=12, temperature=0.0)
  alone = Generator(capacity).generate([row], params)[0]
  beside = Generator(capacity).generate([others[0], row, others[1]], params)[1]
  assert alone == beside
  assert alone == Generator(dropless).generate([row], params)[0]


@pytest.fixture(scope="module")
def six_of_eight():
  """A model, 10 random tokens of 2 rows and a cache of 8 slots holding the first 6."""
  model = build_model(tiny_model_config(), seed=0)
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 1, 97)
  _, cache = model(tokens[:, :6], cache=model.init_cache(2, 8))
  return model, tokens, cache


def test_eager_cache_write_past_max_len_is_an_error(six_of_eight):
  model, tokens, cache = six_of_eight
  with pytest.raises(UserError, match=r"4 new tokens at cache lengths up to 6 exceed the cache's max_len=8"):
    model(tokens[:, 6:], cache=cache)


def test_jitted_cache_write_past_max_len_is_dropped_and_detectable(six_of_eight):
  """dynamic_update_slice clamped the write back into the buffer, overwriting slots 2..5."""
  model, tokens, cache = six_of_eight
  before = jax.tree.map(np.asarray, cache.layers)
  _, after = nnx.jit(lambda m, t, c: m(t, cache=c))(model, tokens[:, 6:], cache)
  assert np.asarray(overflowed(after, 8)).all() and np.asarray(after.lengths).tolist() == [10, 10]
  for old, new in zip(before, after.layers):
    for name in old:
      np.testing.assert_array_equal(np.asarray(new[name])[:, :6], old[name][:, :6])  # earlier slots untouched
  # The two slots that fit hold what an in-range call writes there.
  _, fits = model(tokens[:, 6:8], cache=cache)
  for want, got in zip(fits.layers, after.layers):
    for name in want:
      np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-6, atol=1e-6)
