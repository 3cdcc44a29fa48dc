"""Errors that are the user's to fix, not the program's.

`superlm_jax.cli.run_main` prints these as a single ``error: ...`` line and exits with status 1, because a
traceback for "you forgot to run `make corpus`" buries the one sentence the user needs. Anything else is a bug
and keeps its traceback.
"""


class UserError(ValueError):
  """A bad input (config value, path, missing prepared data) described in one line that says how to fix it.

  It subclasses ValueError so code that already catches ValueError for bad values keeps working.
  """
