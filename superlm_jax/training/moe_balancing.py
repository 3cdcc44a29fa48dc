"""MoE load balancing in one place: the settings, the terms the step adds to the loss and logs, and the
aux-loss-free bias update.

Three schemes, each off at 0 (train.moe_* in superlm_jax/config.py):
  alpha  Switch Transformer load-balancing loss E * sum_i f_i P_i (Fedus et al. 2021, eq. 4);
  beta   ST-MoE router z-loss mean(logsumexp(logits)^2) (Zoph et al. 2022, eq. 5);
  gamma  DeepSeek-V3's aux-loss-free balancing: after each optimizer step, b_i += gamma * sign(mean load - load_i)
         (DeepSeek-V3 sec. 2.1.2; Wang et al. 2024 eq. 5), the bias steering top-k selection only.
The layers sow their router statistics (layers/moe.py); `models.transformer.forward_with_moe_stats` returns them in
layer order (`moe_paths`, the one definition of that order); everything computed from them is here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from superlm_jax.layers.router import max_violation, update_balance_bias
from superlm_jax.models.spec import ModelSpec
from superlm_jax.models.transformer import moe_paths


@dataclasses.dataclass(frozen=True)
class MoEBalancing:
  """The three balancing schemes' coefficients, each off at 0."""
  aux_loss_coef: float = 0.0  # Switch load-balancing loss weight (alpha)
  z_loss_coef: float = 0.0  # router z-loss weight (beta)
  bias_update_rate: float = 0.0  # aux-loss-free bias step (gamma)

  @classmethod
  def from_config(cls, train_cfg) -> "MoEBalancing":
    return cls(train_cfg.moe_aux_loss_coef, train_cfg.moe_z_loss_coef, train_cfg.moe_bias_update_rate)

  def loss(self, terms: dict) -> jax.Array:
    """alpha * load-balancing loss + beta * z-loss (layer means) to add to the cross-entropy (0 for dense)."""
    if not terms:
      return jnp.float32(0.0)
    return self.aux_loss_coef * terms["moe_aux_loss"] + self.z_loss_coef * terms["moe_z_loss"]


def moe_terms(stats: list[dict]) -> dict:
  """Router statistics of all MoE layers (layer order) -> layer-averaged losses (the reference project summed them
  over 30 layers, which made its 'stable aux loss' a constant floor) and per-layer loads / MaxVio for logging.
  {} for a dense model."""
  if not stats:
    return {}
  loads = jnp.stack([s["load"] for s in stats])  # [moe_layers, experts]
  return {
      "moe_aux_loss": jnp.mean(jnp.stack([s["load_balancing_loss"] for s in stats])),
      "moe_z_loss": jnp.mean(jnp.stack([s["z_loss"] for s in stats])),
      "moe_entropy": jnp.mean(jnp.stack([s["entropy"] for s in stats])),
      "moe_dropped": jnp.mean(jnp.stack([s["dropped"] for s in stats])),
      "moe_load": loads,
      "moe_max_violation": max_violation(loads),  # per layer
  }


def update_router_biases(model_state: nnx.State, loads: jax.Array, rate: float, spec: ModelSpec) -> nnx.State:
  """A new model state with each MoE layer's routing bias moved by `rate` * sign(mean load - load) (loads
  [moe_layers, experts] in layer order); `model_state` is not modified."""
  pure = model_state.to_pure_dict()
  offset = 0
  for path, depth in moe_paths(spec):
    node = pure
    for key in path:
      node = node[key]
    layer_loads = loads[offset:offset + depth] if spec.scan_layers else loads[offset]
    node["balance_bias"] = update_balance_bias(node["balance_bias"], layer_loads, rate)
    offset += depth
  new_state = jax.tree.map(lambda x: x, model_state)
  nnx.replace_by_pure_dict(new_state, pure)
  return new_state
