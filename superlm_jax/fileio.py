"""Small files: written so that a crash, a signal or a full disk never leaves half of one (the one way files other
than checkpoints, which Orbax commits by rename itself, are written in place), and JSON objects read with a one-line
error naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from superlm_jax.errors import UserError


def read_json_object(path: str | os.PathLike) -> dict | None:
  """The JSON object in `path`, None when there is no such file, or a one-line UserError naming the file when it
  is not a JSON object."""
  path = Path(path)
  if not path.is_file():
    return None
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not JSON ({' '.join(str(e).split())[:200]})") from None
  if not isinstance(value, dict):
    raise UserError(f"{path} is not a JSON object")
  return value


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
