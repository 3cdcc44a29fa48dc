"""The cached decode loop against a naive recompute-everything loop, EOS handling and compile counts."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from superlm_jax.errors import UserError
from superlm_jax.generate.decode import Generator, SamplingParams
from superlm_jax.models.transformer import build_model
from tests.conftest import tiny_model_config


def naive_greedy(model, prompt, n):
  """Greedy decoding by recomputing the full forward pass for every new token (no cache). The sequence sits in a
  fixed-size zero-padded buffer so one compiled forward serves every length (padding after position t cannot
  change logits at t: causality is tested separately)."""
  forward = nnx.jit(lambda m, t: m(t))
  buffer = np.zeros((1, len(prompt) + n), np.int32)
  buffer[0, :len(prompt)] = prompt
  for t in range(len(prompt), len(prompt) + n):
    logits = forward(model, jnp.asarray(buffer))
    buffer[0, t] = int(jnp.argmax(logits[0, t - 1]))
  return buffer[0, len(prompt):].tolist()


@pytest.mark.parametrize("overrides", [dict(), dict(norm="rmsnorm", positions="rope", mlp="swiglu",
                                                     use_bias=False, num_kv_heads=2, scoring="ssmax")])
def test_greedy_generation_matches_recompute_for_ragged_batch(overrides):
  model = build_model(tiny_model_config(**overrides), seed=4)
  prompts = [[5, 17, 3, 42, 8, 1, 60], [9, 2], [33, 44, 55, 66]]
  generator = Generator(model)
  got = generator.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
  for prompt, out in zip(prompts, got):
    assert out == naive_greedy(model, prompt, 12)


def test_decode_step_compiles_once_for_any_settings_and_length():
  generator = Generator(build_model(tiny_model_config(), seed=0))
  settings = [SamplingParams(max_new_tokens=9, temperature=0.0),
              SamplingParams(max_new_tokens=9, temperature=0.9, top_k=5, top_p=0.8, repetition_penalty=1.3, seed=3),
              SamplingParams(max_new_tokens=9, temperature=1.5, seed=7)]
  for params in settings:
    generator.generate([[1, 2, 3, 4]], params)
  assert generator._step._cache_size() == 1  # pylint: disable=protected-access
  assert generator._prefill._cache_size() == 1  # pylint: disable=protected-access


def test_stops_at_eos_and_excludes_it():
  model = build_model(tiny_model_config(), seed=4)
  prompt = [5, 17, 3, 42]
  reference = naive_greedy(model, prompt, 10)
  eos = reference[3]
  out = Generator(model).generate([prompt], SamplingParams(max_new_tokens=10, temperature=0.0), eos_ids=eos)[0]
  assert out == reference[:reference.index(eos)]


def test_same_seed_same_text_different_seed_different_text():
  generator = Generator(build_model(tiny_model_config(), seed=1))
  run = lambda seed: generator.generate([[1, 2, 3]], SamplingParams(max_new_tokens=20, temperature=1.0, seed=seed))
  assert run(0) == run(0)
  assert run(0) != run(1)


def test_prompt_that_fills_the_context_is_refused():
  generator = Generator(build_model(tiny_model_config(max_seq_len=16), seed=0))
  with pytest.raises(UserError, match="does not fit the model context of 16"):
    generator.generate([list(range(1, 17))], SamplingParams())
  # One token of room: exactly one new token.
  assert len(generator.generate([list(range(1, 16))], SamplingParams(max_new_tokens=5))[0]) == 1


def test_stop_strings_are_found_across_tokens_and_split_characters():
  """A byte-level tokenizer (one token per UTF-8 byte) decodes a character split over two tokens as U+FFFD until
  its second byte arrives, rewriting text already seen: the stop string "é!" is found at the "!" token only."""
  from superlm_jax.generate.decode import StopStrings
  decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")
  ids = list("ab".encode()) + list("é".encode()) + list("!c".encode())  # a b 0xC3 0xA9 ! c
  stops = StopStrings(["é!", "zz"], decode)
  hits = [stops.hit(ids[:n]) for n in range(1, len(ids) + 1)]
  assert hits == [False, False, False, False, True, True]
  assert not StopStrings([], None).hit(ids)
  with pytest.raises(UserError, match="non-empty"):
    StopStrings(["ok", ""], decode)
