"""Writing a file so that a crash, a signal or a full disk never leaves half of it: the one way files other than
checkpoints (Orbax commits those by rename itself) are written in place."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str | os.PathLike, data: bytes | str, *, if_changed: bool = False) -> None:
  """Writes `data` to a temporary file beside `path`, flushed to disk, then renamed over `path` (a rename within a
  directory is atomic on POSIX). `if_changed`: leave a file that already holds `data` untouched (a plain resume
  rewrites nothing)."""
  path = Path(path)
  data = data.encode("utf-8") if isinstance(data, str) else data
  if if_changed and path.is_file() and path.read_bytes() == data:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
