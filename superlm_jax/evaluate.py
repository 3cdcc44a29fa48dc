"""Perplexity and bits per byte of a run on a corpus:

  python -m superlm_jax.evaluate --checkpoint=runs/gpt2_tiny --data=shakespeare [--max_length=128 --stride=64]

`--data` is any corpus the data layer reads (`shakespeare`, a .txt or .jsonl file, a directory of them,
`tfds:NAME[/CONFIG][:SPLIT]`), tokenized with the run's own tokenizer and joined as training joins documents. The
windows are those of Hugging Face's perplexity guide (superlm_jax/evaluation/perplexity.py), so a converted
checkpoint gets the perplexity `transformers` gives it. Prints one summary line and writes a JSON report (default
RUN/eval/<data>-step<step>.json).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path

from absl import flags

from superlm_jax.cli import run_main

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory written by superlm_jax.train or convert.")
_DATA = flags.DEFINE_string("data", None, "Corpus: shakespeare, a .txt/.jsonl file, a directory of them, or "
                            "tfds:NAME[/CONFIG][:SPLIT].")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "Field holding the text in .jsonl lines and tfds examples.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BEST = flags.DEFINE_bool("best", False, "Use the checkpoint with the best validation loss.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Input tokens per window (default: the model context).")
_STRIDE = flags.DEFINE_integer("stride", None, "Tokens between window starts, 1..max_length (default: max_length; "
                               "smaller gives each token more context for max_length/stride times the work).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 0, "Score at most this many tokens (0: the whole corpus).")
_OUT = flags.DEFINE_string("out", None, "JSON report path (default: RUN/eval/<data>-step<step>.json).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars on stderr.")


def data_name(corpus: str) -> str:
  """A file-name-safe name of a corpus spec: `shakespeare`, a path's file or folder name without its suffix, or
  `tfds_NAME_CONFIG_SPLIT`."""
  if corpus.startswith("tfds:"):
    name = "tfds_" + corpus.removeprefix("tfds:")
  elif corpus == "shakespeare":
    name = corpus
  else:
    path = Path(corpus)
    name = path.stem if path.suffix in (".txt", ".jsonl") else path.name
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "corpus"


def _check_flags() -> None:
  """Every check that needs neither the checkpoint nor the corpus, before either is read."""
  from superlm_jax.errors import UserError

  if not _CHECKPOINT.value:
    raise UserError("--checkpoint=RUN_DIR is required (a run directory of superlm_jax.train or convert)")
  if not _DATA.value:
    raise UserError("--data is required: shakespeare, a .txt/.jsonl file, a directory of them, or "
                    "tfds:NAME[/CONFIG][:SPLIT]")
  for flag, least in ((_MAX_LENGTH, 1), (_STRIDE, 1), (_BATCH_SIZE, 1), (_MAX_TOKENS, 0)):
    if flag.value is not None and flag.value < least:
      raise UserError(f"--{flag.name}={flag.value} must be >= {least}")
  if _MAX_LENGTH.value is not None and _STRIDE.value is not None and _STRIDE.value > _MAX_LENGTH.value:
    raise UserError(f"--stride={_STRIDE.value} is longer than --max_length={_MAX_LENGTH.value}: the tokens between "
                    "windows would go unscored")
  if not Path(_CHECKPOINT.value).is_dir():
    raise UserError(f"checkpoint directory {_CHECKPOINT.value} does not exist")


def main(argv):
  del argv
  start = time.perf_counter()
  _check_flags()
  import itertools  # pylint: disable=import-outside-toplevel

  from superlm_jax.checkpoint import load_run_config  # pylint: disable=import-outside-toplevel
  from superlm_jax.data.corpus import iter_documents  # pylint: disable=import-outside-toplevel
  from superlm_jax.evaluation import perplexity  # pylint: disable=import-outside-toplevel
  from superlm_jax.experiments.common import jsonable, machine  # pylint: disable=import-outside-toplevel
  from superlm_jax.fileio import write_atomically  # pylint: disable=import-outside-toplevel
  from superlm_jax.generate.restore import load_model, load_run_tokenizer  # pylint: disable=import-outside-toplevel

  run_dir, corpus = Path(_CHECKPOINT.value), _DATA.value
  documents = iter_documents(corpus, _TEXT_FIELD.value)
  documents = itertools.chain([next(documents)], documents)  # a missing or empty corpus fails before the model loads
  context = int(load_run_config(run_dir).model.max_seq_len)  # the window is checked before the weights are read
  max_length = _MAX_LENGTH.value or context
  stride = _STRIDE.value or max_length
  perplexity.check_window(max_length, stride, context)
  model, config, step = load_model(run_dir, step=_STEP.value, best=_BEST.value)
  tokenizer = load_run_tokenizer(run_dir, config)
  print(f"Restored {run_dir} at step {step} ({config.name}); scoring {corpus} in windows of {max_length} tokens, "
        f"stride {stride}.", file=sys.stderr)

  stream = perplexity.token_stream(documents, tokenizer, max_tokens=_MAX_TOKENS.value, progress=_PROGRESS.value)
  scoring_start = time.perf_counter()
  result = perplexity.evaluate_perplexity(model, stream, max_length=max_length, stride=stride,
                                          batch_size=_BATCH_SIZE.value, progress=_PROGRESS.value)
  end = time.perf_counter()
  report = {"checkpoint": str(run_dir), "step": step, "config": config.name, "data": corpus,
            "text_field": _TEXT_FIELD.value, **result.to_json(), "max_tokens": _MAX_TOKENS.value,
            "batch_size": _BATCH_SIZE.value, "time_s": end - start, "scoring_time_s": end - scoring_start,
            "machine": machine(),
            "command": "python -m superlm_jax.evaluate " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
  out = Path(_OUT.value) if _OUT.value else run_dir / "eval" / f"{data_name(corpus)}-step{step}.json"
  write_atomically(out, json.dumps(jsonable(report), indent=2) + "\n")  # whole or not at all

  capped = " (capped by --max_tokens)" if result.truncated else ""
  print(f"{corpus}: {result.tokens:,} tokens{capped}, NLL {result.nll.mean:.4f} ± "
        f"{result.nll.stderr:.4f} nats/token, perplexity {result.perplexity:.2f}, {result.bits_per_byte:.3f} "
        f"bits/byte (step {step})")
  print(f"Report: {out} ({end - start:.1f} s)")


def cli() -> None:
  """The `superlm-evaluate` console script (pyproject.toml): the same program as `python -m superlm_jax.evaluate`."""
  run_main(main)


if __name__ == "__main__":
  cli()
