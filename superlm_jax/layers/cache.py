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
  * A call must fit: ``lengths[b] + T <= max_len``. With concrete lengths (an eager call) a call that does not is a
    UserError naming the lengths, T and max_len (`check_room`). Under jit the lengths are not known, so writes past
    ``max_len`` are dropped (never clamped onto earlier slots, which is what ``dynamic_update_slice`` would do) and
    the returned ``lengths`` exceed ``max_len``: `overflowed(cache)` tells. `generate.decode.Generator` checks its
    prompts so that its loop never gets there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from superlm_jax.errors import UserError


@struct.dataclass
class DecodeCache:
  layers: tuple  # One dict of [batch, max_len, ...] arrays per layer.
  lengths: jax.Array  # int32 [batch].

  def with_lengths(self, lengths: jax.Array) -> "DecodeCache":
    return self.replace(lengths=jnp.asarray(lengths, jnp.int32))


def overflowed(cache: DecodeCache, max_len: int) -> jax.Array:
  """bool [batch]: rows that were given more tokens than the cache holds (their writes past max_len were dropped)."""
  return cache.lengths > max_len


def check_room(lengths: jax.Array, new_tokens: int, max_len: int) -> None:
  """UserError if `new_tokens` more tokens do not fit a cache of `max_len` slots at `lengths`; nothing when the
  lengths are traced (under jit the writes past max_len are dropped instead, see the module docstring)."""
  if isinstance(lengths, jax.core.Tracer):
    return
  longest = int(jnp.max(lengths)) if lengths.size else 0
  if longest + new_tokens > max_len:
    raise UserError(f"decode cache overflow: {new_tokens} new tokens at cache lengths up to {longest} exceed the "
                    f"cache's max_len={max_len}")


def write_at(buffer: jax.Array, update: jax.Array, starts: jax.Array) -> jax.Array:
  """Writes update[b] ([T, ...]) into buffer[b] ([max_len, ...]) at row offset starts[b]. Positions at or past
  max_len are dropped (a scatter with mode="drop"; under vmap dynamic_update_slice is a scatter too, which instead
  shifts the whole update back so that it fits, overwriting earlier slots)."""
  positions = jnp.asarray(starts, jnp.int32)[:, None] + jnp.arange(update.shape[1], dtype=jnp.int32)[None, :]
  rows = jnp.arange(buffer.shape[0], dtype=jnp.int32)[:, None]
  return buffer.at[rows, positions].set(update.astype(buffer.dtype), mode="drop")
