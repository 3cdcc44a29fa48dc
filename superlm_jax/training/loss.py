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
