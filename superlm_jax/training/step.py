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

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from superlm_jax import sharding as sharding_lib
from superlm_jax.models.spec import ModelSpec
from superlm_jax.models.transformer import (abstract_model, build_model, forward_with_moe_stats, mtp_targets,
                                            with_options)
from superlm_jax.training.loss import head_cross_entropy
from superlm_jax.training import nonfinite as nonfinite_lib
from superlm_jax.training.moe_balancing import MoEBalancing, moe_terms, update_router_biases
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
  spec = ModelSpec.from_config(config.model, config.train.compute_dtype)
  tx = make_optimizer(config.train, abstract_model(spec))
  return jax.eval_shape(lambda: init_train_state(build_model(spec, seed=config.train.seed), tx,
                                                 config.train.seed)[1])


def merge_on_mesh(graphdef, params, model_state, mesh: Mesh | None = None) -> nnx.Module:
  """The model of `graphdef` with these weights, running across `mesh` (its `RuntimeOptions.mesh_axes`, given at
  merge time: the residual stream pinned to the batch axes, MoE dispatch across devices; see
  layers/partitioning.py). None or a one-device mesh: the plain single-device program. Called inside jitted
  steps: the graph definition on the mesh is built once per trace, from abstract shapes."""
  model = nnx.merge(graphdef, params, model_state)
  axes = None if mesh is None else sharding_lib.mesh_axes(mesh, model.spec)
  if axes == model.options.mesh_axes:
    return model
  return with_options(model, model.options.replace(mesh_axes=axes))


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


def _packing(batch: dict) -> dict:
  """The model's `positions` / `segments` arguments from a batch of packed documents ({} for plain windows)."""
  return {"positions": batch.get("positions"), "segments": batch.get("segments")}


def make_train_step(graphdef, tx: optax.GradientTransformation, *, label_smoothing: float = 0.0,
                    moe: MoEBalancing = MoEBalancing(), mesh: Mesh | None = None,
                    state_shardings: Any = None, loss_chunk_size: int = 0, nonfinite: str | None = None,
                    max_skipped: int = 10, mtp_loss_weight: float = 0.0) -> Callable:
  """Returns step(state, batch) -> (state, metrics), batch arrays shaped [accum, micro_batch, seq]: "inputs" and
  "targets", and for packed documents (data.packing) "positions" and "segments" too.

  The output head and the loss are fused (`training.loss.head_cross_entropy`, `loss_chunk_size` tokens at a
  time), so the [tokens, vocab] logits never exist whole.

  With `mesh` and `state_shardings` (from `create_train_state`), the step is jitted with those shardings for
  the state in and out, the batch split by rows over the mesh's batch axes (`sharding.batch_sharding`), and
  replicated metrics; the model runs across the mesh (`merge_on_mesh`).

  Gradient accumulation happens inside the step (a `lax.scan` over the accum axis), so one call is one optimizer
  step: the gradient is the mean over all micro-batches, clipped once, and the LR schedule advances once. (The
  reference project clipped every micro-step and stepped its schedule per micro-batch.)

  `nonfinite` ("stop" | "skip", train.nonfinite) guards every update: the state must then carry
  `state["guard"]` (`training.nonfinite.initial_guard`), a non-finite loss or gradient norm leaves the weights and
  optimizer state as they were, and the guard's counters say what happened (see training/nonfinite.py). None: no
  check (benchmarks and unit tests that call the step directly).

  MoE models add alpha * load-balancing loss + beta * z-loss (layer means) to the cross-entropy, and after the
  optimizer update move each layer's routing bias by gamma * sign(mean load - load) using this step's load.

  Models with MTP modules (model.mtp_depth = D > 0) add lambda / D * sum_k CE_k (`mtp_loss_weight`, DeepSeek-V3
  eq. 25), each module's cross-entropy through the shared head; the metrics' "mtp_nll" holds the D NLLs.
  """

  def loss_fn(params, model_state, micro_batch):
    model = merge_on_mesh(graphdef, params, model_state, mesh)
    packing = _packing(micro_batch)
    hidden, stats = forward_with_moe_stats(model, micro_batch["inputs"], **packing)
    head, targets = model.output_head(), micro_batch["targets"]
    loss, nll = head_cross_entropy(hidden, head, targets, label_smoothing=label_smoothing, chunk_size=loss_chunk_size)
    terms = moe_terms(stats)
    loss = loss + moe.loss(terms)
    if model.mtp is not None:
      mtp_losses, mtp_nlls = [], []
      for k, h in enumerate(model.mtp_hidden(hidden, targets, **packing), start=1):
        labels, mask = mtp_targets(targets, k, packing["segments"])
        mtp_loss, mtp_nll = head_cross_entropy(h, head, labels, label_smoothing=label_smoothing, mask=mask,
                                               chunk_size=loss_chunk_size)
        mtp_losses.append(mtp_loss)
        mtp_nlls.append(mtp_nll)
      loss = loss + mtp_loss_weight / len(mtp_losses) * sum(mtp_losses)
      terms = {**terms, "mtp_nll": jnp.stack(mtp_nlls)}
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
    if "moe_load" in terms and moe.bias_update_rate:
      spec = nnx.merge(graphdef, params, model_state).spec  # static: no computation
      model_state = update_router_biases(model_state, terms["moe_load"], moe.bias_update_rate, spec)
    new_state = dict(state, params=params, opt_state=opt_state, model_state=model_state, step=state["step"] + 1)
    metrics = {"loss": loss / accum, "nll": nll / accum, "grad_norm": optax.global_norm(grads), **terms}
    if nonfinite is not None:
      new_state = nonfinite_lib.guarded_update(state, new_state, metrics["loss"], metrics["grad_norm"],
                                               policy=nonfinite, max_skipped=max_skipped)
    return new_state, metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  batch_sharding = sharding_lib.batch_sharding(mesh, ndim=3, batch_dim=1)
  if nonfinite is not None:  # The guard's counters are replicated scalars (a sharding prefix of its subtree).
    state_shardings = {**state_shardings, nonfinite_lib.GUARD_KEY: NamedSharding(mesh, P())}
  return jax.jit(step, donate_argnums=0, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())))
