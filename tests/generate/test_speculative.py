"""Self-speculative decoding (generate/speculative.py): greedy output token for token plain greedy decoding's
(MLA, GQA and learned-position models; batch > 1 with prompts of different lengths; drafts that are mostly right,
so long accepted runs and per-row rollbacks happen, and drafts from the random MTP modules, mostly wrong), the
sampled output distributed as plain sampling's (a chi-square test on a 6-token vocabulary against the exact joint
distribution), one compiled verify step, and one-line errors without MTP modules."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from superlm_jax.errors import UserError
from superlm_jax.generate import speculative
from superlm_jax.generate.decode import Generator, SamplingParams
from superlm_jax.models.transformer import build_model
from tests.conftest import VARIANTS, tiny_model_config

VOCAB = 8
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)


def mtp_model(variant, *, vocab=VOCAB, depth=2, seed=1):
  # A wide init spreads the logits, so greedy choices are not near-ties that float rounding could flip.
  config = tiny_model_config(**VARIANTS[variant], vocab_size=vocab, mtp_depth=depth, init_std=0.5)
  return build_model(config, compute_dtype="float32", seed=seed)


def prompts_of(lengths, vocab=VOCAB, seed=0):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(0, vocab, n)] for n in lengths]


def assert_same_rows(rows, expected):
  """Same ids and finish reasons; log-probs equal up to float32 rounding (the verify pass computes n + 1 positions
  at once, a plain step one)."""
  assert [(r.ids, r.finish_reason) for r in rows] == [(r.ids, r.finish_reason) for r in expected]
  for row, want in zip(rows, expected):
    np.testing.assert_allclose(row.logprobs, want.logprobs, atol=1e-5)


class OracleDrafts(Generator):
  """Drafts read from the known plain greedy continuation (`full[b]`: prompt + output), each one corrupted with
  probability `wrong`: the MTP modules still run (their caches are what a real pass leaves), only the drafted
  tokens are replaced. Greedy verification must give the same output whatever the drafts are."""

  def __init__(self, model, full, wrong, **kwargs):
    super().__init__(model, **kwargs)
    self.full, self.wrong = full, wrong

  def _draft_fn(self, params, rest, state, lengths, key, knobs):
    drafts, dists, state = super()._draft_fn(params, rest, state, lengths, key, knobs)
    n = drafts.shape[1]
    truth = jnp.take_along_axis(self.full, jnp.clip(lengths[:, None] + 1 + jnp.arange(n), 0,
                                                    self.full.shape[1] - 1), axis=1)
    corrupt = jax.random.uniform(jax.random.fold_in(key, 7), truth.shape) < self.wrong
    drafts = jnp.where(corrupt, (truth + 1) % VOCAB, truth).astype(jnp.int32)
    for k in range(n):
      state = state.replace(tokens=speculative.write_at(state.tokens, drafts[:, k:k + 1], lengths + k + 1))
    return drafts, jax.nn.one_hot(drafts, VOCAB, dtype=jnp.float32), state


@pytest.mark.parametrize("variant,draft_tokens", [("llama_gqa_untied", 1), ("mla_qlora", 2), ("gpt2_learned", 2)])
def test_greedy_is_plain_greedy_with_the_mtp_drafts(variant, draft_tokens):
  model = mtp_model(variant)
  prompts = prompts_of((3, 7, 1))
  plain = Generator(model).generate_rows(prompts, GREEDY)
  generator = Generator(model, draft_tokens=draft_tokens)
  assert_same_rows(generator.generate_rows(prompts, GREEDY), plain)
  assert generator.last_stats.steps > 0 and len(generator.last_stats.accepted) == draft_tokens


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "mla_qlora"])
def test_greedy_is_plain_greedy_when_drafts_are_mostly_accepted(variant):
  model = mtp_model(variant)
  prompts = prompts_of((5, 2, 9, 4), seed=3)
  params = SamplingParams(temperature=0.0, max_new_tokens=30, repetition_penalty=1.3)
  plain = Generator(model).generate_rows(prompts, params)
  width = 64
  full = np.zeros((len(prompts), width), np.int32)
  for i, (p, row) in enumerate(zip(prompts, plain)):
    full[i, :len(p) + len(row.ids)] = p + row.ids
  generator = OracleDrafts(model, jnp.asarray(full), wrong=0.25, draft_tokens=2)
  assert_same_rows(generator.generate_rows(prompts, params), plain)
  rates = generator.last_stats.acceptance_rates()
  assert rates[0] > 0.5 and 0 < rates[1] < 1  # long runs accepted, and rollbacks after some of them


def test_eos_and_stop_strings_inside_an_accepted_run_end_the_row_there():
  model = mtp_model("llama_gqa_untied")
  prompts = prompts_of((4, 6), seed=5)
  plain = Generator(model).generate_rows(prompts, GREEDY)
  eos = plain[0].ids[5]  # a token the first row generates: it ends there, whatever the drafts
  decode = lambda ids: "".join(chr(97 + t) for t in ids)
  stop = decode(plain[1].ids[7:9])
  options = dict(eos_ids=[eos], stop_strings=[stop], decode=decode)
  expected = Generator(model).generate_rows(prompts, GREEDY, **options)
  assert expected[0].finish_reason == "eos"
  full = np.zeros((2, 64), np.int32)
  for i, (p, row) in enumerate(zip(prompts, plain)):
    full[i, :len(p) + len(row.ids)] = p + row.ids
  streamed = []
  generator = OracleDrafts(model, jnp.asarray(full), wrong=0.0, draft_tokens=2)
  rows = generator.generate_rows(prompts, GREEDY, on_tokens=lambda s, t, alive: streamed.append((t[0], alive[0])),
                                 **options)
  assert_same_rows(rows, expected)
  assert [int(t) for t, alive in streamed if alive] == rows[0].ids  # streaming sees each kept token once


def exact_joint(model, prompt, new_tokens, vocab):
  """p(t_1..t_new | prompt) for every continuation, from the model's softmax at temperature 1 (float64)."""
  joint = {(): 1.0}
  for _ in range(new_tokens):
    contexts = list(joint)
    logits = np.asarray(model(jnp.asarray([prompt + list(c) for c in contexts], jnp.int32))[:, -1], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    joint = {c + (t,): joint[c] * probs[i, t] for i, c in enumerate(contexts) for t in range(vocab)}
  return joint


def test_sampled_output_has_the_plain_sampling_distribution():
  vocab, rows, new = 6, 6000, 3
  model = mtp_model("llama_gqa_untied", vocab=vocab, seed=4)
  prompt = [1, 4]
  joint = exact_joint(model, prompt, new, vocab)
  generator = Generator(model, draft_tokens=2)
  out = generator.generate([prompt] * rows, SamplingParams(temperature=1.0, max_new_tokens=new, seed=11))
  counts = {c: 0 for c in itertools.product(range(vocab), repeat=new)}
  for ids in out:
    counts[tuple(ids)] += 1
  # Cells expected fewer than 5 times are pooled into one, as the chi-square approximation needs.
  expected = np.array([joint[c] * rows for c in counts])
  observed = np.array([counts[c] for c in counts])
  small = expected < 5
  expected = np.append(expected[~small], expected[small].sum())
  observed = np.append(observed[~small], observed[small].sum())
  p_value = scipy_stats.chisquare(observed, expected).pvalue
  assert p_value > 1e-3, p_value
  rates = generator.last_stats.acceptance_rates()
  assert 0 < rates[0] < 1  # the random drafts are accepted sometimes and rejected sometimes: both paths ran
  # The test can fail: taking every draft (no rejection rule) gives a measurably different distribution.
  always = Generator(model, draft_tokens=2)
  always._verify = jax.jit(lambda *a: _accept_all(always, *a), donate_argnames=())
  wrong = always.generate([prompt] * rows, SamplingParams(temperature=1.0, max_new_tokens=new, seed=11))
  observed_wrong = {c: 0 for c in counts}
  for ids in wrong:
    observed_wrong[tuple(ids)] += 1
  observed_wrong = np.array([observed_wrong[c] for c in counts])
  observed_wrong = np.append(observed_wrong[~small], observed_wrong[small].sum())
  assert scipy_stats.chisquare(observed_wrong, expected).pvalue < 1e-6


def _accept_all(generator, params, rest, cache, state, drafts, draft_dists, alive, key, knobs):
  """A broken verify step for the test's power check: told that the drafts had probability 0 under q, the rule
  u q < p keeps every draft."""
  return generator._verify_fn(params, rest, cache, state, drafts, jnp.zeros_like(draft_dists), alive, key, knobs)


def test_one_compiled_verify_step_per_draft_length():
  model = mtp_model("mla_qlora")
  generator = Generator(model, draft_tokens=2)
  for lengths in ((3, 5), (4, 2), (6, 1)):  # one prompt bucket, one cache bucket
    generator.generate(prompts_of(lengths), GREEDY)
  assert generator._verify._cache_size() == 1 and generator._draft._cache_size() == 1


def test_speculative_without_mtp_modules_is_one_line():
  plain_model = build_model(tiny_model_config(), compute_dtype="float32")
  with pytest.raises(UserError, match=r"model.mtp_depth=0 \(train it with --config.model.mtp_depth=1"):
    Generator(plain_model, draft_tokens=1)
  with pytest.raises(UserError, match="3 draft token.*model.mtp_depth=2"):
    Generator(mtp_model("llama_gqa_untied"), draft_tokens=3)
