"""The tokenizer round-trips text exactly, has exactly the requested vocabulary, and trains deterministically."""

from __future__ import annotations

import random

import numpy as np
import pytest

from superlm_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer
from superlm_jax.errors import UserError

VOCAB = 400

ROUND_TRIP = [
    "ROMEO.\nBut, soft! what light through yonder window breaks?\n",
    "  Indented verse,\n\tand a tab;\n\n\nthree newlines, trailing spaces   \n",
    " leading space and  double  spaces",
    "Punctuation: \"quotes\", 'apostrophes', (parens) [brackets] {braces} -- dashes... ?!;:",
    "Unicode via byte fallback: café, naïve, Æsir, “smart quotes” — em dash, 日本語, emoji 🎭🗡️",
    "numbers 1234567890 and 3.14159, 1,000,000",
    "\n",
    "",
    "x",
]


def _documents() -> list[str]:
  rng = random.Random(0)
  words = "the and of to thou thee my lord king queen love night day sweet death heart fair".split()
  return ["\n".join(" ".join(rng.choice(words) for _ in range(8)).capitalize() + "." for _ in range(50))
          for _ in range(10)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
  # Module-scoped: one training run serves all tests here.
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return train_tokenizer(_documents(), VOCAB, path, sample_bytes=1_000_000)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tokenizer: Tokenizer, text: str):
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_exact_vocab_size_and_special_ids(tokenizer: Tokenizer):
  assert tokenizer.vocab_size == VOCAB
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
  assert [tokenizer.id_to_piece(i) for i in range(5)] == ["<pad>", "<unk>", "<s>", "</s>", "\n"]


def test_no_unknown_tokens_and_newline_piece(tokenizer: Tokenizer):
  ids = tokenizer.encode("Ünïcödé 🎭\nline two")
  assert tokenizer.unk_id not in ids
  assert tokenizer.encode("\n") == [4]


def test_no_dummy_prefix(tokenizer: Tokenizer):
  # A speaker name after a newline must tokenize the same as at the start of a prompt.
  assert tokenizer.encode("\nthe king")[1:] == tokenizer.encode("the king")


def test_decode_skips_special_and_out_of_range_ids(tokenizer: Tokenizer):
  ids = tokenizer.encode("fair lord")
  noisy = [tokenizer.bos_id] + ids + [tokenizer.eos_id, tokenizer.pad_id, VOCAB, VOCAB + 100, -1]
  assert tokenizer.decode(noisy) == "fair lord"
  assert tokenizer.decode(np.asarray(noisy)) == "fair lord"


def test_encode_batch_matches_encode(tokenizer: Tokenizer):
  assert tokenizer.encode_batch(ROUND_TRIP) == [tokenizer.encode(t) for t in ROUND_TRIP]


def test_training_is_deterministic_and_load_matches(tokenizer: Tokenizer, tmp_path):
  first, second = tmp_path / "a.model", tmp_path / "b.model"
  train_tokenizer(_documents(), VOCAB, first, sample_bytes=1_000_000)
  train_tokenizer(_documents(), VOCAB, second, sample_bytes=1_000_000)
  assert first.read_bytes() == second.read_bytes()
  loaded = Tokenizer.load(first)
  assert [loaded.id_to_piece(i) for i in range(VOCAB)] == [tokenizer.id_to_piece(i) for i in range(VOCAB)]


def test_sample_bytes_bounds_training_text(tmp_path):
  # 30 bytes of text admit too few merges for the vocabulary: proof that the rest was not read.
  with pytest.raises(UserError, match="too small"):
    train_tokenizer(_documents(), VOCAB, tmp_path / "t.model", sample_bytes=30)


def test_vocab_too_large_for_text_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="too small for model.vocab_size=5000"):
    train_tokenizer(["a tiny text\n"] * 3, 5000, tmp_path / "t.model", sample_bytes=1000)
  with pytest.raises(UserError, match="too small"):
    train_tokenizer(["a tiny text\n"] * 3, 100, tmp_path / "t.model", sample_bytes=1000)


def test_load_missing_model(tmp_path):
  with pytest.raises(UserError, match="tokenizer model not found"):
    Tokenizer.load(tmp_path / "nope.model")
