"""Stopping cleanly on SIGTERM / SIGINT: finish the step, save a checkpoint, exit; a second signal exits at once.

`train()` runs inside `StopSignals()`. The first SIGTERM (a preemption notice, `kill`, SLURM's `scancel`, Kubernetes
shutting a pod down) or SIGINT (Ctrl-C) only sets a flag; the loop looks after every step (`agreed_stop`), saves
that step synchronously with the data-iterator position, prints where, and returns; `python -m superlm_jax.train`
then exits 0 after SIGTERM (the job scheduler asked for it) and 130 = 128 + SIGINT after Ctrl-C, the shell's
convention. Running the same command resumes bit-identically.

A second signal while that happens (a save taking too long, an impatient Ctrl-C) prints one line and leaves with
`os._exit(128 + signum)`: no Python cleanup, no half-committed checkpoint. Orbax writes a step into a temporary
directory and renames it only when complete, so the previous checkpoints stay intact and the next run removes the
temporary directory. Python runs signal handlers between bytecodes of the main thread: inside one long native call
(compiling the step, a blocking device transfer) the handler runs when that call returns.

Several processes (multi-host): each process gets its own signal, maybe only one of them (a single preempted VM), at
different steps, and all must save the same step or the checkpoint is never committed (Orbax's save is a collective).
`agreed_stop` therefore ORs the flags of all processes with `multihost_utils.process_allgather`, a small collective
that waits for the devices, and does so only every `every` steps at the same step numbers on every process; the loop
uses train.log_every, where the host already waits for the step's metrics, so a stop lands within log_every steps
and costs nothing in between. One process: the local flag, every step, free.

The alternative is JAX's preemption sync manager, which Orbax wraps as `CheckpointManager.reached_preemption(step)`:
`jax.experimental.multihost_utils.reached_preemption_sync_point(step)` agrees through the coordination service, host
only, every step, on the step at which every process saves. It only exists after `jax.distributed.initialize()`
(not in a single-process run), reacts to SIGTERM caught by JAX's own native handler, not to SIGINT, and on some
platforms needs the preemption service enabled; one mechanism for all cases is simpler to test.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import numpy as np

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _write_line(text: str) -> None:
  # os.write, not print: a handler can interrupt a print in progress, and re-entering a buffered stream raises.
  os.write(2, (text + "\n").encode())


class StopSignals:
  """A context manager that turns the first SIGTERM/SIGINT into a flag (`received`, the signal's name) and a second
  one into an immediate exit. Previous handlers come back on exit. Outside the main thread (where Python cannot set
  handlers) it does nothing: the signals keep their default behaviour."""

  def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
    self._signals = signals
    self._previous: dict[int, Any] = {}
    self.received: str | None = None

  def _handle(self, signum: int, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.received is None:
      self.received = name
      _write_line(f"{name} received: finishing this step and saving a checkpoint; send it again to exit at once "
                  "without saving.")
      return
    _write_line(f"{name} received again: exiting without saving (the previous checkpoints are intact).")
    os._exit(128 + signum)

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for signum in self._signals:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()


def agreed_stop(received: str | None, step: int, every: int = 1) -> str | None:
  """The signal every process stops for after `step`, or None.

  One process: its own flag, every step. Several: the flags of all processes at each step that is a multiple of
  `every` (every process calls this at the same steps with the same `every`), None at the others; the name is that
  of the lowest-numbered signal received anywhere (SIGINT before SIGTERM), the same on every process.
  """
  if jax.process_count() == 1:
    return received
  if step % max(int(every), 1):
    return None
  from jax.experimental import multihost_utils  # Multi-process runs only.

  local = np.int32(0 if received is None else signal.Signals[received].value)
  flags = np.asarray(multihost_utils.process_allgather(local)).reshape(-1)
  raised = [int(f) for f in flags if f]
  return signal.Signals(min(raised)).name if raised else None
