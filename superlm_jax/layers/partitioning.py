"""What a layer needs to know about the device mesh it runs on, without knowing the sharding rules.

Parameters only carry logical axis names (`initializers.param`); `superlm_jax.sharding` owns the table that maps
them to mesh axes. Two things cannot be left to XLA's automatic partitioning, so the model is told where they go:
  * the batch dimension of activations, pinned after every block so that XLA keeps the residual stream split by
    rows (data/FSDP parallelism) instead of picking a layout from the sharded weights it meets first;
  * the MoE dispatch, which moves tokens between devices explicitly (`layers.moe.expert_parallel_dispatch`).
`superlm_jax.sharding.mesh_axes` resolves the rules into a `MeshAxes`, which the model is built with
(`models.options.RuntimeOptions.mesh_axes`) and hands to its layers. It is a static attribute (part of the graph
definition), so a step traced with it compiles once. None, the default, is the single-device program, unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class MeshAxes:
  mesh: jax.sharding.Mesh
  batch: tuple[str, ...]  # Mesh axes the batch (token) dimension is split over, outermost first.
  experts: str | None = None  # Mesh axis the routed experts are split over (expert parallelism).
  expert_hidden: str | None = None  # Mesh axis each expert's hidden width is split over (tensor parallelism).

  def batch_spec(self, ndim: int) -> P:
    """[batch, ...] split by rows over the batch axes, the other dimensions whole."""
    return P(self.batch or None, *([None] * (ndim - 1)))


def constrain_batch(x: jax.Array, axes: MeshAxes | None) -> jax.Array:
  """Pins the leading (batch) dimension of `x` to the batch axes; the identity without a mesh."""
  if axes is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(axes.mesh, axes.batch_spec(x.ndim)))
