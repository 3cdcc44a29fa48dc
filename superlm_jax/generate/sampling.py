"""Pure, jit-friendly next-token sampling from logits.

Every function takes logits of shape ``[batch, vocab]`` in any float dtype, computes in float32 and returns float32
logits (or int32 token ids for :func:`sample_next_token`). Shapes are static and no function branches in Python on a
traced value, so the knobs (``temperature``, ``top_k``, ``top_p``, ``penalty``) may be Python numbers, traced scalars,
or per-row arrays of shape ``[batch]``; one compiled decode step therefore serves every setting.

Methods:
  * repetition penalty -- CTRL, Keskar et al. 2019, "CTRL: A Conditional Transformer Language Model for
    Controllable Generation", section 4.1 (with the sign fix used by Hugging Face: negative logits are multiplied,
    so a penalised token always becomes less likely);
  * temperature -- Ackley, Hinton & Sejnowski 1985 (Boltzmann sampling), as used for LM decoding;
  * top-k -- Fan, Lewis & Dauphin 2018, "Hierarchical Neural Story Generation";
  * top-p / nucleus -- Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration";
  * min-p -- Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling for Creative and Coherent LLM Outputs".
The order (penalty, temperature, top-k, top-p, min-p) is Hugging Face `generate`'s, so a converted model samples
from the same distribution under the same settings.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

Scalar = Union[float, int, jax.Array]

_NEG_INF = -jnp.inf


def _per_row(x: Scalar, dtype: jnp.dtype) -> jax.Array:
  """A scalar or ``[batch]`` knob as an array of shape ``[1, 1]`` / ``[batch, 1]`` (broadcasts over the vocab)."""
  x = jnp.asarray(x, dtype)
  return x.reshape(-1, 1) if x.ndim == 1 else x.reshape(1, 1)


def apply_repetition_penalty(
    logits: jax.Array,
    token_history: jax.Array,
    history_mask: Optional[jax.Array],
    penalty: Scalar,
) -> jax.Array:
  """CTRL repetition penalty (Keskar et al. 2019) over the tokens seen so far.

  For every token id that occurs at a real (``history_mask``) position of ``token_history``, a positive logit is
  divided by ``penalty`` and a negative logit is multiplied by it, so with ``penalty > 1`` the token always becomes
  less likely (dividing a negative logit, as the original formula does, would raise its probability). Each distinct
  token is penalised once however often it occurred. ``penalty == 1`` is an exact no-op.

  Args:
    logits: ``[batch, vocab]``, any float dtype.
    token_history: int ``[batch, T]`` token ids (prompt and generated so far). Entries where ``history_mask`` is
      False are ignored and may hold anything (padding, -1, out-of-range ids).
    history_mask: bool ``[batch, T]``, True where ``token_history`` is real; None means all real.
    penalty: scalar or ``[batch]``; typically >= 1.

  Returns:
    float32 ``[batch, vocab]`` penalised logits.
  """
  logits = jnp.asarray(logits, jnp.float32)
  batch, vocab = logits.shape
  token_history = jnp.asarray(token_history, jnp.int32)
  if history_mask is None:
    history_mask = jnp.ones(token_history.shape, bool)
  history_mask = jnp.asarray(history_mask, bool)
  # Masked-out entries are sent to index `vocab`, which the scatter drops (also guards against junk ids).
  valid = history_mask & (token_history >= 0) & (token_history < vocab)
  idx = jnp.where(valid, token_history, vocab)
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], idx.shape)
  seen = jnp.zeros((batch, vocab), bool).at[rows, idx].set(True, mode="drop")
  p = _per_row(penalty, jnp.float32)
  penalised = jnp.where(logits > 0, logits / p, logits * p)
  return jnp.where(seen, penalised, logits)


def apply_temperature(logits: jax.Array, temperature: Scalar) -> jax.Array:
  """Divide logits by the temperature (Boltzmann / softmax temperature, Ackley et al. 1985).

  ``temperature`` is a scalar or ``[batch]``. Rows with ``temperature <= 0`` are returned unchanged rather than
  divided by zero: temperature 0 means greedy decoding, which :func:`sample_next_token` implements as an argmax.

  Returns:
    float32 ``[batch, vocab]``.
  """
  logits = jnp.asarray(logits, jnp.float32)
  t = _per_row(temperature, jnp.float32)
  return logits / jnp.where(t > 0, t, 1.0)


def top_k_filter(logits: jax.Array, k: Union[int, jax.Array]) -> jax.Array:
  """Keep the ``k`` largest logits of each row, set the rest to -inf (top-k sampling, Fan et al. 2018).

  Implemented with a sort and a threshold, so ``k`` may be a traced scalar or a ``[batch]`` array and one compiled
  function serves any k. Ties: every logit equal to the k-th largest is kept, so a row can keep more than ``k``
  entries when values tie at the threshold. ``k <= 0`` or ``k >= vocab`` leaves the row unchanged.

  Returns:
    float32 ``[batch, vocab]``.
  """
  logits = jnp.asarray(logits, jnp.float32)
  vocab = logits.shape[-1]
  k = _per_row(k, jnp.int32)
  sorted_desc = -jnp.sort(-logits, axis=-1)
  kth = jnp.take_along_axis(sorted_desc, jnp.clip(k - 1, 0, vocab - 1), axis=-1)  # [batch, 1]
  active = (k > 0) & (k < vocab)
  return jnp.where(active & (logits < kth), _NEG_INF, logits)


def top_p_filter(logits: jax.Array, p: Scalar) -> jax.Array:
  """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most probable tokens with mass >= ``p``.

  Tokens are ranked by probability; a token is kept when the cumulative probability of the tokens ranked strictly
  above it is < ``p``. The top token is always kept (also for ``p <= 0``). The kept set is applied as a logit
  threshold, so tokens tying with the least probable kept token are kept as well. ``p >= 1`` leaves the row
  unchanged. ``p`` may be a traced scalar or a ``[batch]`` array. -inf logits (e.g. from top-k) have probability 0.

  Returns:
    float32 ``[batch, vocab]``.
  """
  logits = jnp.asarray(logits, jnp.float32)
  p = _per_row(p, jnp.float32)
  sorted_desc = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative sum
  n_keep = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)  # [batch, 1]
  threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
  return jnp.where((p < 1) & (logits < threshold), _NEG_INF, logits)


def min_p_filter(logits: jax.Array, min_p: Scalar) -> jax.Array:
  """Min-p filtering (Nguyen et al. 2024): drop the tokens whose probability is below ``min_p`` times the most
  probable token's, a cut that scales with the model's confidence. The top token is always kept; ``min_p <= 0``
  leaves the row unchanged. ``min_p`` may be a traced scalar or a ``[batch]`` array.

  Returns:
    float32 ``[batch, vocab]``.
  """
  logits = jnp.asarray(logits, jnp.float32)
  m = _per_row(min_p, jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.where((m > 0) & (probs < m * jnp.max(probs, axis=-1, keepdims=True)), _NEG_INF, logits)


def filtered_logits(
    logits: jax.Array,
    *,
    temperature: Scalar = 1.0,
    top_k: Union[int, jax.Array] = 0,
    top_p: Scalar = 1.0,
    min_p: Scalar = 0.0,
    repetition_penalty: Scalar = 1.0,
    token_history: Optional[jax.Array] = None,
    history_mask: Optional[jax.Array] = None,
) -> jax.Array:
  """The logits whose softmax is the distribution :func:`sample_next_token` draws from: repetition penalty ->
  temperature -> top-k -> top-p -> min-p, filtered tokens at -inf. Rows with ``temperature <= 0`` (greedy) are
  penalised but not scaled; every filter keeps their argmax. float32 ``[batch, vocab]``.

  Each stage is skipped at run time (lax.cond) when no row uses it: a greedy decode step then costs no vocabulary
  sort (~3 ms/token at vocab 8192 on CPU). Still one compiled function for every setting."""
  logits = jnp.asarray(logits, jnp.float32)
  if token_history is not None:
    penalty = _per_row(repetition_penalty, jnp.float32)
    logits = jax.lax.cond(
        jnp.any(penalty != 1.0),
        lambda x: apply_repetition_penalty(x, token_history, history_mask, repetition_penalty),
        lambda x: x, logits)
  vocab = logits.shape[-1]
  logits = apply_temperature(logits, temperature)
  k = _per_row(top_k, jnp.int32)
  logits = jax.lax.cond(jnp.any((k > 0) & (k < vocab)), lambda y: top_k_filter(y, top_k), lambda y: y, logits)
  logits = jax.lax.cond(jnp.any(_per_row(top_p, jnp.float32) < 1), lambda y: top_p_filter(y, top_p),
                        lambda y: y, logits)
  return jax.lax.cond(jnp.any(_per_row(min_p, jnp.float32) > 0), lambda y: min_p_filter(y, min_p),
                      lambda y: y, logits)


def sampling_probs(logits: jax.Array, *, temperature: Scalar = 1.0, **knobs) -> jax.Array:
  """float32 ``[batch, vocab]``: the probabilities :func:`sample_next_token` draws with, one-hot at the argmax for
  greedy rows (what speculative decoding's acceptance rule needs, generate/speculative.py). ``knobs``: those of
  :func:`filtered_logits`."""
  filtered = filtered_logits(logits, temperature=temperature, **knobs)
  is_greedy = _per_row(temperature, jnp.float32) <= 0
  one_hot = jax.nn.one_hot(jnp.argmax(filtered, axis=-1), filtered.shape[-1], dtype=jnp.float32)
  return jnp.where(is_greedy, one_hot, jax.nn.softmax(filtered, axis=-1))


def sample_next_token(
    key: jax.Array,
    logits: jax.Array,
    *,
    temperature: Scalar = 1.0,
    top_k: Union[int, jax.Array] = 0,
    top_p: Scalar = 1.0,
    min_p: Scalar = 0.0,
    repetition_penalty: Scalar = 1.0,
    token_history: Optional[jax.Array] = None,
    history_mask: Optional[jax.Array] = None,
) -> jax.Array:
  """Draw one token per row: repetition penalty -> temperature -> top-k -> top-p -> min-p -> categorical.

  Rows with ``temperature == 0`` (or below) take the argmax of the penalised logits instead (greedy; top-k/top-p
  cannot change the argmax). The choices are ``jnp.where``/``lax.cond``, not Python branches, so every knob may be a
  traced scalar or ``[batch]`` array and a jitted decode step compiles once for all settings. The repetition penalty is
  applied only when ``token_history`` is given (``history_mask`` None means all of it is real).

  Methods: CTRL penalty (Keskar et al. 2019), top-k (Fan et al. 2018), nucleus (Holtzman et al. 2020), min-p
  (Nguyen et al. 2024).

  Args:
    key: a PRNG key.
    logits: ``[batch, vocab]``, any float dtype.
    temperature, top_k, top_p, min_p, repetition_penalty: scalars or ``[batch]`` arrays; see the filter functions.
    token_history, history_mask: see :func:`apply_repetition_penalty`.

  Returns:
    int32 ``[batch]`` token ids.
  """
  logits = jnp.asarray(logits, jnp.float32)
  if token_history is not None:
    penalty = _per_row(repetition_penalty, jnp.float32)
    logits = jax.lax.cond(
        jnp.any(penalty != 1.0),
        lambda x: apply_repetition_penalty(x, token_history, history_mask, repetition_penalty),
        lambda x: x, logits)
  greedy = jnp.argmax(logits, axis=-1)
  is_greedy = _per_row(temperature, jnp.float32)[:, 0] <= 0

  def sample(x):  # the penalty is applied above, once
    x = filtered_logits(x, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return jax.random.categorical(key, x, axis=-1).astype(greedy.dtype)

  # A greedy step costs an argmax, not the filters and a random draw.
  sampled = jax.lax.cond(jnp.all(is_greedy), lambda x: greedy, sample, logits)
  return jnp.where(is_greedy, greedy, sampled).astype(jnp.int32)
