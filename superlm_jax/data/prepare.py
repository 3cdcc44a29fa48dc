"""Corpus -> tokenizer.model, train.bin, val.bin, meta.json: the one-time step before training.

  python -m superlm_jax.data.prepare --config=configs/gpt2_small.py:tiny [--force]

The output goes to `resolve_data_dir(config.data, config.model.vocab_size)`. Validation is a set of whole
documents (never a tail of a training document) so that validation loss measures generalisation to unseen
plays, and the tokenizer is trained on the training documents only so its merges carry no validation text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags
from tqdm import tqdm

from superlm_jax.data.corpus import CorpusError, iter_documents
from superlm_jax.data.tokenizer import (TOKENIZER_FILES, Tokenizer, copy_tokenizer, load_tokenizer,
                                        train_tokenizer)
from superlm_jax.errors import UserError

# Bump when the on-disk format or the preparation algorithm changes, so old data dirs are rebuilt.
FORMAT_VERSION = 1
PREPARE_COMMAND = "python -m superlm_jax.data.prepare --config=<config file>[:preset]"
# Documents are tokenized in groups of about this many characters: big enough for sentencepiece's thread
# pool, small enough that the progress bar moves and memory stays bounded.
_ENCODE_GROUP_CHARS = 4_000_000


def resolve_data_dir(data_config: ml_collections.ConfigDict, vocab_size: int) -> Path:
  """`{data.dir}/v{vocab_size}`: one corpus prepared at two vocabulary sizes must not share files.

  An empty `data.dir` falls back to `data/<name derived from data.corpus>`.
  """
  base = data_config.dir
  if not base:
    corpus = data_config.corpus
    name = corpus if corpus == "shakespeare" or corpus.startswith("tfds:") else Path(corpus).stem
    base = Path("data") / (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "corpus")
  external = external_tokenizer_digest(data_config)
  return Path(base) / (f"v{vocab_size}" if external is None else f"tok-{external[:12]}")


def external_tokenizer_digest(data_config: ml_collections.ConfigDict) -> str | None:
  """sha256 of the files of `data.tokenizer` (None when the tokenizer is trained here)."""
  if not data_config.tokenizer:
    return None
  location = Path(data_config.tokenizer)
  if not location.exists():
    raise UserError(f"data.tokenizer {location} does not exist")
  directory = location.parent if location.is_file() else location
  names = [location.name] if location.is_file() else [n for n in TOKENIZER_FILES if (directory / n).is_file()]
  if not names:
    raise UserError(f"data.tokenizer {location} holds no tokenizer.model or tokenizer.json")
  digest = hashlib.sha256()
  for name in sorted(names):
    digest.update(name.encode() + (directory / name).read_bytes())
  return digest.hexdigest()


def fingerprint(data_config: ml_collections.ConfigDict, vocab_size: int) -> tuple[dict, str]:
  """The settings that determine the prepared files, and a short hash of them.

  `max_length`, `stride` and `worker_count` are left out: they only affect how the pipeline reads the files.
  """
  keys = {
      "format_version": FORMAT_VERSION,
      "corpus": data_config.corpus,
      "text_field": data_config.text_field,
      "val_fraction": float(data_config.val_fraction),
      "seed": int(data_config.seed),
      "tokenizer_sample_bytes": int(data_config.tokenizer_sample_bytes),
      "vocab_size": int(vocab_size),
  }
  if data_config.tokenizer:  # an existing tokenizer: its content, not its path, determines the files
    keys.update(tokenizer=external_tokenizer_digest(data_config), tokenizer_sample_bytes=0)
  digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
  return keys, digest


def split_documents(documents: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
  """Shuffles document order with `seed`; the first documents holding ~val_fraction of the text are validation.

  The split is by characters because it has to be made before the tokenizer exists (the tokenizer is trained
  on the training split); the token fraction ends up close. Validation gets at least one document, training
  keeps at least one.
  """
  if not 0.0 < val_fraction < 1.0:
    raise UserError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
  if len(documents) < 2:
    raise CorpusError(f"the corpus has {len(documents)} document; need at least 2 to hold whole documents out "
                      "for validation (split the text into several files)")
  order = np.random.default_rng(seed).permutation(len(documents))
  shuffled = [documents[i] for i in order]
  target = val_fraction * sum(len(d) for d in shuffled)
  num_val, chars = 0, 0
  while num_val < len(shuffled) - 1 and (num_val == 0 or chars < target):
    chars += len(shuffled[num_val])
    num_val += 1
  return shuffled[num_val:], shuffled[:num_val]


def _encode_groups(documents: Sequence[str]):
  group, size = [], 0
  for doc in documents:
    group.append(doc)
    size += len(doc)
    if size >= _ENCODE_GROUP_CHARS:
      yield group
      group, size = [], 0
  if group:
    yield group


def _write_tokens(tokenizer: Tokenizer, documents: Sequence[str], path: Path, dtype: np.dtype,
                  progress: tqdm) -> np.ndarray:
  """Writes each document's tokens followed by EOS to `path`; returns the per-id token counts."""
  counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
  with path.open("wb") as f:
    for group in _encode_groups(documents):
      for ids in tokenizer.encode_batch(group):
        ids.append(tokenizer.eos_id)  # The document boundary the model learns to predict and to condition on.
        tokens = np.asarray(ids, dtype=dtype)
        tokens.tofile(f)
        counts += np.bincount(tokens, minlength=tokenizer.vocab_size)
      progress.update(sum(len(d) for d in group))
  return counts


def unigram_loss(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
  """Cross-entropy (nats/token) of the validation tokens under the add-one-smoothed training unigram model.

  A model that ignores context entirely reaches this; a trained LM is only learning something once its
  validation loss is well below it.
  """
  probs = (train_counts + 1.0) / (train_counts.sum() + len(train_counts))
  return float(-(val_counts * np.log(probs)).sum() / max(val_counts.sum(), 1))


def _is_prepared(out: Path, digest: str) -> bool:
  try:
    matches = json.loads((out / "meta.json").read_text()).get("fingerprint") == digest
  except (OSError, ValueError):
    return False
  has_tokenizer = any((out / name).is_file() for name in TOKENIZER_FILES[:2])
  return matches and has_tokenizer and all((out / name).is_file() for name in ("train.bin", "val.bin"))


def prepare(data_config: ml_collections.ConfigDict, vocab_size: int, force: bool = False) -> Path:
  """Prepares (or finds already prepared) data for `data_config` at `vocab_size`; returns the data directory.

  Everything is written to a staging directory first. The commit removes the old meta.json, moves the new
  tokenizer/bin files into place and moves meta.json in last, so meta.json exists only next to a complete,
  matching set of files: a run that fails or is interrupted leaves the previous data intact or, at worst,
  a directory without meta.json that the next run rebuilds.
  """
  out = resolve_data_dir(data_config, vocab_size)
  keys, digest = fingerprint(data_config, vocab_size)
  meta_path = out / "meta.json"
  if not force and _is_prepared(out, digest):
    print(f"{out} is already prepared for this config (fingerprint {digest}); pass --force to rebuild")
    return out

  start = time.perf_counter()
  documents = list(iter_documents(data_config.corpus, data_config.text_field))
  train_docs, val_docs = split_documents(documents, data_config.val_fraction, data_config.seed)
  del documents

  out.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
  try:
    if data_config.tokenizer:
      copy_tokenizer(data_config.tokenizer, staging)
      tokenizer = load_tokenizer(staging)
      if tokenizer.vocab_size > vocab_size:
        raise UserError(f"data.tokenizer has {tokenizer.vocab_size} tokens, more than model.vocab_size={vocab_size}")
      if tokenizer.eos_id is None:
        raise UserError(f"data.tokenizer {data_config.tokenizer} defines no end-of-text id (special_tokens.json)")
    else:
      tokenizer = train_tokenizer(train_docs, vocab_size, staging / "tokenizer.model",
                                  data_config.tokenizer_sample_bytes)
    dtype = np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)
    total_chars = sum(len(d) for d in train_docs) + sum(len(d) for d in val_docs)
    with tqdm(total=total_chars, unit="char", unit_scale=True, desc="tokenizing", file=sys.stderr) as progress:
      train_counts = _write_tokens(tokenizer, train_docs, staging / "train.bin", dtype, progress)
      val_counts = _write_tokens(tokenizer, val_docs, staging / "val.bin", dtype, progress)
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": digest,
        "config": keys,
        "corpus": data_config.corpus,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "pad_id": tokenizer.pad_id,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "train_chars": sum(len(d) for d in train_docs),
        "val_chars": sum(len(d) for d in val_docs),
        "train_tokens": int(train_counts.sum()),
        "val_tokens": int(val_counts.sum()),
        "unigram_val_loss": unigram_loss(train_counts, val_counts),
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    meta_path.unlink(missing_ok=True)
    for name in (*TOKENIZER_FILES, "train.bin", "val.bin", "meta.json"):
      if (staging / name).is_file():
        os.replace(staging / name, out / name)
  finally:
    shutil.rmtree(staging, ignore_errors=True)

  seconds = time.perf_counter() - start
  print(f"prepared {out} in {seconds:.1f} s: {len(train_docs)} train + {len(val_docs)} val documents, "
        f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
        f"({meta['train_chars'] / meta['train_tokens']:.2f} chars/token), unigram baseline "
        f"{meta['unigram_val_loss']:.3f} nats/token (perplexity {math.exp(meta['unigram_val_loss']):.0f})")
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])} (settings go in --config.data.KEY=VALUE)")
  config = flags.FLAGS.config
  prepare(config.data, config.model.vocab_size, force=flags.FLAGS.force)


def cli() -> None:
  """`python -m superlm_jax.data.prepare` and the `superlm-prepare` console script (pyproject.toml)."""
  from superlm_jax.cli import run_main  # pylint: disable=import-outside-toplevel

  # Flags are defined only when this is the program: train.py imports `prepare` and defines its own --config,
  # and absl refuses to define a flag twice.
  config_flags.DEFINE_config_file("config", None, "Model config file, e.g. configs/gpt2_small.py:tiny.",
                                  lock_config=True)
  flags.DEFINE_bool("force", False, "Rebuild even if the data directory is prepared for this config.")
  flags.mark_flag_as_required("config")
  run_main(main)


if __name__ == "__main__":
  cli()
