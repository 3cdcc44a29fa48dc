"""The jitted train and eval steps, as pure functions of an explicit train state.

The model is split once into a static graph definition and array pytrees (`nnx.split`), so the step is a plain
`jax.jit` function of arrays: it compiles once and donates the old state. On a device mesh
(`superlm_jax.sharding`) the state is created directly in its shards (`create_train_state`) and the step is the
same one jit with explicit in/out shardings: XLA inserts the collectives (gradient all-reduce for data
parallelism, weight all-gather and gradient reduce-scatter for FSDP), and MoE layers move tokens to their
experts' devices themselves (`layers.moe.expert_parallel_dispatch`).

Train state (the one thing checkpoints hold): ``{"params", "opt_state", "model_state", "step", "rng"}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from superlm_jax import sharding as sharding_lib
from superlm_jax.models.transformer import build_model, forward_with_moe_stats, update_balance_biases
from superlm_jax.training.loss import head_cross_entropy
from superlm_jax.training.optim import make_optimizer

TrainState = dict[str, Any]


def split_model(model: nnx.Module):
  """(graphdef, params, model_state): trainable parameters and every other variable (e.g. MoE routing biases)."""
  return nnx.split(model, nnx.Param, ...)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> tuple[Any, TrainState]:
  graphdef, params, model_state = split_model(model)
  state = {"params": params, "opt_state": tx.init(params), "model_state": model_state,
           "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(seed))}
  return graphdef, state


def abstract_train_state(config) -> TrainState:
  """The train state of a full config as jax.ShapeDtypeStructs (nothing computed): what a checkpoint of a run
  with this config holds."""
  make_model = lambda: build_model(config.model, seed=config.train.seed)
  tx = make_optimizer(config.train, nnx.eval_shape(make_model))
  return jax.eval_shape(lambda: init_train_state(make_model(), tx, config.train.seed)[1])


def create_train_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, seed: int,
                       mesh: Mesh | None = None) -> tuple[Any, TrainState, Any]:
  """(graphdef, state, state shardings): the model built and its optimizer state initialised inside one jit.

  With a mesh, the jit's out_shardings come from the abstract state (`jax.eval_shape`, no arrays) through the
  logical-axis rules, so XLA computes each device's shards in place: no parameter or moment is ever whole on one
  device, which is what lets a model that only fits split over the mesh start at all. The random draws are the
  same whatever the mesh (JAX's threefry is partitionable), so every mesh starts from the same weights.
  Without a mesh: the same jit on the default device, and shardings None.
  """
  def init():
    return init_train_state(make_model(), tx, seed)[1]

  graphdef = split_model(nnx.eval_shape(make_model))[0]
  if mesh is None:
    return graphdef, jax.jit(init)(), None
  shardings = sharding_lib.state_shardings(jax.eval_shape(init), mesh)
  return graphdef, jax.jit(init, out_shardings=shardings)(), shardings


def _merge(graphdef, params, model_state, mesh: Mesh | None):
  """The model, told where it runs when the mesh has more than one device (see layers/partitioning.py)."""
  model = nnx.merge(graphdef, params, model_state)
  if mesh is not None:
    model.set_mesh_axes(sharding_lib.mesh_axes(mesh, model.config))
  return model


@dataclasses.dataclass(frozen=True)
class MoEBalancing:
  """The three MoE balancing schemes, each off at 0 (see train.moe_* in superlm_jax/config.py)."""
  aux_loss_coef: float = 0.0  # Switch load-balancing loss weight (alpha)
  z_loss_coef: float = 0.0  # router z-loss weight (beta)
  bias_update_rate: float = 0.0  # aux-loss-free bias step (gamma)

  @classmethod
  def from_config(cls, train_cfg) -> "MoEBalancing":
    return cls(train_cfg.moe_aux_loss_coef, train_cfg.moe_z_loss_coef, train_cfg.moe_bias_update_rate)


def _moe_terms(stats: list[dict]) -> dict:
  """Router statistics of all MoE layers -> layer-averaged losses (the seed summed them over 30 layers, which
  made its 'stable aux loss' a constant floor) and per-layer loads/MaxVio/entropy for logging."""
  loads = jnp.stack([s["load"] for s in stats])  # [moe_layers, experts]
  mean = loads.mean(-1, keepdims=True)
  return {
      "moe_aux_loss": jnp.mean(jnp.stack([s["load_balancing_loss"] for s in stats])),
      "moe_z_loss": jnp.mean(jnp.stack([s["z_loss"] for s in stats])),
      "moe_entropy": jnp.mean(jnp.stack([s["entropy"] for s in stats])),
      "moe_dropped": jnp.mean(jnp.stack([s["dropped"] for s in stats])),
      "moe_load": loads,
      "moe_max_violation": ((loads.max(-1, keepdims=True) - mean) / mean)[:, 0],  # per layer
  }


def _packing(batch: dict) -> dict:
  """The model's `positions` / `segments` arguments from a batch of packed documents ({} for plain windows)."""
  return {"positions": batch.get("positions"), "segments": batch.get("segments")}


def make_train_step(graphdef, tx: optax.GradientTransformation, *, label_smoothing: float = 0.0,
                    moe: MoEBalancing = MoEBalancing(), mesh: Mesh | None = None,
                    state_shardings: Any = None, loss_chunk_size: int = 0) -> Callable:
  """Returns step(state, batch) -> (state, metrics), batch arrays shaped [accum, micro_batch, seq]: "inputs" and
  "targets", and for packed documents (data.packing) "positions" and "segments" too.

  The output head and the loss are fused (`training.loss.head_cross_entropy`, `loss_chunk_size` tokens at a
  time), so the [tokens, vocab] logits never exist whole.

  With `mesh` and `state_shardings` (from `create_train_state`), the step is jitted with those shardings for
  the state in and out, the batch split by rows over the mesh's batch axes (`sharding.batch_sharding`), and
  replicated metrics; the model runs with `sharding.mesh_axes(mesh)`.

  Gradient accumulation happens inside the step (a `lax.scan` over the accum axis), so one call is one optimizer
  step: the gradient is the mean over all micro-batches, clipped once, and the LR schedule advances once. (The
  seed clipped every micro-step and stepped its schedule per micro-batch.)

  MoE models add alpha * load-balancing loss + beta * z-loss (layer means) to the cross-entropy, and after the
  optimizer update move each layer's routing bias by gamma * sign(mean load - load) using this step's load.
  """

  def loss_fn(params, model_state, micro_batch):
    model = _merge(graphdef, params, model_state, mesh)
    hidden, stats = forward_with_moe_stats(model, micro_batch["inputs"], **_packing(micro_batch))
    loss, nll = head_cross_entropy(hidden, model.output_head(), micro_batch["targets"],
                                   label_smoothing=label_smoothing, chunk_size=loss_chunk_size)
    terms = _moe_terms(stats) if stats else {}
    if terms:
      loss = loss + moe.aux_loss_coef * terms["moe_aux_loss"] + moe.z_loss_coef * terms["moe_z_loss"]
    return loss, (nll, terms)

  # Differentiated with respect to the model state too (its gradient is dropped): nnx.scan (model.scan_layers)
  # requires every variable of a stacked block to live at one trace level, so the router biases must be traced
  # by the same transform as the parameters. They only steer top-k selection, so their gradient is zero.
  value_and_grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True, allow_int=True)

  def grad_fn(params, model_state, micro_batch):
    out, (grads, _) = value_and_grads(params, model_state, micro_batch)
    return out, grads

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    params, model_state = state["params"], state["model_state"]

    def accumulate(carry, micro_batch):
      grads_sum, loss_sum, nll_sum, terms_sum = carry
      (loss, (nll, terms)), grads = grad_fn(params, model_state, micro_batch)
      return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, nll_sum + nll,
              jax.tree.map(jnp.add, terms_sum, terms)), None

    accum = batch["inputs"].shape[0]
    first = jax.tree.map(lambda x: x[0], batch)
    terms_shape = jax.eval_shape(lambda: grad_fn(params, model_state, first)[0][1][1])
    zeros = (jax.tree.map(jnp.zeros_like, params), 0.0, 0.0,
             jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), terms_shape))
    (grads, loss, nll, terms), _ = jax.lax.scan(accumulate, zeros, batch)
    grads = jax.tree.map(lambda g: g / accum, grads)
    terms = jax.tree.map(lambda t: t / accum, terms)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    if terms and moe.bias_update_rate:
      model = nnx.merge(graphdef, params, model_state)
      update_balance_biases(model, terms["moe_load"], moe.bias_update_rate)
      model_state = nnx.split(model, nnx.Param, ...)[2]
    new_state = dict(state, params=params, opt_state=opt_state, model_state=model_state, step=state["step"] + 1)
    metrics = {"loss": loss / accum, "nll": nll / accum, "grad_norm": optax.global_norm(grads), **terms}
    return new_state, metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  batch_sharding = sharding_lib.batch_sharding(mesh, ndim=3, batch_dim=1)
  return jax.jit(step, donate_argnums=0, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())))


def make_eval_step(graphdef, mesh: Mesh | None = None, loss_chunk_size: int = 0) -> Callable:
  """Returns eval(params, model_state, batch) -> summed token NLL (float32) of a [batch, seq] batch (with
  "positions" and "segments" for packed documents).

  With `mesh`, a batch whose rows split over the mesh's batch shards runs split (`sharding.mesh_axes`); any
  other (a last, smaller validation batch) runs whole on every device under XLA's automatic partitioning.
  """

  def eval_step(params, model_state, batch):
    rows_split = mesh is not None and batch["inputs"].shape[0] % sharding_lib.batch_shards(mesh) == 0
    model = _merge(graphdef, params, model_state, mesh if rows_split else None)
    hidden, _ = model.hidden(batch["inputs"], **_packing(batch))
    _, nll = head_cross_entropy(hidden, model.output_head(), batch["targets"], chunk_size=loss_chunk_size)
    return nll * batch["targets"].size

  return jax.jit(eval_step)
