"""prepare: split, tokenize, write atomically, skip when up to date; and the command-line entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from superlm_jax.data import prepare as prepare_lib
from superlm_jax.data.corpus import CorpusError, iter_documents
from superlm_jax.data.prepare import fingerprint, prepare, resolve_data_dir, split_documents, unigram_loss
from superlm_jax.data.tokenizer import Tokenizer
from superlm_jax.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 320
FILES = ("tokenizer.model", "train.bin", "val.bin", "meta.json")


def _read(out: Path, split: str) -> np.ndarray:
  return np.fromfile(out / f"{split}.bin", dtype=json.loads((out / "meta.json").read_text())["dtype"])


def test_prepare_writes_consistent_files(data_config: ml_collections.ConfigDict, capsys):
  out = prepare(data_config, VOCAB)
  assert out == Path(data_config.dir) / f"v{VOCAB}"
  assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # no staging leftovers
  meta = json.loads((out / "meta.json").read_text())
  train, val = _read(out, "train"), _read(out, "val")
  assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB
  assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
  # One EOS after every document, and nowhere else.
  eos = meta["eos_id"]
  assert int((train == eos).sum()) == meta["train_documents"]
  assert int((val == eos).sum()) == meta["val_documents"]
  assert meta["train_documents"] + meta["val_documents"] == 12 and meta["val_documents"] >= 1
  assert train[-1] == eos and val[-1] == eos
  # The files decode back to exactly the corpus documents, each in one split only.
  tokenizer = Tokenizer.load(out / "tokenizer.model")
  assert tokenizer.vocab_size == VOCAB

  def documents(tokens: np.ndarray) -> list[str]:
    cuts = np.flatnonzero(tokens == eos)
    return [tokenizer.decode(part) for part in np.split(tokens, cuts + 1)[:-1]]

  train_docs, val_docs = documents(train), documents(val)
  assert sorted(train_docs + val_docs) == sorted(iter_documents(data_config.corpus))
  assert not set(train_docs) & set(val_docs)
  # The unigram baseline is the smoothed train-unigram cross-entropy of val.
  counts = np.bincount(train, minlength=VOCAB)
  expected = -np.log((counts[val] + 1) / (len(train) + VOCAB)).mean()
  assert meta["unigram_val_loss"] == pytest.approx(expected, rel=1e-9)
  assert "unigram baseline" in capsys.readouterr().out


def test_prepare_is_idempotent_and_fingerprint_changes_rebuild(data_config: ml_collections.ConfigDict, capsys):
  out = prepare(data_config, VOCAB)
  stamps = {name: (out / name).stat().st_mtime_ns for name in FILES}
  capsys.readouterr()
  assert prepare(data_config, VOCAB) == out
  assert "already prepared" in capsys.readouterr().out
  assert {name: (out / name).stat().st_mtime_ns for name in FILES} == stamps
  old_meta = json.loads((out / "meta.json").read_text())

  prepare(data_config, VOCAB, force=True)
  assert "prepared" in capsys.readouterr().out
  assert json.loads((out / "meta.json").read_text())["fingerprint"] == old_meta["fingerprint"]
  assert (out / "meta.json").stat().st_mtime_ns != stamps["meta.json"]

  data_config.seed = 1  # A key in the fingerprint: the split changes, so the data must be rebuilt.
  prepare(data_config, VOCAB)
  new_meta = json.loads((out / "meta.json").read_text())
  assert new_meta["fingerprint"] != old_meta["fingerprint"] and new_meta["config"]["seed"] == 1

  data_config.max_length = 17  # Not in the fingerprint: only the pipeline reads it.
  capsys.readouterr()
  prepare(data_config, VOCAB)
  assert "already prepared" in capsys.readouterr().out


def test_vocab_sizes_do_not_collide(data_config: ml_collections.ConfigDict):
  a, b = prepare(data_config, VOCAB), prepare(data_config, VOCAB + 30)
  assert a != b and a.parent == b.parent
  assert Tokenizer.load(b / "tokenizer.model").vocab_size == VOCAB + 30
  assert fingerprint(data_config, VOCAB)[1] != fingerprint(data_config, VOCAB + 30)[1]


def test_resolve_data_dir_without_dir(data_config: ml_collections.ConfigDict):
  data_config.dir = ""
  assert resolve_data_dir(data_config, 512) == Path("data") / "corpus" / "v512"
  data_config.corpus = "tfds:wikitext/wikitext-2-raw-v1"
  assert resolve_data_dir(data_config, 512) == Path("data") / "tfds_wikitext_wikitext-2-raw-v1" / "v512"


def test_missing_corpus_raises_and_writes_nothing(data_config: ml_collections.ConfigDict, tmp_path: Path):
  data_config.corpus = str(tmp_path / "missing")
  with pytest.raises(CorpusError) as info:
    prepare(data_config, VOCAB)
  assert str(info.value) == f"corpus path does not exist: {tmp_path / 'missing'}"
  assert not Path(data_config.dir).exists()


def test_failure_keeps_the_previous_data(data_config: ml_collections.ConfigDict, monkeypatch):
  out = prepare(data_config, VOCAB)
  before = {name: (out / name).read_bytes() for name in FILES}

  def broken(*args, **kwargs):
    raise RuntimeError("disk on fire")

  monkeypatch.setattr(prepare_lib, "_write_tokens", broken)
  with pytest.raises(RuntimeError, match="disk on fire"):
    prepare(data_config, VOCAB, force=True)
  assert {name: (out / name).read_bytes() for name in FILES} == before
  assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # staging directory removed


def test_split_documents():
  docs = [f"document {i} " * (i + 1) for i in range(20)]
  train, val = split_documents(docs, 0.1, seed=0)
  assert sorted(train + val) == sorted(docs) and val and train
  total = sum(map(len, docs))
  val_chars = sum(map(len, val))
  assert val_chars >= 0.1 * total and val_chars - max(map(len, val)) < 0.1 * total  # smallest prefix reaching 10%
  assert split_documents(docs, 0.1, seed=0) == (train, val)
  assert split_documents(docs, 0.1, seed=1) != (train, val)
  assert len(split_documents(docs[:2], 0.9, seed=0)[0]) == 1  # training keeps at least one document
  assert len(split_documents(docs[:2], 0.001, seed=0)[1]) == 1  # validation gets at least one
  with pytest.raises(CorpusError, match="at least 2"):
    split_documents(docs[:1], 0.1, seed=0)
  with pytest.raises(UserError, match="val_fraction"):
    split_documents(docs, 0.0, seed=0)


def test_unigram_loss_uniform():
  counts = np.zeros(8, dtype=np.int64)
  assert unigram_loss(counts, np.ones(8, dtype=np.int64)) == pytest.approx(np.log(8))


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  return subprocess.run([sys.executable, "-m", "superlm_jax.data.prepare", "--config=configs/gpt2_small.py:tiny",
                         *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_cli_prepares(corpus_dir: Path, tmp_path: Path):
  result = _cli(f"--config.data.corpus={corpus_dir}", f"--config.data.dir={tmp_path / 'cli'}",
                f"--config.model.vocab_size={VOCAB}")
  assert result.returncode == 0, result.stderr
  assert "prepared" in result.stdout
  assert (tmp_path / "cli" / f"v{VOCAB}" / "meta.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["--config.data.corpus=/no/such/corpus.txt"], "error: corpus path does not exist: /no/such/corpus.txt"),
    (["--config.data.lrr=1"], "error: unknown config key 'lrr' in --config.data.lrr=1"),
    (["--config.dta.corpus=x"], "error: unknown config key 'dta' in --config.dta.corpus=x"),
])
def test_cli_user_errors_are_one_line(args: list[str], message: str, tmp_path: Path):
  result = _cli(*args, f"--config.data.dir={tmp_path / 'cli'}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
  assert result.stderr.startswith(message), result.stderr
  assert not (tmp_path / "cli").exists()


def test_real_corpus(shakespeare_raw_dir: Path, tmp_path: Path, monkeypatch):
  monkeypatch.chdir(shakespeare_raw_dir.parent.parent)  # "shakespeare" is read from data/raw
  from superlm_jax.config import base_config

  config = base_config().data
  config.dir = str(tmp_path / "shakespeare")
  out = prepare(config, 4096)
  meta = json.loads((out / "meta.json").read_text())
  assert meta["train_documents"] + meta["val_documents"] == 47
  assert meta["train_tokens"] > 1_000_000 and meta["val_tokens"] > 50_000
  assert 5.0 < meta["unigram_val_loss"] < 8.0


def test_an_existing_tokenizer_is_used_as_is_and_a_missing_one_is_named(tmp_path):
  """data.tokenizer: the corpus is tokenized with the given tokenizer (its own folder, keyed by its content);
  a path that does not exist is a one-line error naming it."""
  from superlm_jax.config import base_config
  from superlm_jax.data.prepare import prepare
  from superlm_jax.data.tokenizer import load_tokenizer, train_tokenizer
  from superlm_jax.errors import UserError
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
  rng = np.random.default_rng(0)
  for i in range(3):
    (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(words, 400)))
  tok_dir = tmp_path / "tok"
  tok_dir.mkdir()
  train_tokenizer([" ".join(rng.choice(words, 2000))], 300, tok_dir / "tokenizer.model", 10**6)
  c = base_config().data
  c.update(corpus=str(corpus), dir=str(tmp_path / "data"), tokenizer=str(tok_dir), val_fraction=0.3)
  out = prepare(c, 512)
  assert out.name.startswith("tok-")
  assert (out / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
  assert load_tokenizer(out).vocab_size == 300
  c.tokenizer = str(tmp_path / "no_such_tokenizer")
  with pytest.raises(UserError, match="no_such_tokenizer does not exist"):
    prepare(c, 512)
