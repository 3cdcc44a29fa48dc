"""Autoregressive generation with the decode cache: one jitted prefill, one jitted single-token step.

The step takes the cache (donated, so it is updated in place), the token history for the repetition penalty and
the sampling knobs as traced scalars, so it compiles once per (batch, cache length) and never per token or per
setting. The Python loop around it only moves one token per row to the host, to stream text and stop at EOS.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from superlm_jax.config import RANGES, check_range
from superlm_jax.errors import UserError
from superlm_jax.generate import speculative
from superlm_jax.generate.sampling import sample_next_token
from superlm_jax.kernels.mla_decode import DECODE_IMPLS
from superlm_jax.layers.cache import write_at
from superlm_jax.models.options import RuntimeOptions
from superlm_jax.models.transformer import for_inference


_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """The sampling knobs, each checked against config.RANGES["sample.<name>"] when made (whatever the source: the
  sample CLI's flags, a config, a caller), so a bad value is one line naming it before anything is loaded or run."""
  max_new_tokens: int = 100
  temperature: float = 0.8  # 0 = greedy.
  top_k: int = 0  # 0 = off.
  top_p: float = 1.0  # 1 = off.
  min_p: float = 0.0  # 0 = off.
  repetition_penalty: float = 1.0  # 1 = off.
  seed: int = 0

  def __post_init__(self):
    for field in dataclasses.fields(self):
      dotted = f"sample.{field.name}"
      check_range(dotted, getattr(self, field.name), RANGES[dotted])

  @classmethod
  def from_config(cls, sample_cfg, **overrides) -> "SamplingParams":
    """The knobs of a `config.sample` section; `overrides` (None values ignored, so unset flags can be passed
    through) win over the section's values."""
    values = {field.name: sample_cfg[field.name] for field in dataclasses.fields(cls)}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)

  def knobs(self) -> dict:
    # Clipped into what int32/float32 hold: any top_k >= vocab is "off" and a temperature beyond float32 is the
    # same flat distribution, so in-range values that do not fit the dtypes behave as they mean.
    clip = lambda x: min(float(x), _FLOAT32_MAX)
    return {"temperature": jnp.float32(clip(self.temperature)), "top_k": jnp.int32(min(int(self.top_k), _INT32_MAX)),
            "top_p": jnp.float32(self.top_p), "min_p": jnp.float32(self.min_p),
            "repetition_penalty": jnp.float32(clip(self.repetition_penalty))}

  def key(self) -> jax.Array:
    """The PRNG key of `seed` (folded into the 63 bits jax.random.key takes; smaller seeds are unchanged)."""
    return jax.random.key(int(self.seed) % 2**63)


def _logprob(logits: jax.Array, token: jax.Array) -> jax.Array:
  """[batch] log-probability of `token` under the model's own distribution (its logits before any sampling knob),
  as `transformers`' `output_logits` gives it and OpenAI-style APIs report."""
  # The chosen logit minus the log-partition: no [batch, vocab] log-softmax array in the decode step.
  return jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)


@dataclasses.dataclass(frozen=True)
class GeneratedRow:
  """One row's continuation. `finish_reason`: "eos" (an EOS id ended it; that id is not in `ids`), "stop" (its
  text came to contain a stop string; the token that completed it is the last of `ids`) or "length"
  (max_new_tokens, or the model context, ran out)."""
  ids: list[int]
  logprobs: list[float]  # per id: log p under the model (see _logprob)
  finish_reason: str


class StopStrings:
  """Host-side stop strings: a row stops at the first token after which its generated text contains one of them
  (as vLLM's `stop` and lm-evaluation-harness's `until` do; a string is found also when it spans tokens).
  transformers' `stop_strings` stops only when the text ends with one, so where a token carries text past the stop
  string, `transformers` goes on and this stops; where the text ends with it, both stop at the same token."""

  def __init__(self, strings: Sequence[str], decode: Callable[[Sequence[int]], str] | None):
    self.strings = self.check(strings)
    if self.strings and decode is None:
      raise ValueError("stop strings need `decode` (the tokenizer's decode) to see the generated text")
    self.decode = decode

  @staticmethod
  def check(strings: Sequence[str]) -> tuple[str, ...]:
    """`strings` as a tuple, or a one-line UserError if one is empty (it would stop every row at once)."""
    if isinstance(strings, str):
      strings = (strings,)
    if any(not isinstance(s, str) or not s for s in strings):
      raise UserError(f"stop strings must be non-empty text; got {list(strings)!r}")
    return tuple(strings)

  def hit(self, ids: Sequence[int]) -> bool:
    """Whether a row's generated `ids` (checked after each new token) contain a stop string in their text. The
    whole text is searched, not only its new end: decoding a byte-level token can rewrite the characters before it
    (U+FFFD placeholders of a split UTF-8 character become the character), so the text is not append-only."""
    if not self.strings:
      return False
    text = self.decode(ids)
    return any(s in text for s in self.strings)


def _eos_set(eos_ids: int | Sequence[int] | None) -> np.ndarray:
  if eos_ids is None:
    return np.zeros((0,), np.int64)
  return np.asarray([eos_ids] if isinstance(eos_ids, (int, np.integer)) else list(eos_ids), np.int64)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Generator:
  """Generates continuations of token-id prompts with a `Transformer` (the `model(tokens, cache=...)` contract).

  The generator owns what it runs: its own graph definition of the model under the decode options (the model it is
  given is not modified) and the weights it was given. `generate(..., weights=(params, model_state))` samples with
  other weights of the same model (the trainer's current ones) without rebuilding anything.
  """

  def __init__(self, model: nnx.Module, *, absorb: bool = True, cache_dtype=None, decode_impl: str = "auto",
               draft_tokens: int = 0):
    """`absorb`: MLA decode steps attend in latent space (DeepSeek-V2's absorbed form); False = expanded form.
    `decode_impl`: how those absorbed steps run, "xla" (einsums), "pallas" (the fused kernel of
    kernels/mla_decode.py) or "auto" (pallas where it compiles natively, see `resolve_decode_impl`). No effect on
    other attention kinds. `draft_tokens` > 0: self-speculative decoding, the model's first `draft_tokens` MTP
    modules drafting and one main-model pass verifying them (generate/speculative.py); the output is plain
    decoding's (greedy: the same tokens; sampling: the same distribution), and `last_stats` tells what it bought."""
    if decode_impl not in DECODE_IMPLS:
      raise UserError(f"decode.impl={decode_impl!r} is not one of {DECODE_IMPLS}")
    check_draft_tokens(draft_tokens, model.spec.mtp_depth)
    self.draft_tokens = int(draft_tokens)
    self.last_stats: speculative.SpeculativeStats | None = None
    model = for_inference(model, RuntimeOptions(mla_form="auto" if absorb else "expanded", decode_impl=decode_impl))
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    self.max_seq_len = int(model.spec.max_seq_len)
    self.vocab_size = int(model.spec.vocab_size)
    self._init_cache = model.init_cache
    self.cache_dtype = cache_dtype
    self._prefill = jax.jit(self._prefill_fn, donate_argnames=("cache",))
    self._step = jax.jit(self._step_fn, donate_argnames=("cache", "history"))
    self._spec_prefill = jax.jit(self._spec_prefill_fn, donate_argnames=("cache", "state"))
    self._draft = jax.jit(self._draft_fn, donate_argnames=("state",))
    self._verify = jax.jit(self._verify_fn, donate_argnames=("cache", "state"))

  # ------------------------------------------------------------------ jitted pieces
  def _model(self, params, rest):
    return nnx.merge(self.graphdef, params, rest)

  def _prefill_fn(self, params, rest, tokens, prompt_lens, cache, history, key, knobs):
    token, logprob, cache, _ = self._prefill_model(self._model(params, rest), tokens, prompt_lens, cache, history,
                                                   key, knobs)
    return token, logprob, cache

  @staticmethod
  def _prefill_model(model, tokens, prompt_lens, cache, history, key, knobs):
    hidden, cache = model.hidden(tokens, cache=cache)
    cache = cache.with_lengths(prompt_lens)  # Right padding: slots past each prompt are overwritten later.
    # The head only where the next token is sampled: [batch, embed] @ [embed, vocab], not every prompt position.
    last_hidden = jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
    last = (last_hidden @ model.output_head()).astype(jnp.float32)
    mask = jnp.arange(history.shape[1])[None, :] < prompt_lens[:, None]
    token = sample_next_token(key, last, token_history=history, history_mask=mask, **knobs)
    return token, _logprob(last, token), cache, hidden

  def _spec_prefill_fn(self, params, rest, tokens, prompt_lens, cache, state, key, knobs):
    model = self._model(params, rest)
    token, logprob, cache, hidden = self._prefill_model(model, tokens, prompt_lens, cache, state.tokens, key, knobs)
    return token, logprob, cache, speculative.prefill_drafts(model, state, hidden, token, prompt_lens)

  def _draft_fn(self, params, rest, state, lengths, key, knobs):
    return speculative.draft(self._model(params, rest), state, lengths, key, knobs)

  def _verify_fn(self, params, rest, cache, state, drafts, draft_dists, alive, key, knobs):
    return speculative.verify(self._model(params, rest), cache, state, drafts, draft_dists, alive, key, knobs)

  def _step_fn(self, params, rest, token, cache, history, key, knobs):
    history = write_at(history, token[:, None], cache.lengths)
    mask = jnp.arange(history.shape[1])[None, :] <= cache.lengths[:, None]
    logits, cache = self._model(params, rest)(token[:, None], cache=cache)
    next_token = sample_next_token(key, logits[:, 0], token_history=history, history_mask=mask, **knobs)
    return next_token, _logprob(logits[:, 0], next_token), cache, history

  # ------------------------------------------------------------------ the loop
  def check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
    """A one-line UserError unless every prompt is non-empty, holds ids of the vocabulary and leaves room for a new
    token in the context. An empty prompt is an error rather than a start from a made-up token (no BOS is used in
    training; documents are separated by EOS), so a continuation is always conditioned on what the caller gave."""
    if not prompts or any(len(p) == 0 for p in prompts):
      raise UserError("every prompt needs at least one token")
    for p in prompts:
      bad = [int(t) for t in p if not 0 <= int(t) < self.vocab_size]
      if bad:
        raise UserError(f"prompt token id {bad[0]} is outside the model vocabulary [0, {self.vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest >= self.max_seq_len:
      raise UserError(f"prompt of {longest} tokens does not fit the model context of {self.max_seq_len} tokens "
                      "(it needs room for at least one new token)")

  def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
               eos_ids: int | Sequence[int] | None = None, stop_strings: Sequence[str] = (),
               decode: Callable[[Sequence[int]], str] | None = None,
               on_tokens: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
               weights: tuple | None = None) -> list[list[int]]:
    """The generated ids of each prompt: `generate_rows(...)`'s ids."""
    return [row.ids for row in self.generate_rows(prompts, params, eos_ids=eos_ids, stop_strings=stop_strings,
                                                  decode=decode, on_tokens=on_tokens, weights=weights)]

  def generate_rows(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                    eos_ids: int | Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                    decode: Callable[[Sequence[int]], str] | None = None,
                    on_tokens: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
                    weights: tuple | None = None) -> list[GeneratedRow]:
    """Continues every prompt until one of `eos_ids` (an id or several: chat models end turns with more than one),
    a stop string in the decoded text (`decode`: the tokenizer's decode), `max_new_tokens` or the context ends it.
    `on_tokens(step, tokens, alive)` is called with each new token per row as it is produced (for streaming; a row
    that ended is not alive, and the token that ended it by EOS is not part of its output). `weights`:
    (params, model_state) of the same model to sample with instead of the generator's own."""
    weights = weights if weights is not None else (self.params, self.rest)
    stops = StopStrings(stop_strings, decode)
    self.check_prompts(prompts)
    longest = max(len(p) for p in prompts)
    max_new = min(params.max_new_tokens, self.max_seq_len - longest)
    rows = _Rows(len(prompts), _eos_set(eos_ids), stops, max_new, on_tokens)
    # Shapes are bucketed so that prompts of similar length reuse one compiled prefill and step.
    prompt_pad = min(_round_up(longest, 16), self.max_seq_len)
    tokens = np.zeros((len(prompts), prompt_pad), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    prompt_lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
    if self.draft_tokens:
      self._generate_speculative(rows, weights, tokens, prompt_lens, prompt_pad, max_new, params)
    else:
      self._generate_plain(rows, weights, tokens, prompt_lens, prompt_pad, max_new, params)
    return rows.result()

  def _generate_plain(self, rows, weights, tokens, prompt_lens, prompt_pad, max_new, params):
    cache_len = min(_round_up(prompt_pad + max_new, 64), self.max_seq_len)
    batch = tokens.shape[0]
    history = jnp.zeros((batch, cache_len), jnp.int32).at[:, :prompt_pad].set(tokens)
    cache = self._init_cache(batch, cache_len, self.cache_dtype)
    knobs = params.knobs()
    keys = jax.random.split(params.key(), max_new)
    token, logprob, cache = self._prefill(*weights, jnp.asarray(tokens), prompt_lens, cache, history, keys[0], knobs)
    for step in range(max_new):
      rows.offer(np.asarray(token), np.asarray(logprob), rows.alive.copy())
      if not rows.alive.any():
        break
      token, logprob, cache, history = self._step(*weights, token, cache, history, keys[step + 1], knobs)

  def _generate_speculative(self, rows, weights, tokens, prompt_lens, prompt_pad, max_new, params):
    n = self.draft_tokens
    # A verify pass writes n + 1 slots from the row's length, which can pass the last committed position by n: the
    # cache has those slots beyond the context (never committed; see speculative._model_positions).
    cache_len = min(_round_up(prompt_pad + max_new + n, 64), self.max_seq_len + n)
    batch = tokens.shape[0]
    model = self._model(*weights)
    cache = self._init_cache(batch, cache_len, self.cache_dtype)
    state = speculative.init_draft_state(model, n, jnp.asarray(tokens), cache_len, self.cache_dtype)
    knobs = params.knobs()
    key, prefill_key = jax.random.split(params.key())
    token, logprob, cache, state = self._spec_prefill(*weights, jnp.asarray(tokens), prompt_lens, cache, state,
                                                      prefill_key, knobs)
    rows.offer(np.asarray(token), np.asarray(logprob), rows.alive.copy())
    stats = speculative.SpeculativeStats(steps=0, accepted=[0] * n)
    while rows.alive.any():
      key, draft_key, verify_key = jax.random.split(key, 3)
      drafts, draft_dists, state = self._draft(*weights, state, cache.lengths, draft_key, knobs)
      alive = rows.alive.copy()
      new, logprobs, counts, cache, state = self._verify(*weights, cache, state, drafts, draft_dists,
                                                         jnp.asarray(alive), verify_key, knobs)
      new, logprobs, counts = np.asarray(new), np.asarray(logprobs), np.asarray(counts)
      stats.steps += int(alive.sum())
      for j in range(n):
        stats.accepted[j] += int(np.sum(alive & (counts > j + 1)))
      for j in range(int(counts[alive].max())):
        rows.offer(new[:, j], logprobs[:, j], rows.alive & (counts > j))
    self.last_stats = stats


def check_draft_tokens(draft_tokens: int, mtp_depth: int) -> None:
  """A one-line UserError unless `draft_tokens` MTP modules exist to draft with."""
  if not isinstance(draft_tokens, (int, np.integer)) or draft_tokens < 0:
    raise UserError(f"decode.draft_tokens must be an integer >= 0, got {draft_tokens!r}")
  if draft_tokens > mtp_depth:
    raise UserError(
        f"speculative decoding with {draft_tokens} draft token(s) needs as many multi-token-prediction modules; "
        f"this model has model.mtp_depth={mtp_depth}" + (" (train it with --config.model.mtp_depth=1 or more)"
                                                           if mtp_depth == 0 else ""))


class _Rows:
  """The host side of generation: each row's ids and log-probs, and why it ended (EOS, a stop string,
  `max_new` tokens), fed one token per row at a time."""

  def __init__(self, batch: int, eos: np.ndarray, stops: StopStrings, max_new: int, on_tokens):
    self.ids: list[list[int]] = [[] for _ in range(batch)]
    self.logprobs: list[list[float]] = [[] for _ in range(batch)]
    self.finish = ["length"] * batch
    self.alive = np.ones(batch, bool)
    self.eos, self.stops, self.max_new, self.on_tokens = eos, stops, max_new, on_tokens
    self.calls = 0

  def offer(self, tokens: np.ndarray, logprobs: np.ndarray, offered: np.ndarray) -> None:
    """The next token of each `offered` row (a live row; the others' entries are ignored)."""
    offered = offered & self.alive
    ended_by_eos = offered & np.isin(tokens, self.eos)
    for i in np.flatnonzero(ended_by_eos):
      self.finish[i] = "eos"
    self.alive &= ~ended_by_eos
    emitted = offered & ~ended_by_eos
    for i in np.flatnonzero(emitted):
      self.ids[i].append(int(tokens[i]))
      self.logprobs[i].append(float(logprobs[i]))
      if self.stops.hit(self.ids[i]):
        self.finish[i] = "stop"
        self.alive[i] = False
      elif len(self.ids[i]) >= self.max_new:
        self.alive[i] = False
    if self.on_tokens is not None:
      self.on_tokens(self.calls, tokens, emitted)
    self.calls += 1

  def result(self) -> list[GeneratedRow]:
    return [GeneratedRow(i, l, f) for i, l, f in zip(self.ids, self.logprobs, self.finish)]
