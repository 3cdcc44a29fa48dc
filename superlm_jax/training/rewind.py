"""Resuming from an older checkpoint than the latest (train.resume_step), e.g. the last good one before a divergence.

`--config.train.resume_step=N` restores step N (a one-line error names the available steps if there is none). The
checkpoints after N belong to the branch being abandoned, and they cannot stay where they are: Orbax never saves a
step at or below its latest one, so the new run's saves would silently be skipped, and a crash of the new run would
resume the old branch. They are therefore moved, not deleted, to ``<workdir>/checkpoints.after-N/`` (``.2``, ``.3``
... if that exists): moving them back returns to that branch. The records metrics.jsonl and TensorBoard hold after N
are dropped, as on every resume (training.metrics.MetricsLogger's purge_step).

Resuming from the latest checkpoint (resume_step 0) when it cannot be read (a corrupt or truncated file) falls back to
the newest readable one with a one-line warning, and the unreadable ones after it go aside as above; an explicit
resume_step that cannot be read is an error.
"""

from __future__ import annotations

import shutil
from typing import Callable, TypeVar

import jax

from superlm_jax import checkpoint as ckpt_lib

T = TypeVar("T")


def resume_step(checkpointer: ckpt_lib.Checkpointer, requested: int) -> int | None:
  """The step to resume from: `requested` (0: the latest; None when there is no checkpoint at all)."""
  if requested:
    return checkpointer.resolve_step(int(requested))  # UserError naming the available steps.
  return checkpointer.latest_step()


def restore(checkpointer: ckpt_lib.Checkpointer, step: int, requested: int,
            read: Callable[[int], T]) -> tuple[int, T]:
  """(step, read(step)) for `step` from `resume_step(checkpointer, requested)`: `requested` (non-zero) is read or
  fails; the latest is read or, if unreadable, the newest readable one (Checkpointer.first_readable)."""
  if requested:
    return step, read(step)
  return checkpointer.first_readable(read)


def set_aside_later(checkpointer: ckpt_lib.Checkpointer, step: int,
                    reopen: Callable[[], ckpt_lib.Checkpointer]) -> ckpt_lib.Checkpointer:
  """Moves the checkpoints after `step` out of the checkpoint directory (see the module docstring) and returns the
  checkpointer to save with from now on (`reopen()`, which sees the directory as it is now), or `checkpointer`
  itself when there is nothing after `step`."""
  later = [s for s in checkpointer.all_steps() if s > step]
  if not later:
    return checkpointer
  checkpointer.wait()
  checkpointer.close()
  if jax.process_index() == 0:  # One process moves (the directory is shared); the others wait for it.
    directory = checkpointer.directory
    aside, suffix = directory.with_name(f"{directory.name}.after-{step}"), 2
    while aside.exists():
      aside, suffix = directory.with_name(f"{directory.name}.after-{step}.{suffix}"), suffix + 1
    aside.mkdir(parents=True)
    for s in later:
      shutil.move(str(directory / str(s)), str(aside / str(s)))
    print(f"Resuming from step {step}, before the latest checkpoint: moved the later checkpoints "
          f"({', '.join(map(str, later))}) to {aside}.")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # Multi-process runs only.
    multihost_utils.sync_global_devices(f"superlm_jax:rewind:{step}")
  return reopen()
