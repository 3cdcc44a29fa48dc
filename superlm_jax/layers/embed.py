"""Token embeddings (with the tied output head) and learned absolute positions (GPT-2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from superlm_jax.layers.initializers import param


class Embed(nnx.Module):
  """A [vocab, embed] table. `attend` reuses it as the output projection when embeddings are tied
  (Press & Wolf 2017), which GPT-2 and the reference projects' small models all do."""

  def __init__(self, vocab_size: int, dim: int, *, std: float, rngs: nnx.Rngs):
    self.embedding = param(rngs, (vocab_size, dim), ("vocab", "embed"), std=std)

  def __call__(self, tokens: jax.Array, dtype=jnp.float32) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("btd,vd->btv", x, self.embedding[...].astype(x.dtype))


class LearnedPositions(nnx.Module):
  """GPT-2's absolute position table [max_seq_len, embed]; positions beyond it cannot be represented, which is
  why the NoPE/RoPE variants are the ones used for length generalisation."""

  def __init__(self, max_seq_len: int, dim: int, *, std: float, rngs: nnx.Rngs):
    self.embedding = param(rngs, (max_seq_len, dim), ("position", "embed"), std=std)

  def __call__(self, positions: jax.Array, dtype=jnp.float32) -> jax.Array:
    return jnp.take(self.embedding[...], positions, axis=0).astype(dtype)
