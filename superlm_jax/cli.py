"""Shared entry-point wrapper for the command-line tools (prepare, train, sample).

Every tool is an absl program with an ml_collections config flag. Mistakes a user makes on the command line
should end in one readable line on stderr and exit status 1, not a 40-line traceback; genuine bugs must keep
their traceback. `run_main` draws that line.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags, logging

from superlm_jax.errors import UserError, free_space

# ml_collections raises an OSError starting with this when `--config=FILE` could not be loaded (a missing
# file); the error surfaces only when `main` first reads the config, not while flags are parsed.
_CONFIG_LOAD_FAILURE = "Configuration is not available because of an earlier failure to load"


def _fail(message: str) -> NoReturn:
  # Collapse multi-line messages (ml_collections' "Did you mean" hints) so the error stays one line.
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(1)


def _override_flags(key: str, argv: Sequence[str]) -> list[str]:
  """The `--config.a.b=v` arguments whose path mentions `key` (the exception names only the missing key)."""
  found = []
  for arg in argv[1:]:
    if arg.startswith("--config."):
      path = arg[len("--config."):].split("=", 1)[0]
      if key in path.split("."):
        found.append(arg)
  return found


def _split_key_error(e: BaseException) -> tuple[str, str]:
  """(unknown key, optional hint) from ConfigDict's KeyError/AttributeError, whose texts are quoted reprs."""
  text = str(e.args[0]) if e.args else str(e)
  first, _, rest = text.partition("\n")
  return first.strip("'\""), rest.strip()


def _flag_error_line(e: flags.Error) -> str:
  """One line for an absl flag error.

  For a config file whose `get_config` raised (e.g. an unknown preset) absl embeds the whole traceback in the
  message; its last line ("ValueError: unknown preset 'x'; ...") is the part the user needs.
  """
  message = str(e)
  if "Traceback (most recent call last)" in message:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    flag = lines[0].split(":", 1)[0]  # "flag --config=configs/x.py:bogus"
    return f"{flag}: {lines[-1]}"
  return message


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, reporting errors as one `error:` line.

  Besides absl's own `flags.Error`, this catches an unknown key in a `--config.a.b=v` override, which
  ml_collections raises during parsing as a bare `AttributeError` (last key unknown: `--config.train.lrr=1`)
  or `KeyError` with a "Did you mean" hint (an intermediate key: `--config.trian.lr=1`). Both would otherwise
  escape absl as a traceback. Catching them only here keeps AttributeError/KeyError bugs in `main` loud.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(_flag_error_line(e))
  except (AttributeError, KeyError) as e:
    key, hint = _split_key_error(e)
    where = ", ".join(_override_flags(key, argv)) or "a --config override"
    _fail(f"unknown config key {key!r} in {where}" + (f" ({hint})" if hint else ""))


# OSErrors that describe the user's files (a path that is missing, a file where a directory should be, no permission,
# a full or read-only disk) rather than a bug: printed as one line naming the path.
_USER_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOENT", "ENOTDIR", "EISDIR", "EEXIST", "EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENAMETOOLONG",
    "ELOOP", "ENOTEMPTY", "EXDEV", "EMFILE", "EFBIG") if hasattr(errno, name))
_NO_SPACE = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT") if hasattr(errno, name))


def os_error_line(e: OSError) -> str | None:
  """The one line for an OSError caused by the user's files, or None for one that looks like a bug.

  Names the path (and the second path of a rename/copy) so the user knows which file to fix; for a full disk it
  adds the free space left where the file was going.
  """
  if e.errno not in _USER_ERRNOS:
    return None
  reason = e.strerror or errno.errorcode.get(e.errno, str(e.errno))
  paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
  line = f"{' -> '.join(paths)}: {reason}" if paths else reason
  if e.errno in _NO_SPACE:
    free = free_space(e.filename) if e.filename is not None else ""
    line += f" ({free}; free some space or write elsewhere)" if free else " (free some space or write elsewhere)"
  return line


def _broken_pipe() -> NoReturn:
  """stdout was closed by the reader (`... | head`): stop quietly with the shell's 128 + SIGPIPE.

  Python would otherwise print "Exception ignored ... BrokenPipeError" when it flushes stdout at exit, so stdout
  is pointed at /dev/null first.
  """
  try:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
  except (OSError, ValueError):
    pass
  os._exit(141)  # pylint: disable=protected-access (no atexit flush onto the closed pipe)


def run_main(main: Callable[[list[str]], None]) -> None:
  """Runs `main` under `absl.app.run`, turning user mistakes into `error: <message>` and exit code 1.

  Converted (everything else keeps its traceback): flag parsing errors including unknown config override keys
  and config files whose `get_config` raised (see `_parse_flags`); a `--config=FILE` that does not exist;
  `UserError` (and subclasses such as `CorpusError`) raised anywhere in `main`; an OSError about the user's
  files (missing path, not a directory, no permission, read-only or full disk: `os_error_line`) as one line naming
  the path. A closed stdout (`| head`) exits 141 without a word, Ctrl-C outside the training loop's own handler
  exits 130 with one line.
  """
  def quiet_main(argv):
    # Orbax and grain log every file they write at INFO; keep the console for progress and results unless the
    # user asked for more with --verbosity.
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    return main(argv)

  try:
    app.run(quiet_main, flags_parser=_parse_flags)
  except UserError as e:
    _fail(str(e))
  except BrokenPipeError:
    _broken_pipe()
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  except OSError as e:
    if str(e).startswith(_CONFIG_LOAD_FAILURE):
      # The last line holds the cause, e.g. "[Errno 2] No such file or directory: 'configs/x.py'".
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      _fail(f"could not load the config file: {lines[-1]}")
    line = os_error_line(e)
    if line is None:
      raise
    _fail(line)
