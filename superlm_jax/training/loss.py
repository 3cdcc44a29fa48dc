"""Language-modelling loss as pure functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, *, label_smoothing: float = 0.0,
                  mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean token cross-entropy in nats, float32. Returns (loss to optimise, plain NLL for logging).

  With label smoothing eps (Szegedy et al. 2016) the target distribution is (1-eps) on the label plus eps/V
  uniform: loss = (1-eps) * nll + eps * mean_v(-log p_v). The logged NLL stays the un-smoothed one so that
  perplexity and validation loss mean what they say.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  label_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - label_logit
  if label_smoothing:
    uniform = log_z - logits.mean(axis=-1)
    loss = (1.0 - label_smoothing) * nll + label_smoothing * uniform
  else:
    loss = nll
  if mask is None:
    return loss.mean(), nll.mean()
  mask = mask.astype(jnp.float32)
  denom = jnp.maximum(mask.sum(), 1.0)
  return (loss * mask).sum() / denom, (nll * mask).sum() / denom


def head_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, label_smoothing: float = 0.0,
                       mask: jax.Array | None = None, chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy(hidden @ head, targets)` without the whole [tokens, vocab] logits: the output head and the
  loss fused, `chunk_size` tokens at a time.

  hidden [..., embed] and head [embed, vocab] in the compute dtype; targets (and mask) [...]. Tokens are cut into
  chunks that a `lax.scan` visits in turn; each chunk's logits live only inside its iteration, and
  `jax.checkpoint` on the iteration makes the backward pass recompute them from the chunk's hidden states
  instead of saving them (the head's gradient accumulates over the chunks). Memory: one [chunk, vocab] block
  instead of [tokens, vocab], for one more head matmul. A batch of at most `chunk_size` tokens (or chunk_size 0)
  takes the one-matrix path, which is faster when memory is not the issue.
  """
  tokens = targets.size
  if not chunk_size or tokens <= chunk_size:
    return cross_entropy(hidden @ head, targets, label_smoothing=label_smoothing, mask=mask)
  x = hidden.reshape(tokens, hidden.shape[-1])
  weight = jnp.ones((tokens,), jnp.float32) if mask is None else mask.reshape(tokens).astype(jnp.float32)
  labels = targets.reshape(tokens)
  chunks = -(-tokens // chunk_size)
  pad = chunks * chunk_size - tokens  # padded tokens have weight 0
  x = jnp.pad(x, ((0, pad), (0, 0))).reshape(chunks, chunk_size, -1)
  labels = jnp.pad(labels, (0, pad)).reshape(chunks, chunk_size)
  weight = jnp.pad(weight, (0, pad)).reshape(chunks, chunk_size)

  @jax.checkpoint
  def chunk_sums(x, labels, weight):
    logits = (x @ head).astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    nll = log_z - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    loss = nll
    if label_smoothing:
      loss = (1.0 - label_smoothing) * nll + label_smoothing * (log_z - logits.mean(axis=-1))
    return jnp.sum(loss * weight), jnp.sum(nll * weight)

  def body(carry, chunk):
    loss, nll = chunk_sums(*chunk)
    return (carry[0] + loss, carry[1] + nll), None

  (loss_sum, nll_sum), _ = jax.lax.scan(body, (jnp.float32(0.0), jnp.float32(0.0)), (x, labels, weight))
  denom = jnp.float32(tokens) if mask is None else jnp.maximum(jnp.sum(weight), 1.0)
  return loss_sum / denom, nll_sum / denom


def head_token_nll(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, chunk_size: int = 0) -> jax.Array:
  """Per-token NLL (float32, shaped like `targets`) of `hidden @ head`, `chunk_size` tokens of logits at a time
  (0: all at once): the evaluation counterpart of `head_cross_entropy`, for callers that reduce it themselves."""
  tokens = targets.size
  if not chunk_size or tokens <= chunk_size:
    logits = (hidden @ head).astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  chunks = -(-tokens // chunk_size)
  pad = chunks * chunk_size - tokens
  x = jnp.pad(hidden.reshape(tokens, -1), ((0, pad), (0, 0))).reshape(chunks, chunk_size, -1)
  labels = jnp.pad(targets.reshape(tokens), (0, pad)).reshape(chunks, chunk_size)

  def chunk_nll(chunk):
    x, labels = chunk
    logits = (x @ head).astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]

  return jax.lax.map(chunk_nll, (x, labels)).reshape(-1)[:tokens].reshape(targets.shape)
