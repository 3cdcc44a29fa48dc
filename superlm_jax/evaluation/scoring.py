"""Batched, jitted log-likelihoods of given tokens: what perplexity (evaluation/perplexity.py) and the
lm-evaluation-harness adapter (interop/lm_eval_harness.py) both compute.

    scorer = Scorer(model, batch_size=8)
    [row] = scorer.score([(tokens, first)])   # log p(tokens[i] | tokens[:i]) for i >= first
    row.logprobs.sum(), row.greedy.all()       # the continuation's log-likelihood; is it the greedy one?

Rows are sorted by length and padded on the right to a bucketed length (a multiple of `bucket`, at most the model
context) and to `batch_size` rows, so a whole evaluation compiles one program per bucket, not per request. Causal
attention makes right padding invisible to the real positions, and the model is the dropless inference program
(`models.transformer.for_inference`), so no row changes another's result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from superlm_jax.errors import UserError
from superlm_jax.models.transformer import for_inference


@dataclasses.dataclass(frozen=True)
class ScoredRow:
  logprobs: np.ndarray  # [n] float32: log p of each scored token given all tokens before it
  greedy: np.ndarray  # [n] bool: the scored token is the argmax of its distribution


def head_token_scores(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, chunk_size: int = 0):
  """(log p(target), target == argmax) per token, shaped like `targets`, of the logits `hidden @ head` computed
  `chunk_size` tokens at a time (0: all at once), so [tokens, vocab] logits never exist whole."""
  def scores(x, labels):
    logits = (x @ head).astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == labels

  tokens = targets.size
  if not chunk_size or tokens <= chunk_size:
    return scores(hidden, targets)
  chunks = -(-tokens // chunk_size)
  pad = chunks * chunk_size - tokens
  x = jnp.pad(hidden.reshape(tokens, -1), ((0, pad), (0, 0))).reshape(chunks, chunk_size, -1)
  labels = jnp.pad(targets.reshape(tokens), (0, pad)).reshape(chunks, chunk_size)
  logprob, greedy = jax.lax.map(lambda chunk: scores(*chunk), (x, labels))
  return tuple(a.reshape(-1)[:tokens].reshape(targets.shape) for a in (logprob, greedy))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Scorer:
  """Scores token rows with a `Transformer`: `score([(tokens, first), ...])` -> one `ScoredRow` per row, for the
  tokens `tokens[first:]` (first >= 1: the first token of a row has nothing to be predicted from)."""

  def __init__(self, model: nnx.Module, *, batch_size: int = 8, bucket: int = 64, chunk_size: int = 2048):
    model = for_inference(model)
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    self.max_seq_len = int(model.spec.max_seq_len)
    self.vocab_size = int(model.spec.vocab_size)
    self.batch_size, self.bucket, self.chunk_size = int(batch_size), int(bucket), int(chunk_size)
    self._scores = jax.jit(self._scores_fn)

  def _scores_fn(self, params, rest, inputs, targets):
    model = nnx.merge(self.graphdef, params, rest)
    hidden, _ = model.hidden(inputs)
    return head_token_scores(hidden, model.output_head(), targets, chunk_size=self.chunk_size)

  def check_row(self, tokens: Sequence[int], first: int) -> None:
    if not 1 <= first <= len(tokens):
      raise ValueError(f"first={first} must be in [1, {len(tokens)}] for a row of {len(tokens)} tokens")
    if len(tokens) - 1 > self.max_seq_len:
      raise UserError(f"a row of {len(tokens)} tokens does not fit the model context of {self.max_seq_len} "
                      "tokens (+1 for the last target)")
    ids = np.asarray(tokens)
    bad = ids[(ids < 0) | (ids >= self.vocab_size)]
    if bad.size:
      raise UserError(f"token id {int(bad[0])} is outside the model vocabulary [0, {self.vocab_size})")

  def score(self, rows: Sequence[tuple[Sequence[int], int]], *, progress=None) -> list[ScoredRow]:
    """`progress`: called with the number of rows done after each batch (e.g. a tqdm bar's `update`)."""
    for tokens, first in rows:
      self.check_row(tokens, first)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
    results: list[ScoredRow | None] = [None] * len(rows)
    for start in range(0, len(order), self.batch_size):
      batch = order[start:start + self.batch_size]
      length = min(_round_up(max(len(rows[i][0]) - 1 for i in batch), self.bucket), self.max_seq_len)
      inputs = np.zeros((self.batch_size, length), np.int32)
      targets = np.zeros((self.batch_size, length), np.int32)
      for r, i in enumerate(batch):
        tokens = np.asarray(rows[i][0], np.int32)
        inputs[r, :len(tokens) - 1] = tokens[:-1]
        targets[r, :len(tokens) - 1] = tokens[1:]
      logprob, greedy = (np.asarray(a) for a in self._scores(self.params, self.rest, inputs, targets))
      for r, i in enumerate(batch):
        tokens, first = rows[i]
        results[i] = ScoredRow(logprob[r, first - 1:len(tokens) - 1], greedy[r, first - 1:len(tokens) - 1])
      if progress is not None:
        progress(len(batch))
    return results
