"""The bucketed scorer against the float64 log-softmax of one unpadded forward pass per row."""

import numpy as np
import pytest
from flax import nnx

from superlm_jax.errors import UserError
from superlm_jax.evaluation.scoring import Scorer
from superlm_jax.models.transformer import build_model
from tests.conftest import VARIANTS, tiny_model_config


def reference_scores(model, tokens, first):
  logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, np.asarray([tokens[:-1]], np.int32))[0], np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)
  targets = np.asarray(tokens[1:])
  rows = np.arange(len(targets))
  return logp[rows, targets][first - 1:], (logits.argmax(-1) == targets)[first - 1:]


@pytest.mark.parametrize("variant", ["gpt2_learned", "mla_qlora"])
def test_scores_equal_one_forward_per_row(variant):
  model = build_model(tiny_model_config(**VARIANTS[variant]), seed=3)
  rng = np.random.default_rng(0)
  rows = [(rng.integers(0, model.spec.vocab_size, n).tolist(), first) for n, first in
          [(9, 4), (2, 1), (30, 29), (17, 1), (5, 5)]]
  # A batch of 2 rows and a bucket of 8: three batches of two lengths, rows padded on the right and at the bottom.
  scorer = Scorer(model, batch_size=2, bucket=8, chunk_size=16)
  done = []
  for (tokens, first), got in zip(rows, scorer.score(rows, progress=done.append)):
    logprobs, greedy = reference_scores(model, tokens, first)
    assert got.logprobs.shape == (len(tokens) - first,)
    np.testing.assert_allclose(got.logprobs, logprobs, rtol=1e-5, atol=1e-5)
    assert np.array_equal(got.greedy, greedy)
  assert sum(done) == len(rows)
  # Rows of 30, 17 | 9, 5 | 2 tokens (longest first, two a batch) in buckets of 8: batches of 32, 8 and 8 input
  # positions, one program for each bucket.
  assert scorer._scores._cache_size() == 2  # pylint: disable=protected-access


def test_a_row_longer_than_the_context_is_one_line():
  model = build_model(tiny_model_config(), seed=0)
  too_long = list(range(1, model.spec.max_seq_len + 3))
  with pytest.raises(UserError, match="does not fit the model context"):
    Scorer(model).score([(too_long, 1)])
