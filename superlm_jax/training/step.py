"""The jitted train and eval steps, as pure functions of an explicit train state.

The model is split once into a static graph definition and array pytrees (`nnx.split`), so the step is a plain
`jax.jit` function of arrays: it compiles once, donates the old state, and takes explicit shardings when a mesh
is used (see `superlm_jax.sharding`).

Train state (the one thing checkpoints hold): ``{"params", "opt_state", "model_state", "step", "rng"}``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from superlm_jax.training.loss import cross_entropy

TrainState = dict[str, Any]


def split_model(model: nnx.Module):
  """(graphdef, params, model_state): trainable parameters and every other variable (e.g. MoE routing biases)."""
  return nnx.split(model, nnx.Param, ...)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> tuple[Any, TrainState]:
  graphdef, params, model_state = split_model(model)
  state = {"params": params, "opt_state": tx.init(params), "model_state": model_state,
           "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(seed))}
  return graphdef, state


def make_train_step(graphdef, tx: optax.GradientTransformation, *, label_smoothing: float = 0.0) -> Callable:
  """Returns step(state, batch) -> (state, metrics), batch arrays shaped [accum, micro_batch, seq].

  Gradient accumulation happens inside the step (a `lax.scan` over the accum axis), so one call is one optimizer
  step: the gradient is the mean over all micro-batches, clipped once, and the LR schedule advances once. (The
  seed clipped every micro-step and stepped its schedule per micro-batch.)
  """

  def loss_fn(params, model_state, micro_batch):
    model = nnx.merge(graphdef, params, model_state)
    logits = model(micro_batch["inputs"])
    return cross_entropy(logits, micro_batch["targets"], label_smoothing=label_smoothing)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    params, model_state = state["params"], state["model_state"]

    def accumulate(carry, micro_batch):
      grads_sum, loss_sum, nll_sum = carry
      (loss, nll), grads = grad_fn(params, model_state, micro_batch)
      return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, nll_sum + nll), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss, nll), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), batch)
    accum = batch["inputs"].shape[0]
    grads = jax.tree.map(lambda g: g / accum, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = dict(state, params=optax.apply_updates(params, updates), opt_state=opt_state,
                     step=state["step"] + 1)
    metrics = {"loss": loss / accum, "nll": nll / accum, "grad_norm": optax.global_norm(grads)}
    return new_state, metrics

  return jax.jit(step, donate_argnums=0)


def make_eval_step(graphdef) -> Callable:
  """Returns eval(params, model_state, batch) -> summed token NLL (float32) of a [batch, seq] batch."""

  def eval_step(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state)
    _, nll = cross_entropy(model(batch["inputs"]), batch["targets"])
    return nll * batch["targets"].size

  return jax.jit(eval_step)
