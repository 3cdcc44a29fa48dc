"""Train a model: ``python -m superlm_jax.train --config=configs/gpt2_small.py:tiny [--config.train.steps=500]``.

Prepares the data if needed (tokenizer + token arrays), trains, evaluates, samples and checkpoints into
``config.train.workdir``. Running the same command again resumes from the latest checkpoint.

Every device of every process is used, laid out by ``--config.mesh.*`` (superlm_jax/sharding.py). Several
processes (hosts of a TPU slice, GPU nodes under SLURM) join one JAX system when the environment says they are
several, or with ``--distributed``; launch/ has the scripts.
"""

from __future__ import annotations

import math

from absl import flags
from ml_collections import config_flags

from superlm_jax.cli import run_main

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model family config file, e.g. configs/gpt2_small.py:tiny.",
                                          lock_config=True)
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (one process of several: Cloud TPU VM workers, SLURM "
    "tasks, MPI ranks). Default: only when the environment shows a multi-process launch (see "
    "superlm_jax.sharding.distributed_requested); --nodistributed never.")


def main(argv):
  del argv
  from superlm_jax import config as config_lib
  config = _CONFIG.value
  if config is None:
    from superlm_jax.errors import UserError
    raise UserError("--config is required, e.g. --config=configs/gpt2_small.py:tiny")
  # Every range and consistency check that needs no device, before JAX starts and before anything is written. A warm
  # start replaces the model section with its checkpoint's (training/loop.py validates the result), so only the
  # ranges are checked here then.
  if config.train.init_from:
    config_lib.check_ranges(config)
  else:
    config_lib.validate(config, backend=False)
  from superlm_jax.training.loop import train  # Imported here so flag and config errors print before JAX starts.
  from superlm_jax import sharding
  sharding.initialize_distributed(_DISTRIBUTED.value)  # Before anything touches a device.
  result = train(config, progress=not _QUIET.value)
  if result.interrupted_by:  # Saved and said where; SIGTERM was asked for (0), Ctrl-C keeps the shell's 128 + 2.
    raise SystemExit(130 if result.interrupted_by == "SIGINT" else 0)
  print(f"Done: {result.workdir}: validation loss {result.val_loss:.4f} nats/token "
        f"(perplexity {math.exp(min(result.val_loss, 50)):.1f}); unigram baseline {result.unigram_loss:.4f}.")


def cli() -> None:
  """The `superlm-train` console script (pyproject.toml): the same program as `python -m superlm_jax.train`."""
  run_main(main)


if __name__ == "__main__":
  cli()
