"""Errors that are the user's to fix, not the program's.

`superlm_jax.cli.run_main` prints these as a single ``error: ...`` line and exits with status 1, because a
traceback for "you forgot to run `make corpus`" buries the one sentence the user needs. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class UserError(ValueError):
  """A bad input (config value, path, missing prepared data) described in one line that says how to fix it.

  It subclasses ValueError so code that already catches ValueError for bad values keeps working.
  """


def free_space(path: str | os.PathLike) -> str:
  """'12.3 MiB free on /mnt' for the nearest existing parent of `path` (the file itself may never have been made,
  or its folder may have vanished), or "" when even that cannot be measured: for messages about a full disk."""
  where = Path(path).absolute()
  while not where.exists() and where != where.parent:
    where = where.parent
  try:
    free = float(shutil.disk_usage(where).free)
  except OSError:
    return ""
  units = ["B", "KiB", "MiB", "GiB", "TiB"]
  while free >= 1024 and len(units) > 1:
    free /= 1024
    units.pop(0)
  return f"{free:.1f} {units[0]} free on {where}"
