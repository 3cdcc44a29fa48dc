"""Property: whatever the prompt text (empty, unicode, control characters, longer than the context) and whatever the
sampling settings (negative, NaN, infinite, huge, of the wrong type), sampling gives valid text or one clear
UserError, never another exception or a hang. The path is the sample CLI's: settings, encode, check, generate."""

import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from superlm_jax.config import RANGES
from superlm_jax.errors import UserError
from superlm_jax.generate.decode import Generator, SamplingParams
from superlm_jax.models.transformer import build_model
from tests.conftest import numpy_init, tiny_model_config

VOCAB, CONTEXT = 300, 32
SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
  """A random 300-piece byte-fallback tokenizer and a tiny random model of 32 positions, built once."""
  from superlm_jax.data.tokenizer import train_tokenizer
  words = "the and of to thou thee my lord king queen love night day sweet death heart fair".split()
  docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + "." for i in range(200)]
  tokenizer = train_tokenizer(docs, VOCAB, tmp_path_factory.mktemp("tok") / "tokenizer.model", 1_000_000)
  model = numpy_init(lambda: build_model(tiny_model_config(vocab_size=VOCAB, max_seq_len=CONTEXT)), seed=0, std=0.5)
  return tokenizer, Generator(model)


def sample(tokenizer, generator, text, knobs):
  params = SamplingParams(**knobs)
  ids = tokenizer.encode(text)
  generator.check_prompts([ids])
  out = generator.generate([ids], params, eos_ids=tokenizer.eos_ids)[0]
  return ids, params, out, tokenizer.decode(out)


# Any value at all, in range or not, of any type.
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70),
                    st.sampled_from([0, 1, -1, 0.5, -0.0, 1e-45, 1e300]), st.none(), st.text(max_size=3),
                    st.booleans())
# In-range values, edges included (the dtypes' limits too: huge top_k/seed, tiny or infinite floats).
in_range = {
    "max_new_tokens": st.one_of(st.integers(1, 40), st.sampled_from([2**31, 2**70])),
    "temperature": st.one_of(st.floats(0, 3), st.sampled_from([0, 1e-45, 1e300, math.inf])),
    "top_k": st.one_of(st.integers(0, 400), st.sampled_from([2**31, 2**70])),
    "top_p": st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from([1, 1e-300])),
    "repetition_penalty": st.one_of(st.floats(0, 4, exclude_min=True), st.sampled_from([1, 1e-300, 1e300])),
    "seed": st.one_of(st.integers(0, 100), st.sampled_from([2**32, 2**63, 2**80])),
}
texts = st.one_of(st.text(max_size=40), st.text(st.characters(max_codepoint=0x1f), max_size=10),
                  st.sampled_from(["", "\x00", "ROMEO.", "日本語 🎭", "the " * 40, "\n\t\r"]))


@st.composite
def knob_sets(draw):
  """In-range settings (some left at their defaults), one of them replaced by anything half of the time."""
  knobs = draw(st.fixed_dictionaries({}, optional=in_range))
  if draw(st.booleans()):
    knobs[draw(st.sampled_from(SETTINGS))] = draw(numbers)
  return knobs


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(text=texts, knobs=knob_sets())
def test_valid_text_or_one_clear_error(sampler, text, knobs):
  tokenizer, generator = sampler
  try:
    ids, params, out, decoded = sample(tokenizer, generator, text, knobs)
  except UserError as e:
    event("refused")
    message = str(e)
    assert message and "\n" not in message
    # The error names what was wrong: a setting (its key and value), an empty prompt or one that does not fit.
    assert (any(f"sample.{k}={knobs[k]!r}" in message for k in knobs) or "at least one token" in message
            or f"model context of {CONTEXT}" in message), message
    return
  event("generated")
  assert isinstance(decoded, str)
  assert 1 <= len(out) <= min(params.max_new_tokens, CONTEXT - len(ids))
  assert all(0 <= t < VOCAB for t in out)
  for k, v in knobs.items():  # Only in-range settings are accepted.
    assert v in RANGES[f"sample.{k}"], (k, v)


@pytest.mark.parametrize("key,value", [("temperature", -0.1), ("temperature", math.nan), ("top_p", 0.0),
                                       ("top_p", 1.5), ("top_k", -1), ("repetition_penalty", 0.0),
                                       ("max_new_tokens", 0), ("seed", -1), ("top_k", 2.5), ("temperature", "hot")])
def test_out_of_range_setting_names_key_value_and_range(key, value):
  with pytest.raises(UserError, match=rf"^sample\.{key}=.* is out of range: must be (an integer|a number) "):
    SamplingParams(**{key: value})


def test_from_config_takes_every_knob_and_overrides_win():
  from superlm_jax.config import base_config
  s = base_config().sample
  s.update(temperature=0.3, top_k=7, top_p=0.5, repetition_penalty=1.2, max_new_tokens=5, seed=9)
  assert SamplingParams.from_config(s, top_k=None, seed=4) == SamplingParams(
      max_new_tokens=5, temperature=0.3, top_k=7, top_p=0.5, repetition_penalty=1.2, seed=4)
  s.top_p = 2.0
  with pytest.raises(UserError, match=r"sample\.top_p=2\.0"):
    SamplingParams.from_config(s)


def test_prompt_ids_outside_the_vocabulary_are_refused(sampler):
  _, generator = sampler
  for bad in (-1, VOCAB):
    with pytest.raises(UserError, match=rf"token id {bad} is outside the model vocabulary \[0, {VOCAB}\)"):
      generator.generate([[1, 2, bad]], SamplingParams(max_new_tokens=2))


def test_sample_cli_checks_its_flags_before_loading_the_checkpoint(tmp_path):
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo)
  result = subprocess.run([sys.executable, "-m", "superlm_jax.sample", f"--checkpoint={tmp_path / 'no_such_run'}",
                           "--top_p=1.5"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: sample.top_p=1.5 is out of range: must be a number in (0, 1]")
