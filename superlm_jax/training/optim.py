"""AdamW with warmup + cosine LR and matrix-only weight decay (gradient accumulation lives in the train step).

The optimizer is one `optax.GradientTransformation` that works both with `nnx.Optimizer(model, tx,
wrt=nnx.Param)` and with a pure functional step that calls `tx.init` / `tx.update` on the param state of
`nnx.split` (Variable leaves), on `nnx.as_pure(...)` of it, or on `nnx.to_pure_dict(...)` of it.

Gradient accumulation is not done here: the train step (training/step.py) sums the gradients of its micro-batches
in a `lax.scan` and calls `tx.update` once per optimizer step, so
  * clipping sees the accumulated (averaged) gradient once per optimizer step, not each micro-batch, and
  * the LR schedule and Adam's bias correction count optimizer steps, not micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

# Logical axis names that mark an embedding table (token or learned position); these are not decayed.
_EMBEDDING_AXES = frozenset({"vocab", "position"})


def lr_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup 0 -> learning_rate over `warmup_steps`, cosine to learning_rate * min_lr_ratio at `steps`.

  Counted in optimizer steps. optax evaluates a schedule at the count of updates already applied (0 for the
  first update), so the plain optax schedule would spend the first update at LR 0 and reach the minimum one
  step after training ends. We evaluate it at count + 1 instead (as nanoGPT does): update n (1-based) uses
  the LR at n, so update 1 uses learning_rate / warmup_steps, update `warmup_steps` the peak and update
  `steps` (the last) exactly learning_rate * min_lr_ratio. Beyond `steps` the LR stays at the minimum.
  """
  peak = float(train_cfg.learning_rate)
  warmup = max(int(train_cfg.warmup_steps), 0)
  # cosine_decay_schedule rejects a non-positive decay length; a run no longer than its warmup just ends
  # one step into the cosine.
  total = max(int(train_cfg.steps), warmup + 1)
  base = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total,
      end_value=peak * float(train_cfg.min_lr_ratio))
  return lambda count: base(count + 1)


def current_lr(train_cfg: ml_collections.ConfigDict, opt_step: int) -> float:
  """The LR of the update that follows `opt_step` completed optimizer steps (for logging)."""
  return float(lr_schedule(train_cfg)(opt_step))


def _axis_names(variable: nnx.Variable) -> set[str]:
  """Logical axis names of a Variable, from its `out_sharding` metadata (tuple or PartitionSpec)."""
  spec = variable.get_metadata().get("out_sharding")
  if spec is None:
    return set()
  spec = getattr(spec, "spec", spec)  # A NamedSharding carries its PartitionSpec in `.spec`.
  names = set()
  for entry in spec:  # An entry is None, one name, or a tuple of names sharded over several mesh axes.
    if isinstance(entry, str):
      names.add(entry)
    elif entry is not None:
      names.update(e for e in entry if isinstance(e, str))
  return names


def decay_mask(params_state: nnx.State, decay_all: bool = False) -> nnx.State:
  """True for the params that get weight decay, as a tree matching `params_state`.

  Our rule (decoupled decay, Loshchilov & Hutter 2019): the projection matrices of attention, MLPs and experts
  are decayed; vectors (norm scales, biases, SSMax scales) are not, and neither is any matrix with a 'vocab' or
  'position' axis: the token embedding, the learned position table AND the untied output head. This differs from
  nanoGPT, which decays every 2-D tensor including its (tied) embedding: a row of the embedding or the head is
  updated only when its token occurs (or, for the head, is the target), so decay would shrink rare tokens'
  rows towards zero between updates, which is a frequency-dependent constraint rather than a regulariser.
  A matrix without axis-name metadata counts as a plain matrix and is decayed.

  Args:
    params_state: `nnx.state(model, nnx.Param)`; its leaves are Variables carrying axis names in the
      `out_sharding` metadata.
    decay_all: decay every parameter (train.decay_all).
  """
  def decide(variable: nnx.Variable) -> bool:
    if decay_all:
      return True
    names = _axis_names(variable)
    # The scan layout's leading `layers` axis stacks per-layer tensors: a stack of norm scales is no matrix.
    matrix_ndim = variable.ndim - ("layers" in names)
    return matrix_ndim >= 2 and not (names & _EMBEDDING_AXES)

  return jax.tree.map(decide, params_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """A key path as strings, so State, nested dicts and int list indices (or their strings) compare equal."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def _mask_fn(mask_tree: nnx.State) -> Callable[[Any], Any]:
  """Turns a mask tree into a callable mask that optax.masked evaluates on whatever tree it receives.

  The metadata (axis names) exists only on the Variables of the model's state, but optax sees different
  trees: nnx.Optimizer calls tx.init on Variable leaves and tx.update on plain arrays (`nnx.as_pure`), and
  a functional step may pass a plain dict. Looking decisions up by key path works for all of them.
  """
  table = {_path_names(path): bool(m) for path, m in jax.tree_util.tree_flatten_with_path(mask_tree)[0]}

  def mask(tree):
    def lookup(path, _):
      names = _path_names(path)
      if names not in table:
        raise ValueError(f"weight-decay mask has no entry for parameter {'/'.join(names)}; build the "
                         "optimizer from the same model whose params it updates")
      return table[names]
    return jax.tree_util.tree_map_with_path(lookup, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))

  return mask


def make_optimizer(train_cfg: ml_collections.ConfigDict, model: nnx.Module) -> optax.GradientTransformation:
  """AdamW (Loshchilov & Hutter 2019) after global-norm clipping, with the weight-decay mask above.

  One `update` is one optimizer step. Gradient accumulation is not done here: the train step
  (`superlm_jax.training.step`) averages the micro-batch gradients first, so clipping sees the accumulated
  gradient once and the schedule counts optimizer steps (the reference project clipped every micro-batch).
  """
  mask = _mask_fn(decay_mask(nnx.state(model, nnx.Param), bool(train_cfg.decay_all)))
  parts = []
  if train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
  parts.append(optax.adamw(
      lr_schedule(train_cfg), b1=float(train_cfg.b1), b2=float(train_cfg.b2), eps=float(train_cfg.eps),
      weight_decay=float(train_cfg.weight_decay), mask=mask))
  return optax.chain(*parts)
