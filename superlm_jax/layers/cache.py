"""The decode cache: preallocated per-layer buffers plus per-row lengths.

Contract (shared by every attention kind):
  * A cache is a pytree ``DecodeCache(layers, lengths)``. ``layers[i]`` is a dict of arrays
    ``[batch, max_len, ...]`` whose keys the layer's attention chooses (MHA/GQA: ``k`` and ``v`` per KV head;
    MLA: the compressed latent and the shared rotary key). Static shapes, so one compiled step serves every
    position, and the whole cache can be donated to the jitted step.
  * ``lengths[b]`` is the number of tokens of row b already in the cache. A call with T new tokens writes them at
    positions ``[lengths[b], lengths[b] + T)`` of row b and returns the cache with ``lengths + T``.
  * Slots at or beyond a row's length hold garbage (padding, stale values); attention masks them out by position,
    so rows of different lengths share one batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class DecodeCache:
  layers: tuple  # One dict of [batch, max_len, ...] arrays per layer.
  lengths: jax.Array  # int32 [batch].

  @property
  def max_len(self) -> int:
    return next(iter(self.layers[0].values())).shape[1]

  def with_lengths(self, lengths: jax.Array) -> "DecodeCache":
    return self.replace(lengths=jnp.asarray(lengths, jnp.int32))


def write_at(buffer: jax.Array, update: jax.Array, starts: jax.Array) -> jax.Array:
  """Writes update[b] ([T, ...]) into buffer[b] ([max_len, ...]) at row offset starts[b]."""
  def one_row(buf, upd, start):
    return jax.lax.dynamic_update_slice_in_dim(buf, upd.astype(buf.dtype), start, axis=0)
  return jax.vmap(one_row)(buffer, update, starts)
