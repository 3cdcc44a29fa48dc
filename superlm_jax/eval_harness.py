"""`python -m superlm_jax.eval_harness` (console script `superlm-lm-eval`): lm-evaluation-harness's own CLI with
the "superlm_jax" model type registered.

    python -m superlm_jax.eval_harness --model superlm_jax --model_args checkpoint=runs/tiny \\
        --tasks hellaswag --batch_size 8

lm-eval 0.4.13 looks model types up only in its own table (lm_eval/models/__init__.py's MODEL_MAPPING) and loads
no plugins, so a bare `lm_eval --model superlm_jax` cannot find ours: this wrapper imports the adapter
(interop/lm_eval_harness.py), which registers it, then hands the command line to lm-eval unchanged. Every flag,
subcommand (`ls tasks`, `validate`) and output is lm-eval's. What would otherwise end in a traceback for a user's
mistake (an unknown task or model type, a bad model_arg, a missing run directory) ends in one `error:` line.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from superlm_jax.errors import UserError

_INSTALL_HINT = 'lm-evaluation-harness is not installed: pip install "superlm_jax[eval]"'


def _fail(message: str) -> NoReturn:
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(1)


def _user_line(error: ValueError) -> str | None:
  """The one line for lm-eval's ValueErrors that are the user's to fix (its CLI raises them as tracebacks)."""
  message = str(error)
  if message.startswith("Tasks not found:"):
    names = message.split(":", 1)[1].strip()
    return (f"lm-eval does not know the task(s) {names} (`python -m superlm_jax.eval_harness ls tasks` lists them; "
            "a local task directory needs --include_path DIR)")
  if message.startswith("Attempted to load model"):
    return message.split(" Supported model names:")[0] + " (this CLI adds the model type superlm_jax)"
  if message.startswith("No tasks specified"):
    return message
  return None


def main(argv: list[str] | None = None) -> None:
  """Runs lm-eval's CLI on `argv` (default: sys.argv[1:])."""
  try:
    from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    missing = (e.name or "lm_eval").split(".")[0]
    _fail(_INSTALL_HINT if missing == "lm_eval" else f'lm-evaluation-harness could not be imported ({e}): '
          'pip install "superlm_jax[eval]"')
  import superlm_jax.interop.lm_eval_harness  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

  saved_argv = sys.argv
  if argv is not None:
    sys.argv = [sys.argv[0], *argv]  # lm-eval's parser reads sys.argv (and inserts `run` when no subcommand)
  try:
    cli_evaluate()
  except UserError as e:
    _fail(str(e))
  except ValueError as e:
    line = _user_line(e)
    if line is None:
      raise
    _fail(line)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  finally:
    sys.argv = saved_argv


def cli() -> None:
  """The `superlm-lm-eval` console script (pyproject.toml): the same program as `python -m superlm_jax.eval_harness`."""
  main()


if __name__ == "__main__":
  cli()
