"""A sentencepiece BPE tokenizer that round-trips text exactly, trained in memory.

Settings differ from sentencepiece's defaults (which target translation) because a language model has to be
able to write what it reads:
* `normalization_rule_name="identity"`, `remove_extra_whitespaces=False`: the default NFKC rule and whitespace
  collapsing would silently rewrite text, so decode(encode(text)) != text; verse indentation and blank lines
  between speeches are part of the text.
* `user_defined_symbols=["\\n"]`: newline is its own piece (id 4) rather than the byte <0x0A>; it cannot merge
  with neighbours, so a line-initial word tokenizes the same everywhere.
* `add_dummy_prefix=False`: no space is invented before each text. Training text is a concatenation of whole
  documents where a speaker's name follows "\\n", not " "; with a dummy prefix the prompt "ROMEO." would be
  encoded as " ROMEO.", a context the model rarely saw.
* `allow_whitespace_only_pieces=True`: runs of spaces (indentation) can become single pieces.
* `byte_fallback=True`: any character outside the vocabulary is spelled in UTF-8 bytes, so there is no <unk>.
* `hard_vocab_limit=True`: the vocabulary has exactly `vocab_size` pieces, matching the embedding table.
* no input shuffling/sampling by sentencepiece: the caller bounds the text (`sample_bytes`) and training is then
  deterministic (same text in, same model bytes out).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from superlm_jax.errors import UserError
from superlm_jax.fileio import read_json_object

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# sentencepiece drops training sentences longer than max_sentence_length bytes; lines are cut into chunks of
# at most _CHUNK_CHARS characters (<= 4 bytes each in UTF-8) so no text is silently skipped.
_MAX_SENTENCE_BYTES = 16384
_CHUNK_CHARS = _MAX_SENTENCE_BYTES // 4


class Tokenizer:
  """Thin wrapper over a SentencePieceProcessor with the conventions the rest of the library relies on."""

  def __init__(self, model_proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._vocab_size = self._sp.vocab_size()
    # Ids that decode() skips: control symbols would otherwise vanish or print as placeholders mid-text.
    self._skip = {self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()}

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    path = Path(path)
    if not path.is_file():
      raise UserError(f"tokenizer model not found: {path}")
    try:
      tokenizer = cls(path.read_bytes())
    except RuntimeError as e:  # sentencepiece: "INTERNAL: ... ParseFromArray ..."
      raise UserError(f"{path} is not a sentencepiece model ({' '.join(str(e).split())[:200]})") from None
    # Some bytes parse as an empty ModelProto (an empty file does): a tokenizer without pieces is no tokenizer.
    if tokenizer.vocab_size == 0:
      raise UserError(f"{path} is not a sentencepiece model (it holds no pieces)")
    return tokenizer

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  # The special ids the tokenizer was trained with (PAD_ID, UNK_ID, BOS_ID, EOS_ID above).
  pad_id = property(lambda self: self._sp.pad_id())
  unk_id = property(lambda self: self._sp.unk_id())
  bos_id = property(lambda self: self._sp.bos_id())
  eos_id = property(lambda self: self._sp.eos_id())
  # Every id that ends a generation: the one EOS of a tokenizer trained here.
  eos_ids = property(lambda self: () if self._sp.eos_id() < 0 else (self._sp.eos_id(),))
  chat_template = None  # trained here on plain text: no chat format
  special_prefix = ()  # no BOS in training: documents are separated by EOS
  special_tokens = property(lambda self: {})

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS (prepare appends EOS after each document itself)."""
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    """Encodes several texts with sentencepiece's C++ thread pool (0: one thread per CPU)."""
    return self._sp.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, skipping pad/BOS/EOS and ids outside the vocabulary.

    A model's output layer may be wider than the tokenizer (padded vocab) and sampled text contains EOS between
    documents; neither should make decoding fail.
    """
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    keep = [int(i) for i in ids if 0 <= i < self._vocab_size and int(i) not in self._skip]
    return self._sp.decode(keep)


def _training_sentences(documents: Iterable[str], sample_bytes: int) -> Iterator[str]:
  """Lines (newline kept) of the documents, in order, until about `sample_bytes` of UTF-8 text."""
  seen = 0
  for doc in documents:
    for line in doc.splitlines(keepends=True):
      for start in range(0, len(line), _CHUNK_CHARS):
        chunk = line[start:start + _CHUNK_CHARS]
        yield chunk
        seen += len(chunk.encode("utf-8"))
        if seen >= sample_bytes:
          return


def train_tokenizer(documents: Iterable[str], vocab_size: int, out_path: str | os.PathLike,
                    sample_bytes: int) -> Tokenizer:
  """Trains a BPE model of exactly `vocab_size` pieces on at most ~`sample_bytes` of `documents`.

  The model is written to `out_path` (the caller picks a temporary name and renames it into place) and
  returned loaded. Raises UserError when the text is too small for the requested vocabulary.
  """
  min_vocab = 4 + 1 + 256  # specials, "\n", byte-fallback pieces
  if vocab_size <= min_vocab:
    raise UserError(f"model.vocab_size={vocab_size} is too small: need > {min_vocab} "
                    "(4 special ids, newline and 256 byte-fallback pieces)")
  writer = io.BytesIO()
  spm.set_random_generator_seed(0)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(documents, sample_bytes),
        model_writer=writer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=True,
        byte_fallback=True,
        character_coverage=0.9995,  # Rarer characters fall back to bytes instead of taking vocabulary slots.
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        user_defined_symbols=["\n"],
        allow_whitespace_only_pieces=True,
        split_digits=False,
        input_sentence_size=0,  # No sentencepiece-side sampling: `sample_bytes` already bounds the input.
        shuffle_input_sentence=False,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        num_threads=min(os.cpu_count() or 1, 16),
        minloglevel=2,  # Silence the INFO log; errors still raise.
    )
  except RuntimeError as e:
    message = " ".join(str(e).split())
    if "Vocabulary size" in message or "vocab_size" in message:
      raise UserError(f"the tokenizer text is too small for model.vocab_size={vocab_size}: {message}") from None
    raise
  out_path = Path(out_path)
  out_path.write_bytes(writer.getvalue())
  return Tokenizer(writer.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers that come with Hugging Face checkpoints (tokenizer.json), e.g. SmolLM2's byte-level BPE.
SENTENCEPIECE_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_SPECIAL_IDS_FILE = "special_tokens.json"  # {"bos_id", "eos_id", "eos_ids", "pad_id"}: by superlm_jax.convert
# Where a Hugging Face checkpoint keeps its special-token strings and chat template (transformers 5 writes the
# template to its own file; older checkpoints have it in tokenizer_config.json's "chat_template").
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
HF_CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE, HF_SPECIAL_IDS_FILE, HF_TOKENIZER_CONFIG_FILE,
                   HF_CHAT_TEMPLATE_FILE)
# The special-token names a chat template sees as variables (transformers passes its special_tokens_map).
_TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json behind the same interface as `Tokenizer`.

  Encoding adds no special tokens (like `Tokenizer`, the data pipeline appends EOS itself). The special ids come
  from special_tokens.json beside it (taken from the checkpoint's config at conversion); a missing id is None.
  `eos_ids` are all the ids that end a generation (a chat model's list, e.g. <|im_end|> and <|endoftext|>);
  `eos_id` is the first, the one the data pipeline writes between documents. The chat template and the
  special-token strings it refers to come from tokenizer_config.json / chat_template.jinja when present.
  """

  def __init__(self, path: str | os.PathLike, special_ids: dict | None = None, tokenizer_config: dict | None = None,
               chat_template: str | None = None):
    import tokenizers  # pylint: disable=import-outside-toplevel

    self._tok = tokenizers.Tokenizer.from_file(str(path))
    self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    special_ids = special_ids or {}
    self._bos, self._eos, self._pad = (special_ids.get(k) for k in ("bos_id", "eos_id", "pad_id"))
    eos_ids = special_ids.get("eos_ids") or ([] if self._eos is None else [self._eos])
    self._eos_ids = tuple(int(i) for i in eos_ids)
    self._skip = {i for i in (self._bos, self._pad, *self._eos_ids) if i is not None}
    tokenizer_config = tokenizer_config or {}
    self.special_tokens = {name: _token_text(tokenizer_config[name]) for name in _TEMPLATE_TOKEN_NAMES
                           if tokenizer_config.get(name) is not None}
    self.chat_template = chat_template or _default_template(tokenizer_config.get("chat_template"))

  @classmethod
  def load(cls, directory: str | os.PathLike) -> "HFTokenizer":
    directory = Path(directory)
    path = directory / HF_TOKENIZER_FILE
    if not path.is_file():
      raise UserError(f"tokenizer not found: {path}")
    special_ids = read_json_object(directory / HF_SPECIAL_IDS_FILE)
    tokenizer_config = read_json_object(directory / HF_TOKENIZER_CONFIG_FILE)
    template_file = directory / HF_CHAT_TEMPLATE_FILE
    chat_template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    try:
      return cls(path, special_ids, tokenizer_config, chat_template)
    except Exception as e:  # noqa: BLE001 (the `tokenizers` bindings raise a bare Exception for a bad file)
      raise UserError(f"{path} is not a Hugging Face tokenizer.json ({' '.join(str(e).split())[:200]})") from None

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def pad_id(self) -> int | None:
    return self._pad

  @property
  def unk_id(self) -> int | None:
    return None

  @property
  def bos_id(self) -> int | None:
    return self._bos

  @property
  def eos_id(self) -> int | None:
    return self._eos

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return self._eos_ids

  @property
  def special_prefix(self) -> tuple[int, ...]:
    """The ids tokenizer.json's post-processor puts before a text (Llama's BOS), which transformers'
    `tokenizer.encode(text)` adds by default and `encode` here does not; () when it adds none."""
    plain = self._tok.encode("a", add_special_tokens=False).ids
    special = self._tok.encode("a", add_special_tokens=True).ids
    cut = len(special) - len(plain)
    return tuple(special[:cut]) if cut > 0 and special[cut:] == plain else ()

  def id_to_piece(self, token_id: int) -> str:
    return self._tok.id_to_token(int(token_id))

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    del num_threads  # tokenizers parallelises on its own
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    return self._tok.decode([int(i) for i in ids if 0 <= i < self._vocab_size and int(i) not in self._skip])


def _token_text(value) -> str:
  """A special token of tokenizer_config.json: a string, or (older files) an AddedToken dict with "content"."""
  return value["content"] if isinstance(value, dict) else str(value)


def _default_template(value) -> str | None:
  """tokenizer_config.json's "chat_template": one template, or a list of named ones of which "default" is used
  (as transformers does when no name is asked for)."""
  if isinstance(value, list):
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    return named.get("default")
  return value if isinstance(value, str) else None


def load_tokenizer(location: str | os.PathLike) -> "Tokenizer | HFTokenizer":
  """The tokenizer in a run/data directory (or the file itself): tokenizer.model (sentencepiece) or tokenizer.json
  (Hugging Face)."""
  location = Path(location)
  if location.is_file():
    return HFTokenizer.load(location.parent) if location.name == HF_TOKENIZER_FILE else Tokenizer.load(location)
  if (location / SENTENCEPIECE_FILE).is_file():
    return Tokenizer.load(location / SENTENCEPIECE_FILE)
  if (location / HF_TOKENIZER_FILE).is_file():
    return HFTokenizer.load(location)
  raise UserError(f"no tokenizer ({SENTENCEPIECE_FILE} or {HF_TOKENIZER_FILE}) in {location}")


def copy_tokenizer(source: str | os.PathLike, destination: str | os.PathLike) -> None:
  """Copies the tokenizer files of `source` (a directory, or a tokenizer file) into the directory `destination`."""
  source, destination = Path(source), Path(destination)
  directory = source.parent if source.is_file() else source
  names = [source.name] if source.is_file() and source.name == SENTENCEPIECE_FILE else TOKENIZER_FILES
  copied = False
  for name in names:
    if (directory / name).is_file():
      destination.mkdir(parents=True, exist_ok=True)
      if (directory / name).resolve() != (destination / name).resolve():
        shutil.copyfile(directory / name, destination / name)
      copied = True
  if not copied:
    raise UserError(f"no tokenizer ({SENTENCEPIECE_FILE} or {HF_TOKENIZER_FILE}) in {source}")
