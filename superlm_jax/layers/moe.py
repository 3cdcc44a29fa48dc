"""DeepSeekMoE feed-forward (Dai et al. 2024; DeepSeek-V2 sec. 2.2, V3 sec. 2.1.2): shared experts that every token
uses plus routed experts of which each token uses k, combined with the router's gate weights.

Two dispatch strategies compute the routed experts:
  dropless   sort the T*k assignments by expert and run each expert's FFN on its contiguous rows with a grouped
             matmul (`jax.lax.ragged_dot`, MegaBlocks-style, Gale et al. 2022): no token is ever dropped.
  capacity   fixed [experts, capacity, d] buffers (GShard/Switch): each expert takes at most
             capacity = ceil(capacity_factor * T * k / E) assignments, top-1 choices first; the rest are dropped
             (their routed output is zero) and counted. Static shapes, plain batched matmuls.
Both equal a naive per-token loop over experts (tested); capacity does so whenever nothing is dropped.

On a device mesh (`mesh_axes` set by `superlm_jax.sharding`), `expert_parallel_dispatch` runs either strategy
per device inside `jax.shard_map`: each device routes its own tokens, holds E/n of the experts, and the tokens
travel to their experts and back (see there for which collectives and why). Capacity then counts the tokens of
one device (GShard's "group"); without drops both equal the single-device result (tested on 8 CPU devices).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from superlm_jax.layers import router as router_lib
from superlm_jax.layers.initializers import param
from superlm_jax.layers.mlp import MLP, ffn_hidden
from superlm_jax.layers.partitioning import MeshAxes


class RouterBias(nnx.Variable):
  """Per-expert bias for aux-loss-free balancing: model state, not a parameter (the optimizer never sees it); it is
  updated after each optimizer step from the observed load and saved with the checkpoint."""


class MoEStats(nnx.Intermediate):
  """Router statistics of the last forward pass, sown for the train step (aux losses, load, bias update)."""


def _expert_ffn(h_in, w_gate, w_up, w_down, activation, matmul):
  """An expert FFN on rows `h_in` with a matmul that knows which expert each row belongs to."""
  gate = matmul(h_in, w_gate) if activation == "swiglu" else None
  return matmul(ffn_hidden(matmul(h_in, w_up), gate, activation), w_down)


def dropless_dispatch(x, expert_ids, gates, w_gate, w_up, w_down, activation, experts_axis=None):
  """x [T, d], expert_ids/gates [T, k]. Sort assignments by expert, grouped matmul, scatter-add back. -> [T, d].

  `experts_axis` (inside `jax.shard_map`): the weights are this device's E/n consecutive experts. The tokens of the
  n devices along the axis are all-gathered, this device's experts run on the assignments routed to them, and the
  partial outputs are reduce-scattered back to the devices that own the tokens. Assignments to other devices'
  experts get the id E/n: sorted last and outside every group, so ragged_dot gives them zero rows (and gradients).
  """
  if experts_axis is not None:
    gather = lambda a: jax.lax.all_gather(a, experts_axis, tiled=True)
    num_local = w_up.shape[0]
    local_ids = gather(expert_ids) - jax.lax.axis_index(experts_axis) * num_local
    mine = (local_ids >= 0) & (local_ids < num_local)
    y, dropped = dropless_dispatch(gather(x), jnp.where(mine, local_ids, num_local),
                                   jnp.where(mine, gather(gates), 0.0), w_gate, w_up, w_down, activation)
    return jax.lax.psum_scatter(y, experts_axis, scatter_dimension=0, tiled=True), dropped
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


def capacity_dispatch(x, expert_ids, gates, w_gate, w_up, w_down, activation, capacity_factor, experts_axis=None):
  """Fixed-capacity dispatch. Returns ([T, d], fraction of assignments dropped).

  `experts_axis` (inside `jax.shard_map`): the weights are this device's E/n consecutive experts. The [E, C, d]
  buffers of this device's tokens go through one all-to-all, after which each device holds the slots of its own
  experts from all n devices ([E/n, n * C, d]); a second all-to-all brings the results back (GShard, Lepikhin et
  al. 2020, sec. 3.2).
  """
  tokens, k = expert_ids.shape
  num_experts = w_up.shape[0] * (1 if experts_axis is None else jax.lax.axis_size(experts_axis))
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
  expert_in = buffer[:, :capacity]
  if experts_axis is not None:
    expert_in = jax.lax.all_to_all(expert_in, experts_axis, split_axis=0, concat_axis=1, tiled=True)
  out = _expert_ffn(expert_in, w_gate, w_up, w_down, activation, matmul)
  if experts_axis is not None:
    out = jax.lax.all_to_all(out, experts_axis, split_axis=1, concat_axis=0, tiled=True)
  out = jnp.concatenate([out, jnp.zeros_like(out[:, :1])], axis=1)  # the overflow slot contributes zero
  gates_sm = gates.T.reshape(-1)
  combined = out[ids_sm, slot] * (gates_sm * kept)[:, None].astype(out.dtype)
  y = jnp.zeros_like(x).at[token_sm].add(combined)
  return y, jnp.sum(~kept, dtype=jnp.float32) / kept.size  # exactly 0 when nothing is dropped


def expert_parallel_dispatch(x, expert_ids, gates, w_gate, w_up, w_down, *, activation: str, dispatch: str,
                             capacity_factor: float, axes: MeshAxes):
  """The routed experts on a device mesh. x [T, d] and the routing [T, k] are split by rows over `axes.batch`;
  the expert weights over `axes.experts` (E/n experts per device) and their hidden width over
  `axes.expert_hidden`. Returns (y [T, d] split like x, fraction of assignments dropped).

  Why `jax.shard_map` and explicit collectives rather than the single-device code under sharding constraints:
  XLA partitions the dispatch's argsort, bincount and scatter over a split token axis by gathering every token
  onto every device (each device would sort and compute all of them), and it has no notion of sending a row to
  the device that holds its expert. Per device, the dispatch is the single-device code on local rows, plus:
    dropless  all-gather / reduce-scatter over the expert axis (Megatron-Core's "allgather" token dispatcher).
              Static shapes cannot know how many rows an expert will receive, so a dropless exchange must size its
              buffers for the worst case, every row of the group routed here: that is what an all-gather
              delivers, (n-1)/n of the group's tokens each way, without per-destination bookkeeping; an
              all-to-all of one row per assignment with worst-case buffers would move k times more.
              `jax.lax.ragged_all_to_all` moves only the routed rows, but XLA:CPU does not implement it, so it
              could not be tested here (the next step for GPU/TPU at scale).
    capacity  the GShard all-to-all of fixed [E, C, d] slot buffers: rows travel to their expert's device and
              back, bounded by the capacity (capacity_factor * T * k rows per device).
  The tensor-parallel split of the hidden width leaves partial sums, added once on the [T, d] output.
  """
  rows = P(axes.batch or None)
  w_in, w_out = P(axes.experts, None, axes.expert_hidden), P(axes.experts, axes.expert_hidden, None)
  gated = w_gate is not None
  weights = (w_gate, w_up, w_down) if gated else (w_up, w_down)
  weight_specs = (w_in, w_in, w_out) if gated else (w_in, w_out)

  def local(x, expert_ids, gates, *weights):
    w_gate, w_up, w_down = weights if gated else (None, *weights)
    if dispatch == "dropless":
      y, dropped = dropless_dispatch(x, expert_ids, gates, w_gate, w_up, w_down, activation,
                                     experts_axis=axes.experts)
    else:
      y, dropped = capacity_dispatch(x, expert_ids, gates, w_gate, w_up, w_down, activation, capacity_factor,
                                     experts_axis=axes.experts)
      if axes.batch:  # every device has as many rows, so the mean of the fractions is the global fraction
        dropped = jax.lax.pmean(dropped, axes.batch)
    if axes.expert_hidden is not None:
      y = jax.lax.psum(y, axes.expert_hidden)
    return y, dropped

  return jax.shard_map(local, mesh=axes.mesh, in_specs=(rows, rows, rows, *weight_specs),
                       out_specs=(rows, P()))(x, expert_ids, gates, *weights)


class MoE(nnx.Module):
  """Shared experts + top-k routed experts in the feed-forward slot of a decoder block."""

  def __init__(self, dim: int, *, spec: router_lib.RouterSpec, expert_hidden: int, num_shared: int,
               activation: str, dispatch: str, capacity_factor: float, std: float, out_std: float, rngs: nnx.Rngs,
               mesh_axes: MeshAxes | None = None):
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
    self.mesh_axes = mesh_axes  # Not None: dispatch tokens to experts across the devices of this mesh.

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    xt = x.reshape(-1, shape[-1])
    logits = xt.astype(jnp.float32) @ self.router[...]  # routing in float32 whatever the compute dtype
    expert_ids, gates, scores = router_lib.route(logits, self.spec, self.balance_bias[...])
    weights = (None if self.w_gate is None else self.w_gate[...], self.w_up[...], self.w_down[...])
    if self.mesh_axes is not None:
      y, dropped = expert_parallel_dispatch(xt, expert_ids, gates, *weights, activation=self.activation,
                                            dispatch=self.dispatch, capacity_factor=self.capacity_factor,
                                            axes=self.mesh_axes)
    elif self.dispatch == "dropless":
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
