"""DeepSeekMoE feed-forward (Dai et al. 2024; DeepSeek-V2 sec. 2.2, V3 sec. 2.1.2): shared experts that every token
uses plus routed experts of which each token uses k, combined with the router's gate weights.

Two dispatch strategies compute the routed experts:
  dropless   sort the T*k assignments by expert and run each expert's FFN on its contiguous rows with a grouped
             matmul (`jax.lax.ragged_dot`, MegaBlocks-style, Gale et al. 2022): no token is ever dropped.
  capacity   fixed [experts, capacity, d] buffers (GShard/Switch): each expert takes at most
             capacity = ceil(capacity_factor * T * k / E) assignments, top-1 choices first; the rest are dropped
             (their routed output is zero) and counted. Static shapes, plain batched matmuls.
Both equal a naive per-token loop over experts (tested); capacity does so whenever nothing is dropped.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from superlm_jax.layers import router as router_lib
from superlm_jax.layers.initializers import param
from superlm_jax.layers.mlp import MLP


class RouterBias(nnx.Variable):
  """Per-expert bias for aux-loss-free balancing: model state, not a parameter (the optimizer never sees it); it is
  updated after each optimizer step from the observed load and saved with the checkpoint."""


class MoEStats(nnx.Intermediate):
  """Router statistics of the last forward pass, sown for the train step (aux losses, load, bias update)."""


def _expert_ffn(h_in, w_gate, w_up, w_down, activation, matmul):
  """An expert FFN on rows `h_in` with a matmul that knows which expert each row belongs to."""
  up = matmul(h_in, w_up)
  if activation == "swiglu":
    hidden = jax.nn.silu(matmul(h_in, w_gate)) * up
  else:
    hidden = jax.nn.gelu(up, approximate=True)
  return matmul(hidden, w_down)


def dropless_dispatch(x, expert_ids, gates, w_gate, w_up, w_down, activation):
  """x [T, d], expert_ids/gates [T, k]. Sort assignments by expert, grouped matmul, scatter-add back. -> [T, d]."""
  tokens, k = expert_ids.shape
  num_experts = w_up.shape[0]
  flat = expert_ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  token_of = order // k
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  matmul = lambda a, w: jax.lax.ragged_dot(a, w.astype(a.dtype), group_sizes)
  out = _expert_ffn(x[token_of], w_gate, w_up, w_down, activation, matmul)
  out = out * gates.reshape(-1)[order][:, None].astype(out.dtype)
  return jnp.zeros_like(x).at[token_of].add(out), jnp.zeros((), jnp.float32)


def capacity_dispatch(x, expert_ids, gates, w_gate, w_up, w_down, activation, capacity_factor):
  """Fixed-capacity dispatch. Returns ([T, d], fraction of assignments dropped)."""
  tokens, k = expert_ids.shape
  num_experts = w_up.shape[0]
  capacity = max(1, math.ceil(capacity_factor * tokens * k / num_experts))
  # Slot-major order (all top-1 choices, then all top-2 ...): a token's best expert is the last to be dropped.
  ids_sm = expert_ids.T.reshape(-1)
  one_hot = jax.nn.one_hot(ids_sm, num_experts, dtype=jnp.int32)
  position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)  # rank within its expert
  kept = position < capacity
  token_sm = jnp.tile(jnp.arange(tokens), k)
  slot = jnp.where(kept, position, capacity)  # dropped assignments go to an overflow slot that is cut off
  buffer = jnp.zeros((num_experts, capacity + 1, x.shape[-1]), x.dtype).at[ids_sm, slot].set(x[token_sm])
  matmul = lambda a, w: jnp.einsum("ecd,edf->ecf", a, w.astype(a.dtype))
  out = _expert_ffn(buffer[:, :capacity], w_gate, w_up, w_down, activation, matmul)
  out = jnp.concatenate([out, jnp.zeros_like(out[:, :1])], axis=1)  # the overflow slot contributes zero
  gates_sm = gates.T.reshape(-1)
  combined = out[ids_sm, slot] * (gates_sm * kept)[:, None].astype(out.dtype)
  y = jnp.zeros_like(x).at[token_sm].add(combined)
  return y, jnp.sum(~kept, dtype=jnp.float32) / kept.size  # exactly 0 when nothing is dropped


class MoE(nnx.Module):
  """Shared experts + top-k routed experts in the feed-forward slot of a decoder block."""

  def __init__(self, dim: int, *, spec: router_lib.RouterSpec, expert_hidden: int, num_shared: int,
               activation: str, dispatch: str, capacity_factor: float, std: float, out_std: float, rngs: nnx.Rngs):
    if dispatch not in ("dropless", "capacity"):
      raise ValueError(f"unknown MoE dispatch {dispatch!r}")
    self.spec, self.activation, self.dispatch, self.capacity_factor = spec, activation, dispatch, capacity_factor
    e = spec.num_experts
    self.router = param(rngs, (dim, e), ("embed", "experts"), std=std)
    self.balance_bias = RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=("experts",), eager_sharding=False)
    self.w_gate = (param(rngs, (e, dim, expert_hidden), ("experts", "embed", "mlp"), std=std)
                   if activation == "swiglu" else None)
    self.w_up = param(rngs, (e, dim, expert_hidden), ("experts", "embed", "mlp"), std=std)
    self.w_down = param(rngs, (e, expert_hidden, dim), ("experts", "mlp", "embed"), std=out_std)
    # DeepSeekMoE's shared experts are one dense FFN of num_shared * expert_hidden width.
    self.shared = (MLP(dim, num_shared * expert_hidden, activation=activation, use_bias=False, std=std,
                       out_std=out_std, rngs=rngs) if num_shared else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    xt = x.reshape(-1, shape[-1])
    logits = xt.astype(jnp.float32) @ self.router[...]  # routing in float32 whatever the compute dtype
    expert_ids, gates, scores = router_lib.route(logits, self.spec, self.balance_bias[...])
    weights = (None if self.w_gate is None else self.w_gate[...], self.w_up[...], self.w_down[...])
    if self.dispatch == "dropless":
      y, dropped = dropless_dispatch(xt, expert_ids, gates, *weights, self.activation)
    else:
      y, dropped = capacity_dispatch(xt, expert_ids, gates, *weights, self.activation, self.capacity_factor)
    e = self.spec.num_experts
    self.sow(MoEStats, "stats", {
        "load_balancing_loss": router_lib.load_balancing_loss(scores, expert_ids, e),
        "z_loss": router_lib.router_z_loss(logits),
        "load": router_lib.expert_load(expert_ids, e),
        "entropy": router_lib.router_entropy(scores),
        "dropped": dropped,
    })
    y = y.reshape(shape)
    if self.shared is not None:
      y = y + self.shared(x)
    return y
