"""Perplexity and bits per byte of a model on a corpus, with the sliding window of Hugging Face's guide
"Perplexity of fixed-length models" (https://huggingface.co/docs/transformers/perplexity), so the numbers are those
`transformers` gives for the same converted model.

    stream = token_stream(iter_documents("shakespeare"), tokenizer)
    result = evaluate_perplexity(model, stream, max_length=128, stride=64)
    result.perplexity, result.bits_per_byte, result.to_json()

The documents are joined as training joins them (`data/prepare.py`): each document's tokens, then the tokenizer's
EOS id when it has one, so a model is scored on the boundaries it learned to predict. The stream is cut into windows
of `max_length` input tokens (+1 for the last target) that start `stride` tokens apart; every token after the first
is scored exactly once, by the first window that holds it, given all the tokens before it in that window. So the
first window scores all its tokens, each later one only the `stride` tokens past the previous window's end, and
`stride = max_length` (the default) gives windows that share only the one token the next predicts from. A smaller
stride gives every scored token more context at the price of `max_length / stride` times the computation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from superlm_jax.errors import UserError
from superlm_jax.evaluation.scoring import Scorer
from superlm_jax.training.evaluate import Average

# Documents tokenized per `encode_batch` call (and at most this many characters): the tokenizers' thread pools get
# work in bulk, and a `max_tokens` cap never tokenizes much more than it keeps.
_ENCODE_GROUP_DOCS = 64
_ENCODE_GROUP_CHARS = 1 << 20


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """The evaluated text as one token stream, and what it spells."""
  tokens: np.ndarray  # [n] int32: the documents' tokens, each document followed by EOS (when there is one)
  documents: int  # documents with at least one token in the stream
  text_bytes: int  # UTF-8 bytes of the text the tokens spell (see `token_stream`)
  truncated: bool  # `max_tokens` stopped the stream before the corpus ended


def _encoded(documents: Iterable[str], tokenizer) -> Iterator[tuple[str, list[int]]]:
  """(text, token ids) of each document, tokenized a group of documents at a time."""
  group, chars = [], 0
  for text in documents:
    group.append(text)
    chars += len(text)
    if len(group) >= _ENCODE_GROUP_DOCS or chars >= _ENCODE_GROUP_CHARS:
      yield from zip(group, tokenizer.encode_batch(group))
      group, chars = [], 0
  if group:
    yield from zip(group, tokenizer.encode_batch(group))


def _decoded_bytes(tokenizer, ids) -> int:
  """UTF-8 bytes of the text that the first tokens of a document spell. A character whose bytes are split between
  the last kept token and the next (byte fallback, byte-level BPE) decodes to U+FFFD; it is not counted, as its
  last byte is not scored."""
  return len(tokenizer.decode(ids).rstrip("\ufffd").encode("utf-8"))


def token_stream(documents: Iterable[str], tokenizer, *, max_tokens: int = 0, progress: bool = False) -> TokenStream:
  """The documents tokenized and joined as training joins them, enough for `max_tokens` scored tokens (0: all).

  Bytes, the denominator of bits per byte, are those of the documents' text as the corpus layer reads it (UTF-8,
  after its normalisation: LF line ends, no byte-order mark); EOS separators add none, since they are no text.
  The first token's bytes count although nothing predicts it, as they do in any bits-per-byte of a whole text.
  When `max_tokens` cuts a document, its part is measured by decoding the kept tokens, which is its exact text for
  the lossless tokenizers the runs use (sentencepiece with identity normalisation, byte-level BPE).
  """
  if max_tokens < 0:
    raise UserError(f"max_tokens={max_tokens} must be >= 0 (0: the whole corpus)")
  limit = max_tokens + 1 if max_tokens else None  # one more: the first token is only ever context
  eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  pieces, length, text_bytes, count, truncated = [], 0, 0, 0, False
  encoded = _encoded(documents, tokenizer)
  with tqdm(desc="tokenize", unit="doc", disable=not progress, dynamic_ncols=True, leave=False) as bar:
    for text, ids in encoded:
      ids = list(ids) + eos
      if not ids:
        continue
      count += 1
      bar.update()
      if limit is not None and length + len(ids) >= limit:
        keep = limit - length
        if keep == len(ids):  # the document, EOS included, ends the stream exactly
          text_bytes += len(text.encode("utf-8"))
          truncated = next(encoded, None) is not None
        else:  # cut inside the document's text (the EOS is the last id, so it is not kept)
          text_bytes += _decoded_bytes(tokenizer, ids[:keep])
          truncated = True
        pieces.append(ids[:keep])
        length += keep
        break
      pieces.append(ids)
      length += len(ids)
      text_bytes += len(text.encode("utf-8"))
  tokens = np.concatenate([np.asarray(piece, np.int32) for piece in pieces]) if pieces else np.zeros(0, np.int32)
  return TokenStream(tokens=tokens, documents=count, text_bytes=text_bytes, truncated=truncated)


def check_window(max_length: int, stride: int, context: int) -> None:
  """One-line errors for a window the model cannot run or a stride that skips or rescores tokens."""
  if max_length > context:
    raise UserError(f"max_length={max_length} is longer than the model context of {context} tokens")
  if max_length < 1:
    raise UserError(f"max_length={max_length} must be >= 1")
  if not 1 <= stride <= max_length:
    raise UserError(f"stride={stride} is out of range: it must be in [1, max_length={max_length}] (a longer "
                    "stride would leave tokens unscored)")


def window_spans(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
  """(begin, end, first) of each window over a stream of `n_tokens`: the window is tokens[begin:end] (at most
  `max_length` + 1) and scores its tokens from index `first` on, those no earlier window scored. The loop of
  Hugging Face's guide with windows one token longer, so that no window's first token goes unscored."""
  spans, begin, scored_until = [], 0, 1  # token 0 has nothing before it to be predicted from
  while scored_until < n_tokens:
    end = min(begin + max_length + 1, n_tokens)
    spans.append((begin, end, scored_until - begin))
    scored_until = end
    begin += stride
  return spans


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  """What `evaluate_perplexity` measured, and the window scheme and text it measured it on."""
  nll: Average  # nats per scored token; its standard error treats tokens as independent (an underestimate)
  text_bytes: int  # UTF-8 bytes of the evaluated text (`token_stream`)
  max_length: int
  stride: int
  windows: int
  documents: int
  truncated: bool  # max_tokens stopped the evaluation before the corpus ended

  @property
  def tokens(self) -> int:
    return int(self.nll.count)

  @property
  def perplexity(self) -> float:
    return math.exp(self.nll.mean) if self.nll.mean < 709 else math.inf  # exp overflows a float past ~709.78

  @property
  def bits_per_byte(self) -> float:
    return self.nll.total / math.log(2) / self.text_bytes if self.text_bytes else math.nan

  def to_json(self) -> dict:
    return {"tokens": self.tokens, "nll": self.nll.to_json(), "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte, "bytes": self.text_bytes, "max_length": self.max_length,
            "stride": self.stride, "windows": self.windows, "documents": self.documents, "truncated": self.truncated}


def evaluate_perplexity(model, stream: TokenStream, *, max_length: int | None = None, stride: int | None = None,
                        batch_size: int = 8, progress: bool = False) -> PerplexityResult:
  """Scores `stream` with `model` in windows of `max_length` (default: the model context) advanced by `stride`
  (default: `max_length`), `batch_size` windows per forward pass, through `Scorer`."""
  context = int(model.spec.max_seq_len)
  max_length = context if max_length is None else int(max_length)
  stride = max_length if stride is None else int(stride)
  check_window(max_length, stride, context)
  if batch_size < 1:
    raise UserError(f"batch_size={batch_size} must be >= 1")
  if len(stream.tokens) < 2:
    raise UserError(f"the text is {len(stream.tokens)} token(s) long: perplexity needs at least 2")
  spans = window_spans(len(stream.tokens), max_length, stride)
  # A bucket of max_length pads every window, the shorter last one included, to one shape: one compilation.
  scorer = Scorer(model, batch_size=batch_size, bucket=max_length)
  nll = Average()
  bar = tqdm(total=len(spans), desc="perplexity", unit="window", disable=not progress, dynamic_ncols=True)
  chunk = batch_size * 16  # windows handed to the scorer at once: its rows and results stay small
  for start in range(0, len(spans), chunk):
    rows = [(stream.tokens[begin:end], first) for begin, end, first in spans[start:start + chunk]]
    for row in scorer.score(rows, progress=bar.update):
      nll.add(-row.logprobs)
  bar.close()
  return PerplexityResult(nll=nll, text_bytes=stream.text_bytes, max_length=max_length, stride=stride,
                          windows=len(spans), documents=stream.documents, truncated=stream.truncated)
