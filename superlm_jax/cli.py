"""Shared entry-point wrapper for the command-line tools (prepare, train, sample).

Every tool is an absl program with an ml_collections config flag. Mistakes a user makes on the command line
should end in one readable line on stderr and exit status 1, not a 40-line traceback; genuine bugs must keep
their traceback. `run_main` draws that line.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags, logging

from superlm_jax.errors import UserError

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


def run_main(main: Callable[[list[str]], None]) -> None:
  """Runs `main` under `absl.app.run`, turning user mistakes into `error: <message>` and exit code 1.

  Converted (everything else keeps its traceback): flag parsing errors including unknown config override keys
  and config files whose `get_config` raised (see `_parse_flags`); a `--config=FILE` that does not exist;
  `UserError` (and subclasses such as `CorpusError`) raised anywhere in `main`.
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
  except OSError as e:
    if not str(e).startswith(_CONFIG_LOAD_FAILURE):
      raise
    # The last line holds the cause, e.g. "[Errno 2] No such file or directory: 'configs/x.py'".
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    _fail(f"could not load the config file: {lines[-1]}")
