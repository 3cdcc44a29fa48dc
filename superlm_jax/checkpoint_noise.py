"""Orbax/TensorStore's noise around a failed checkpoint read or write, kept off the user's terminal.

When a save fails (full disk, read-only or vanished directory) or a restore fails (a corrupt chunk), the caller gets
one UserError from superlm_jax.checkpoint. Around it, Orbax and TensorStore report the same failure dozens of times:
absl ERROR logs from Orbax's background threads, asyncio's "Task exception was never retrieved" for every write
task, and "RuntimeError: Event loop is closed" tracebacks that TensorStore's threads print (through `sys.excepthook`)
when they finish after Orbax closed its event loop. The filters here drop exactly those, nothing else; the failure
itself is never hidden, because it is raised (checkpoint.Checkpointer.save / wait / check / restore).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
import warnings

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_FAILED_PATH = re.compile(r'Failed (?:writing|to open|to create|opening|reading)[^"]*"([^"]+)"')
_installed = False


def os_error_summary(error: BaseException) -> str | None:
  """"No space left on device: PATH" for an OSError anywhere in `error`'s chain, or for the errno TensorStore embeds
  in its messages (`[os_error_code='28']`); None when there is none."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      where = f": {seen.filename}" if seen.filename else ""
      return f"{seen.strerror or os.strerror(seen.errno)}{where}"
    seen = seen.__cause__ or seen.__context__
  text = str(error)
  code = _OS_ERROR_CODE.search(text)
  if code is None:
    return None
  path = _FAILED_PATH.search(text)
  return f"{os.strerror(int(code.group(1)))}{f': {path.group(1)}' if path else ''}"


def _from_orbax_or_tensorstore(tb) -> bool:
  return any("orbax" in frame.filename or "tensorstore" in frame.filename for frame in traceback.extract_tb(tb))


_TENSORSTORE_STATUS = re.compile(r"^[A-Z_]+: .*(OCDBT|local file|tensorstore)", re.DOTALL)


def _is_tensorstore_status(error: BaseException) -> bool:
  """A TensorStore failure set on a future from its C++ threads: a status-coded message, no Python traceback."""
  return bool(_TENSORSTORE_STATUS.search(str(error)))


class _OrbaxFailureFilter(logging.Filter):
  """Drops Orbax's ERROR records and asyncio's unretrieved-task reports of Orbax's writes: the failure they report
  is raised to the caller as one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "asyncio" and "exception was never retrieved" in record.getMessage():
      exc = record.exc_info[1] if record.exc_info else None
      return not (exc is not None and (_from_orbax_or_tensorstore(exc.__traceback__) or _is_tensorstore_status(exc)))
    if record.levelno >= logging.ERROR and "/orbax/" in (record.pathname or ""):
      return False
    return True


def _is_closed_loop_report(kind, value, tb) -> bool:
  frames = traceback.extract_tb(tb)
  return (kind is RuntimeError and str(value) == "Event loop is closed" and bool(frames)
          and frames[0].name == "call_soon_threadsafe")


def _drop_closed_loop_reports(previous_excepthook, previous_unraisablehook):
  """Hooks that drop TensorStore's report of finishing a read or write after Orbax closed its asyncio loop (it
  reports through whichever of the two hooks its binding uses) and pass everything else on."""
  def excepthook(kind, value, tb):
    if not _is_closed_loop_report(kind, value, tb):
      previous_excepthook(kind, value, tb)

  def unraisablehook(report):
    if not _is_closed_loop_report(report.exc_type, report.exc_value, report.exc_traceback):
      previous_unraisablehook(report)
  return excepthook, unraisablehook


def install() -> None:
  """Installs the filters once per process (idempotent); called by every Checkpointer."""
  global _installed
  if _installed:
    return
  _installed = True
  noise = _OrbaxFailureFilter()
  for name in ("asyncio", "absl"):  # A logger's filters see every record logged through it (Orbax logs via absl).
    logging.getLogger(name).addFilter(noise)
  sys.excepthook, sys.unraisablehook = _drop_closed_loop_reports(sys.excepthook, sys.unraisablehook)


def after_failure() -> None:
  """Called once a save or restore has failed (and been raised): the coroutines Orbax abandoned then warn "was never
  awaited" as the interpreter exits; the failure was reported, so those warnings go."""
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
