"""Tests for superlm_jax.generate.sampling against naive float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from superlm_jax.generate import sampling

# Jitted entry points with every knob traced: eager JAX compiles each primitive on first use, which is slower than
# compiling these once, and it exercises the traced-knob path the decode loop relies on.
_penalty = jax.jit(sampling.apply_repetition_penalty)
_sample = jax.jit(sampling.sample_next_token)


def _logits(seed: int, batch: int, vocab: int, scale: float = 3.0) -> np.ndarray:
  """Random logits with both signs and no exact zeros."""
  rng = np.random.default_rng(seed)
  x = rng.normal(0.0, scale, size=(batch, vocab))
  x[np.abs(x) < 1e-3] = 0.5
  return x


def _softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  e = np.exp(x - np.max(x, axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------ naive references


def _ref_repetition_penalty(logits, history, mask, penalty):
  out = np.array(logits, np.float64)
  for b in range(out.shape[0]):
    seen = {int(t) for t, m in zip(history[b], mask[b]) if m}
    for t in seen:
      out[b, t] = out[b, t] / penalty if out[b, t] > 0 else out[b, t] * penalty
  return out


def _ref_top_k(logits, k):
  out = np.array(logits, np.float64)
  for b in range(out.shape[0]):
    order = sorted(range(out.shape[1]), key=lambda i: -out[b, i])
    for i in order[k:]:
      out[b, i] = -np.inf
  return out


def _ref_top_p(logits, p):
  out = np.array(logits, np.float64)
  probs = _softmax(out)
  for b in range(out.shape[0]):
    order = sorted(range(out.shape[1]), key=lambda i: -probs[b, i])
    keep, mass = [], 0.0
    for i in order:
      keep.append(i)
      mass += probs[b, i]
      if mass >= p:
        break
    for i in range(out.shape[1]):
      if i not in keep:
        out[b, i] = -np.inf
  return out


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
  n = counts.sum()
  support = probs > 0
  assert counts[~support].sum() == 0, "sampled a token of probability 0"
  expected = n * probs[support]
  return float(np.sum((counts[support] - expected) ** 2 / expected))


# ------------------------------------------------------------------ repetition penalty


@pytest.mark.parametrize("penalty", [1.3, 2.0, 0.8])
def test_repetition_penalty_matches_reference(penalty):
  batch, vocab, t = 4, 40, 12
  logits = _logits(0, batch, vocab)
  rng = np.random.default_rng(1)
  history = rng.integers(0, vocab, size=(batch, t))
  history[:, 1] = history[:, 0]  # repeated ids are penalised once
  mask = rng.random((batch, t)) < 0.7
  mask[:, 0] = True
  history[~mask] = -1  # padding must be ignored
  # Both signs really get penalised somewhere.
  seen_vals = [logits[b, history[b, i]] for b in range(batch) for i in range(t) if mask[b, i]]
  assert min(seen_vals) < 0 < max(seen_vals)

  got = _penalty(
      jnp.asarray(logits, jnp.float32), jnp.asarray(history, jnp.int32), jnp.asarray(mask), penalty)
  ref = _ref_repetition_penalty(logits, history, mask, penalty)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-6)


def test_repetition_penalty_lowers_probability_of_negative_logit_token():
  logits = np.array([[2.0, -1.0, 0.5, -3.0, 1.0]])
  history = np.array([[1, 1, 3]])  # two tokens with negative logits, one repeated
  before = _softmax(logits)[0]
  after_logits = np.asarray(_penalty(jnp.asarray(logits), jnp.asarray(history), None, 1.5))
  np.testing.assert_allclose(after_logits[0], [2.0, -1.5, 0.5, -4.5, 1.0], rtol=1e-6)
  after = _softmax(after_logits)[0]
  assert after[1] < before[1] and after[3] < before[3]
  assert all(after[i] > before[i] for i in (0, 2, 4))


def test_repetition_penalty_one_is_noop_and_accepts_bf16():
  logits = _logits(2, 3, 16)
  history = np.random.default_rng(3).integers(0, 16, size=(3, 5))
  got = sampling.apply_repetition_penalty(jnp.asarray(logits, jnp.float32), jnp.asarray(history), None, 1.0)
  np.testing.assert_array_equal(np.asarray(got), logits.astype(np.float32))
  got16 = sampling.apply_repetition_penalty(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(history), None, 2.0)
  assert got16.dtype == jnp.float32 and got16.shape == (3, 16)


# ------------------------------------------------------------------ temperature, top-k, top-p


def test_apply_temperature():
  logits = _logits(4, 2, 10)
  np.testing.assert_allclose(np.asarray(sampling.apply_temperature(jnp.asarray(logits), 0.5)), logits * 2, rtol=1e-6)
  # Temperature 0 leaves logits untouched (the sampler turns it into an argmax); per-row temperatures broadcast.
  got = np.asarray(sampling.apply_temperature(jnp.asarray(logits), jnp.array([0.0, 2.0])))
  np.testing.assert_allclose(got, np.stack([logits[0], logits[1] / 2]), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 5, 31])
def test_top_k_matches_reference(k):
  logits = _logits(5, 4, 32)
  got = np.asarray(sampling.top_k_filter(jnp.asarray(logits, jnp.float32), k))
  assert (np.isfinite(got).sum(axis=-1) == k).all()
  np.testing.assert_allclose(got, _ref_top_k(logits, k), rtol=1e-6)
  # The same result with k traced under jit.
  got_jit = np.asarray(jax.jit(sampling.top_k_filter)(jnp.asarray(logits, jnp.float32), jnp.int32(k)))
  np.testing.assert_array_equal(got_jit, got)


@pytest.mark.parametrize("k", [0, -1, 32, 100])
def test_top_k_noop(k):
  logits = _logits(6, 3, 32).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(sampling.top_k_filter(jnp.asarray(logits), k)), logits)


def test_top_k_keeps_ties():
  logits = jnp.array([[1.0, 3.0, 2.0, 2.0, 0.0]])
  got = np.asarray(sampling.top_k_filter(logits, 2))
  np.testing.assert_array_equal(got, [[-np.inf, 3.0, 2.0, 2.0, -np.inf]])


@pytest.mark.parametrize("p", [1e-6, 0.05, 0.3, 0.5, 0.8, 0.95, 0.999, 1.0])
def test_top_p_matches_reference(p):
  logits = _logits(7, 6, 24, scale=1.5)
  # The test is well defined only if no cumulative mass sits within float32 noise of p.
  cum = np.cumsum(np.sort(_softmax(logits), axis=-1)[:, ::-1], axis=-1)
  if p < 1:
    assert np.min(np.abs(cum - p)) > 1e-5
  got = np.asarray(sampling.top_p_filter(jnp.asarray(logits, jnp.float32), p))
  ref = _ref_top_p(logits, p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  if p == 1e-6:  # only the argmax survives
    assert (np.isfinite(got).sum(-1) == 1).all()
    assert (np.argmax(got, -1) == np.argmax(logits, -1)).all()
  if p == 1.0:
    np.testing.assert_array_equal(got, logits.astype(np.float32))


def test_top_p_traced_and_per_row():
  logits = _logits(8, 3, 24, scale=1.5)
  ps = np.array([0.05, 0.5, 1.0])
  got = np.asarray(jax.jit(sampling.top_p_filter)(jnp.asarray(logits, jnp.float32), jnp.asarray(ps, jnp.float32)))
  for b, p in enumerate(ps):
    np.testing.assert_allclose(got[b:b + 1], _ref_top_p(logits[b:b + 1], p), rtol=1e-6)


def test_top_p_after_top_k_handles_neg_inf():
  logits = _logits(9, 2, 16)
  got = np.asarray(sampling.top_p_filter(sampling.top_k_filter(jnp.asarray(logits, jnp.float32), 4), 0.9))
  ref = _ref_top_p(_ref_top_k(logits, 4), 0.9)
  np.testing.assert_allclose(got, ref, rtol=1e-6)


# ------------------------------------------------------------------ sampler


def test_greedy_is_argmax_of_penalised_logits():
  logits = _logits(10, 5, 20)
  history = np.argmax(logits, axis=-1)[:, None]  # penalise the current argmax hard
  for seed in range(3):
    got = _sample(jax.random.key(seed), jnp.asarray(logits), temperature=0.0, top_k=3, top_p=0.5)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.argmax(logits, -1))
  got = _sample(jax.random.key(0), jnp.asarray(logits), temperature=0.0, top_k=0, top_p=1.0,
                repetition_penalty=100.0, token_history=jnp.asarray(history))
  ref = np.argmax(_ref_repetition_penalty(logits, history, np.ones_like(history, bool), 100.0), -1)
  np.testing.assert_array_equal(np.asarray(got), ref)
  assert (ref != np.argmax(logits, -1)).any()


_N_DRAWS = 20000
# chi-square with 7 degrees of freedom: P(X > 29.9) ~ 1e-4; the seeds are fixed, so this cannot flake.
_CHI2_LIMIT = 29.9


def _draw(logits: np.ndarray, **knobs) -> np.ndarray:
  """Token counts of _N_DRAWS independent draws from a single row of logits."""
  keys = jax.random.split(jax.random.key(123), _N_DRAWS)
  row = jnp.asarray(logits[None], jnp.float32)
  draw = jax.jit(jax.vmap(lambda k: sampling.sample_next_token(k, row, **knobs)[0]))
  tokens = np.asarray(draw(keys))
  return np.bincount(tokens, minlength=logits.shape[-1])


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.5])
def test_sampling_frequencies_match_softmax(temperature):
  logits = _logits(11, 1, 8, scale=1.0)[0]
  counts = _draw(logits, temperature=temperature)
  assert _chi_square(counts, _softmax(logits / temperature)) < _CHI2_LIMIT


def test_filtered_tokens_are_never_sampled_and_rest_renormalised():
  logits = _logits(12, 1, 8, scale=1.0)[0]
  temperature, k, p = 1.3, 5, 0.8
  allowed = _ref_top_p(_ref_top_k(logits[None] / temperature, k), p)[0]
  probs = _softmax(allowed)
  assert 1 < (probs > 0).sum() < k  # both filters actually bite
  counts = _draw(logits, temperature=temperature, top_k=k, top_p=p)
  assert counts[probs == 0].sum() == 0
  assert _chi_square(counts, probs) < _CHI2_LIMIT


def test_jitted_sampler_compiles_once_for_all_settings():
  traces = []

  @jax.jit
  def step(key, logits, temperature, top_k, top_p, penalty, history, mask):
    traces.append(1)  # Python side effect: runs only while tracing
    return sampling.sample_next_token(key, logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                      repetition_penalty=penalty, token_history=history, history_mask=mask)

  logits = jnp.asarray(_logits(13, 4, 16), jnp.float32)
  history = jnp.asarray(np.random.default_rng(14).integers(0, 16, size=(4, 6)), jnp.int32)
  mask = jnp.ones((4, 6), bool)
  settings = [(0.0, 0, 1.0, 1.0), (1.0, 5, 0.9, 1.2), (0.5, 1, 0.3, 2.0), (2.0, 0, 1e-6, 1.0), (0.0, 3, 0.5, 1.5)]
  for i, (t, k, p, r) in enumerate(settings):
    out = step(jax.random.key(i), logits, jnp.float32(t), jnp.int32(k), jnp.float32(p), jnp.float32(r), history,
               mask)
    ref = _sample(jax.random.key(i), logits, temperature=t, top_k=k, top_p=p, repetition_penalty=r,
                  token_history=history, history_mask=mask)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    if k == 1 or p == 1e-6 or t == 0.0:  # deterministic settings pick the argmax of the penalised logits
      pen = _ref_repetition_penalty(np.asarray(logits), np.asarray(history), np.asarray(mask), r)
      np.testing.assert_array_equal(np.asarray(out), np.argmax(pen, -1))
  assert len(traces) == 1


def test_per_row_temperature_mixes_greedy_and_sampling():
  logits = jnp.asarray(np.tile(_logits(15, 1, 8, scale=0.1), (2, 1)), jnp.float32)  # nearly flat
  temps = jnp.array([0.0, 1.0])
  outs = np.stack([np.asarray(_sample(jax.random.key(s), logits, temperature=temps))
                   for s in range(30)])
  assert (outs[:, 0] == int(np.argmax(np.asarray(logits)[0]))).all()
  assert len(set(outs[:, 1].tolist())) > 1
