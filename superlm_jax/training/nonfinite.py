"""The non-finite policy (train.nonfinite): a bad update is never applied, and the host looks only when it must.

Inside the jitted step (`training.step.make_train_step(..., nonfinite=...)`) every step computes
``finite = isfinite(loss) & isfinite(grad_norm)`` and selects the old params / optimizer state / model state with
`jnp.where` when it is False (XLA fuses the select into the update: no extra copy, no host round trip). A small
"guard" of int32 counters rides along in the train state (``state["guard"]``, replicated):

  in_a_row    non-finite steps in a row, up to this step
  total       non-finite (skipped) steps in all
  first_bad   the first step with a non-finite loss or gradient norm (0: none yet)
  stop_step   the step at which the policy says stop (0: not yet); from then on no update is applied, so the
              weights stay those of the last good step whenever the host gets round to looking

Policies: "stop" sets stop_step at the first non-finite step; "skip" drops each bad update and sets stop_step once
`train.max_skipped` steps in a row were bad. The loop reads the guard (`check`) on log steps, before every
checkpoint save and at the end, and stops there with one line naming the step: since a stopped state is frozen and
every save looks first, no checkpoint ever holds non-finite weights, and the checkpoints already written (the
latest and the best) are the finite ones the user resumes from (train.resume_step).

The counters are not part of the Orbax checkpoint (checkpoint.py stores the documented train-state keys): they go
into its JSON meta (`to_meta`) and come back from it on resume (`initial_guard`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from superlm_jax.errors import UserError

GUARD_KEY = "guard"
_FIELDS = ("in_a_row", "total", "first_bad", "stop_step")
# The train-state entries a dropped update leaves as they were (the step counter still advances: it counts batches).
_GUARDED = ("params", "opt_state", "model_state")


def initial_guard(meta: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
  """Counters at the start of a run: zeros, or those saved in a checkpoint's meta (`to_meta`). A resumed run starts
  unstopped: its checkpoint was written before any stop, and the user resumes it to try again."""
  saved = dict((meta or {}).get("nonfinite", {}))
  saved["stop_step"] = 0
  return {name: np.asarray(int(saved.get(name, 0)), np.int32) for name in _FIELDS}


def guarded_update(old_state: Mapping[str, Any], new_state: dict, loss: jax.Array, grad_norm: jax.Array, *,
                   policy: str, max_skipped: int) -> dict:
  """`new_state` with the update dropped (old params/opt_state/model_state kept) where it is not finite or the policy
  has already stopped, and the guard counters advanced. Traced inside the jitted step."""
  guard = old_state[GUARD_KEY]
  step = old_state["step"] + 1
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  stopped_before = guard["stop_step"] > 0
  apply = finite & ~stopped_before
  in_a_row = jnp.where(finite, 0, guard["in_a_row"] + 1).astype(jnp.int32)
  limit = 1 if policy == "stop" else max(int(max_skipped), 1)
  new_guard = {
      "in_a_row": in_a_row,
      "total": (guard["total"] + (~finite).astype(jnp.int32)).astype(jnp.int32),
      "first_bad": jnp.where((guard["first_bad"] == 0) & ~finite, step, guard["first_bad"]).astype(jnp.int32),
      "stop_step": jnp.where(~stopped_before & (in_a_row >= limit), step, guard["stop_step"]).astype(jnp.int32),
  }
  select = lambda new, old: jnp.where(apply, new, old)
  kept = {key: jax.tree.map(select, new_state[key], old_state[key]) for key in _GUARDED}
  return dict(new_state, **kept, guard=new_guard)


def read(state: Mapping[str, Any]) -> dict[str, int]:
  """The guard counters on the host (a tiny transfer that waits for the latest step)."""
  return {name: int(value) for name, value in jax.device_get(state[GUARD_KEY]).items()}


def to_meta(counters: Mapping[str, int]) -> dict[str, int]:
  """What a checkpoint's meta keeps of the counters (JSON)."""
  return {name: int(counters[name]) for name in ("in_a_row", "total", "first_bad")}


def check(counters: Mapping[str, int], *, policy: str, max_skipped: int, latest_checkpoint: int | None) -> None:
  """A one-line UserError when the policy says stop; nothing otherwise."""
  stop_step = counters["stop_step"]
  if not stop_step:
    return
  kept = (f"the latest checkpoint is step {latest_checkpoint}" if latest_checkpoint is not None
          else "no checkpoint was written")
  if policy == "stop":
    raise UserError(f"non-finite loss or gradient norm at step {stop_step} (train.nonfinite=stop); its update was "
                    f"dropped and nothing was saved after it ({kept}): lower train.learning_rate, or set "
                    "train.nonfinite=skip, or resume an earlier step with train.resume_step")
  first = stop_step - max(int(max_skipped), 1) + 1
  raise UserError(f"{max(int(max_skipped), 1)} non-finite steps in a row (steps {first}-{stop_step}, "
                  f"{counters['total']} skipped in all; train.nonfinite=skip, train.max_skipped={max_skipped}); "
                  f"nothing was saved after them ({kept}): lower train.learning_rate or resume an earlier step "
                  "with train.resume_step")


def without_guard(state: Mapping[str, Any]) -> dict:
  """The train state as checkpoints and callers know it (the documented keys)."""
  return {key: value for key, value in state.items() if key != GUARD_KEY}
