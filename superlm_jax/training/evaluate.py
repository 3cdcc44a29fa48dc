"""Evaluation: one jitted per-token NLL and one running average, which every evaluator reduces its own way
(nanodo's evaluate.py + metrics.Average). The training loop, the studies and the super-weights tool all score
through `make_token_nll` and summarise with `Average`; none has its own loss code.

    nll_fn = make_token_nll(graphdef, loss_chunk_size=2048)
    nll = nll_fn(params, model_state, batch)          # [batch, seq] float32 nats per target token
    avg = mean_nll(nll_fn, params, model_state, batches)   # Average over every target token
    avg.mean, avg.stderr, avg.to_json()            # {"mean", "se", "n"}

A batch is padded to `rows` rows (`pad_rows`) so the last, smaller validation batch reuses the compiled program;
padded rows carry weight 0 and never count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from superlm_jax.training.loss import head_token_nll


def token_nll(model: nnx.Module, batch: dict, *, loss_chunk_size: int = 0) -> jax.Array:
  """[batch, seq] per-token NLL of `batch["targets"]` given `batch["inputs"]` (and "positions"/"segments" for
  packed documents), float32; the output head is applied `loss_chunk_size` tokens at a time."""
  hidden, _ = model.hidden(batch["inputs"], batch.get("positions"), None, batch.get("segments"))
  return head_token_nll(hidden, model.output_head(), batch["targets"], chunk_size=loss_chunk_size)


def make_token_nll(graphdef, *, loss_chunk_size: int = 0, merge: Callable | None = None) -> Callable:
  """A jitted (params, model_state, batch) -> [batch, seq] per-token NLL. `merge(graphdef, params, model_state)`
  builds the model to score (default `nnx.merge`), e.g. one that runs across a mesh."""
  merge = merge or nnx.merge

  def nll(params, model_state, batch):
    return token_nll(merge(graphdef, params, model_state), batch, loss_chunk_size=loss_chunk_size)

  return jax.jit(nll)


def make_nll_sums(graphdef, *, loss_chunk_size: int = 0, merge: Callable | None = None) -> Callable:
  """A jitted (params, model_state, batch, row_weights [rows]) -> (sum, sum of squares, count) of the per-token NLL
  over the rows of weight 1: replicated scalars, which is what an evaluation across a mesh or several hosts adds up
  (`Average.add_sums`) when the per-token array itself is split over devices. `merge` as in `make_token_nll`."""
  merge = merge or nnx.merge

  def sums(params, model_state, batch, row_weights):
    nll = token_nll(merge(graphdef, params, model_state), batch, loss_chunk_size=loss_chunk_size)
    w = jnp.broadcast_to(row_weights[:, None], nll.shape)
    return jnp.sum(w * nll), jnp.sum(w * nll * nll), jnp.sum(w)

  return jax.jit(sums)


def pad_rows(batch: dict, rows: int) -> tuple[dict, np.ndarray]:
  """(`batch` with its arrays padded to `rows` rows by repeating row 0, [rows] weights: 1 real, 0 padding)."""
  n = len(batch["inputs"])
  if n > rows:
    raise ValueError(f"a batch of {n} rows does not fit the evaluation shape of {rows} rows")
  weights = np.zeros((rows,), np.float32)
  weights[:n] = 1.0
  if n == rows:
    return batch, weights
  padded = {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[:1], rows - n, axis=0)])
            for k, v in batch.items()}
  return padded, weights


@dataclasses.dataclass
class Average:
  """Running weighted mean of scalars with its standard error (items assumed independent): add per-token NLLs
  for a mean per token, or per-window means for an error over windows."""
  total: float = 0.0
  total_sq: float = 0.0
  count: float = 0.0

  def add(self, values, weights=None) -> "Average":
    v = np.asarray(values, np.float64).reshape(-1)
    w = np.ones_like(v) if weights is None else np.broadcast_to(np.asarray(weights, np.float64), np.shape(values)
                                                                ).reshape(-1)
    self.total += float(np.sum(w * v))
    self.total_sq += float(np.sum(w * v * v))
    self.count += float(np.sum(w))
    return self

  def add_sums(self, total, total_sq, count) -> "Average":
    self.total += float(total)
    self.total_sq += float(total_sq)
    self.count += float(count)
    return self

  def merge(self, other: "Average") -> "Average":
    return Average(self.total + other.total, self.total_sq + other.total_sq, self.count + other.count)

  @property
  def mean(self) -> float:
    return self.total / self.count if self.count else math.nan

  @property
  def stderr(self) -> float:
    if self.count < 2:
      return math.nan
    variance = max(self.total_sq / self.count - self.mean ** 2, 0.0) * self.count / (self.count - 1)
    return math.sqrt(variance / self.count)

  def to_json(self) -> dict:
    """The one JSON form of a mean ± standard error in reports: {"mean", "se", "n"}."""
    return {"mean": self.mean, "se": self.stderr, "n": int(self.count)}


def mean_nll(nll_fn: Callable, params, model_state, batches: Iterable[dict], rows: int | None = None,
             place: Callable[[dict], dict] | None = None) -> Average:
  """Average NLL per target token over `batches` (numpy dicts), each padded to `rows` rows (default: the first
  batch's) so one compiled shape serves all; `place` puts a batch on devices (default jnp.asarray)."""
  avg = Average()
  for batch in batches:
    rows = rows or len(batch["inputs"])
    padded, weights = pad_rows(batch, rows)
    placed = place(padded) if place else {k: jnp.asarray(v) for k, v in padded.items()}
    nll = np.asarray(nll_fn(params, model_state, placed))
    avg.add(nll, np.broadcast_to(weights[:, None], nll.shape))
  return avg
