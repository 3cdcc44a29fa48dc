"""Mixture-of-Experts routing as pure functions: scores -> (expert ids, gate weights), balancing losses, load stats.

Conventions: T tokens (batch and sequence flattened), E routed experts, k = experts per token.
References: Switch Transformer (Fedus et al. 2021, eq. 4-6) for the load-balancing loss; ST-MoE (Zoph et al. 2022,
eq. 5) for the router z-loss; DeepSeek-V2 (sec. 2.2) / V3 (sec. 2.1.2, eq. 12-16) for group-limited routing, sigmoid
scores normalised over the chosen experts, the routed scaling factor and auxiliary-loss-free balancing (Wang et al.
2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RouterSpec:
  """How scores become expert choices (DeepSeek's config names)."""
  num_experts: int
  top_k: int
  scoring: str = "softmax"  # "softmax" | "sigmoid"
  norm_topk_prob: bool = True  # Renormalise the k gate weights to sum to 1.
  routed_scaling_factor: float = 1.0  # Multiplies the gate weights (DeepSeek-V3: 2.5).
  n_group: int = 1  # Group-limited routing: experts split into n_group groups ...
  topk_group: int = 1  # ... and only the best topk_group groups are eligible per token.

  def __post_init__(self):
    if self.scoring not in ("softmax", "sigmoid"):
      raise ValueError(f"router scoring must be softmax or sigmoid, got {self.scoring!r}")
    if self.num_experts % self.n_group:
      raise ValueError(f"{self.num_experts} experts do not split into n_group={self.n_group} groups")
    if not 1 <= self.topk_group <= self.n_group:
      raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
    if self.top_k > self.num_experts // self.n_group * self.topk_group:
      raise ValueError(f"top_k={self.top_k} exceeds the experts in {self.topk_group} of {self.n_group} groups")


def router_scores(logits: jax.Array, scoring: str) -> jax.Array:
  """Affinities s_{t,i} in float32: softmax over experts (DeepSeek-V2) or per-expert sigmoid (DeepSeek-V3)."""
  logits = logits.astype(jnp.float32)
  return jax.nn.softmax(logits, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits)


def _group_mask(selection: jax.Array, spec: RouterSpec) -> jax.Array:
  """[T, E] bool: experts in each token's best `topk_group` groups. A group's score is its best expert's
  (DeepSeek-V2 device-limited routing) or, for sigmoid scores, the sum of its two best (DeepSeek-V3)."""
  tokens = selection.shape[0]
  grouped = selection.reshape(tokens, spec.n_group, -1)
  if spec.scoring == "sigmoid" and grouped.shape[-1] >= 2:
    group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
  else:
    group_score = grouped.max(-1)
  _, best_groups = jax.lax.top_k(group_score, spec.topk_group)
  keep = jnp.zeros((tokens, spec.n_group), bool).at[jnp.arange(tokens)[:, None], best_groups].set(True)
  return jnp.repeat(keep, spec.num_experts // spec.n_group, axis=1)


def route(logits: jax.Array, spec: RouterSpec, bias: jax.Array | None = None):
  """Chooses k experts per token. Returns (expert_ids int32 [T, k], gates float32 [T, k], scores float32 [T, E]).

  `bias` (aux-loss-free balancing) is added to the scores for the top-k SELECTION only; the gate weights use the
  unbiased scores (DeepSeek-V3 eq. 16), so the bias steers load without changing what the model computes for the
  chosen experts, and it receives no gradient.
  """
  scores = router_scores(logits, spec.scoring)
  selection = scores if bias is None else scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
  if spec.n_group > 1:
    selection = jnp.where(_group_mask(selection, spec), selection, -jnp.inf)
  _, expert_ids = jax.lax.top_k(selection, spec.top_k)
  gates = jnp.take_along_axis(scores, expert_ids, axis=-1)
  if spec.norm_topk_prob:
    gates = gates / (gates.sum(-1, keepdims=True) + 1e-20)
  return expert_ids.astype(jnp.int32), gates * spec.routed_scaling_factor, scores


def expert_load(expert_ids: jax.Array, num_experts: int) -> jax.Array:
  """Fraction of the T*k routing assignments that went to each expert, [E] (sums to 1)."""
  counts = jnp.zeros((num_experts,), jnp.float32).at[expert_ids.reshape(-1)].add(1.0)
  return counts / expert_ids.size


def load_balancing_loss(scores: jax.Array, expert_ids: jax.Array, num_experts: int) -> jax.Array:
  """Switch Transformer auxiliary loss E * sum_i f_i * P_i (Fedus et al. 2021, eq. 4): f_i = fraction of assignments
  routed to expert i (no gradient), P_i = mean router probability of expert i. Equals 1 at perfect balance.
  Scores are renormalised per token so sigmoid routers get a probability too (DeepSeek-V3 eq. 18-20 does the same)."""
  probs = scores / scores.sum(-1, keepdims=True)
  f = jax.lax.stop_gradient(expert_load(expert_ids, num_experts))
  return num_experts * jnp.sum(f * probs.mean(0))


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss mean_t (logsumexp_i x_{t,i})^2 (Zoph et al. 2022, eq. 5): keeps router logits small."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def max_violation(load: jax.Array) -> jax.Array:
  """MaxVio = (max_i load_i - mean load) / mean load (Wang et al. 2024, eq. 6) over the last (experts) axis, so
  [layers, experts] loads give one value per layer; 0 is perfectly balanced."""
  mean = load.mean(-1)
  return (load.max(-1) - mean) / mean


def router_entropy(scores: jax.Array) -> jax.Array:
  """Mean entropy (nats) of the per-token routing distribution: low means confident, near log E means uniform."""
  probs = scores / scores.sum(-1, keepdims=True)
  return -jnp.mean(jnp.sum(probs * jnp.log(probs + 1e-20), axis=-1))


def update_balance_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Aux-loss-free balancing update after an optimizer step (DeepSeek-V3 sec. 2.1.2; Wang et al. 2024 eq. 5):
  b_i += rate * sign(mean_load - load_i): overloaded experts become less likely to be selected.

  `load` holds fractions that sum to 1, so the mean load is exactly 1/E; computing it with `load.mean()` in float32
  can land an ulp off and move an exactly balanced expert."""
  return bias + rate * jnp.sign(1.0 / load.shape[-1] - load)
