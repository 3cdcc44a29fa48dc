"""`train.profile_steps`: a `jax.profiler` trace of a few training steps, for finding where a step's time goes.

`"20,25"` traces steps 20 to 25 (inclusive) into `workdir/profile/`: an XPlane file (`*.xplane.pb`, for xprof or
TensorBoard's profile plugin: `pip install xprof; xprof --logdir=RUN/profile`) and a Chrome trace
(`*.trace.json.gz`, for https://ui.perfetto.dev). Trace steps after the first: the first one compiles.
docs/performance.md shows how to read one.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax

from superlm_jax.errors import UserError


def parse_profile_steps(value: str) -> tuple[int, int] | None:
  """"" -> None; "A,B" (or "A", one step) -> (A, B) with 1 <= A <= B; anything else is a one-line UserError."""
  if not value:
    return None
  parts = [p.strip() for p in str(value).split(",")]
  try:
    first, last = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
  except ValueError:
    first, last = 0, -1
  if not 1 <= first <= last:
    raise UserError(f"train.profile_steps={value!r} is not FIRST,LAST steps with 1 <= FIRST <= LAST (e.g. '20,25')")
  return first, last


class StepProfiler:
  """Starts a trace before step FIRST and stops it after step LAST has finished on the devices (only on process 0:
  one trace per run)."""

  def __init__(self, profile_steps: str, workdir: str | pathlib.Path, log=print):
    self.steps = parse_profile_steps(profile_steps)
    self.directory = pathlib.Path(workdir) / "profile"
    self.log = log
    self.active = False

  def before(self, step: int) -> None:
    if self.steps is not None and step == self.steps[0] and jax.process_index() == 0:
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory))
      self.active = True

  def after(self, step: int, state: Any) -> None:
    if self.active and step >= self.steps[1]:
      jax.block_until_ready(state)  # The trace must hold the step's device work, not only its dispatch.
      self.stop(f"steps {self.steps[0]}-{step}")

  def stop(self, what: str = "the steps so far") -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      self.log(f"profile of {what} written to {self.directory} (xprof --logdir={self.directory}, or "
               f"the *.trace.json.gz in https://ui.perfetto.dev)")
