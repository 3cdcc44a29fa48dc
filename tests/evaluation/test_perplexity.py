"""Perplexity of a run on a corpus: the window scheme, the token stream and its bytes against brute-force
references, the model's numbers against `transformers` on the same converted checkpoint (Hugging Face's own
perplexity loop), and the command line end to end with its one-line errors."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from flax import nnx

from superlm_jax.data.corpus import iter_documents
from superlm_jax.errors import UserError
from superlm_jax.evaluation.perplexity import (TokenStream, check_window, evaluate_perplexity, token_stream,
                                               window_spans)
from superlm_jax.models.transformer import build_model
from tests.conftest import numpy_init, tiny_model_config
from tests.system.test_cli import assert_one_line_error, run


def test_windows_score_every_token_once_with_the_context_of_their_window():
  rng = np.random.default_rng(0)
  for _ in range(300):
    n, max_length = int(rng.integers(1, 200)), int(rng.integers(1, 40))
    stride = int(rng.integers(1, max_length + 1))
    spans = window_spans(n, max_length, stride)
    scored = [j for begin, end, first in spans for j in range(begin + first, end)]
    assert scored == list(range(1, n))  # each token after the first, once, in order
    for k, (begin, end, first) in enumerate(spans):
      assert begin == k * stride and end - begin <= max_length + 1 and first >= 1
      for j in range(begin + first, end):
        # The closed form: token j is scored by the first window whose max_length + 1 tokens reach it.
        assert k == max(0, (j - max_length - 1) // stride + 1)
    if stride == max_length:  # disjoint scoring: consecutive windows share the one token the next predicts from
      assert len(spans) == math.ceil((n - 1) / max_length)
      assert all(b == e - 1 for (_, e, _), (b, _, _) in zip(spans, spans[1:]))


class ByteTokenizer:
  """One token per UTF-8 byte (id = byte + 1), EOS 0 or none: splits multi-byte characters between tokens."""

  def __init__(self, eos_id):
    self.eos_id = eos_id

  def encode_batch(self, texts):
    return [[b + 1 for b in text.encode("utf-8")] for text in texts]

  def decode(self, ids):
    return bytes(i - 1 for i in ids if i > 0).decode("utf-8", errors="replace")


def _valid_prefix_bytes(data: bytes) -> int:
  """Length of the longest prefix of `data` that is whole UTF-8 characters (brute force)."""
  for m in range(len(data), -1, -1):
    try:
      data[:m].decode("utf-8")
      return m
    except UnicodeDecodeError:
      pass
  return 0


def random_documents(rng, count, alphabet="abc xyz\né€😀"):
  return ["".join(rng.choice(list(alphabet), int(rng.integers(1, 30)))) for _ in range(count)]


@pytest.mark.parametrize("eos_id", [0, None])
def test_token_stream_joins_documents_and_counts_their_bytes(eos_id):
  rng = np.random.default_rng(1)
  tokenizer = ByteTokenizer(eos_id)
  for _ in range(40):
    docs = random_documents(rng, int(rng.integers(1, 6)))
    separator = [] if eos_id is None else [0]
    joined = [t for doc in docs for t in [b + 1 for b in doc.encode("utf-8")] + separator]
    whole = token_stream(docs, tokenizer)
    assert whole.tokens.tolist() == joined and whole.documents == len(docs) and not whole.truncated
    assert whole.text_bytes == sum(len(doc.encode("utf-8")) for doc in docs)

    max_tokens = int(rng.integers(1, len(joined) + 3))
    capped = token_stream(docs, tokenizer, max_tokens=max_tokens)
    kept = joined[:max_tokens + 1]
    assert capped.tokens.tolist() == kept
    assert capped.truncated == (len(kept) < len(joined))
    # Bytes: the whole documents kept, then the kept bytes of a cut one that are whole characters.
    boundaries = np.cumsum([len(doc.encode("utf-8")) + len(separator) for doc in docs])
    whole_docs = int(np.sum(boundaries <= len(kept)))
    expected = sum(len(doc.encode("utf-8")) for doc in docs[:whole_docs])
    if whole_docs < len(docs):
      start = int(boundaries[whole_docs - 1]) if whole_docs else 0
      expected += _valid_prefix_bytes(docs[whole_docs].encode("utf-8")[:len(kept) - start])
    assert capped.text_bytes == expected
    assert capped.documents == whole_docs + (len(kept) > (int(boundaries[whole_docs - 1]) if whole_docs else 0))


def _log_softmax64(logits):
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


@pytest.mark.parametrize("max_length, stride", [(16, 16), (16, 5), (16, 1)])
def test_each_token_is_scored_given_its_windows_tokens(max_length, stride):
  """Against a forward pass of exactly the context the closed form gives each scored token."""
  model = numpy_init(lambda: build_model(tiny_model_config(max_seq_len=16)), seed=4, std=0.3)
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, model.spec.vocab_size, 41).astype(np.int32)
  result = evaluate_perplexity(model, TokenStream(tokens, documents=1, text_bytes=123, truncated=False),
                               max_length=max_length, stride=stride, batch_size=3)
  # One row per scored token j: its context, right-padded (causal attention: invisible to the real positions).
  contexts = np.zeros((len(tokens) - 1, max_length), np.int32)
  last = []
  for j in range(1, len(tokens)):
    begin = max(0, (j - max_length - 1) // stride + 1) * stride
    contexts[j - 1, :j - begin] = tokens[begin:j]
    last.append(j - begin - 1)
  logits = nnx.jit(lambda m, t: m(t))(model, contexts)
  logp = _log_softmax64(np.asarray(logits)[np.arange(len(last)), last])
  nll = -logp[np.arange(len(last)), tokens[1:]]
  assert result.tokens == len(tokens) - 1
  np.testing.assert_allclose(result.nll.mean, np.mean(nll), rtol=1e-5)
  np.testing.assert_allclose(result.bits_per_byte, np.sum(nll) / math.log(2) / 123, rtol=1e-5)
  assert result.windows == len(window_spans(len(tokens), max_length, stride))


# ----------------------------------------------------------------------------------- a converted HF Llama
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(HF directory, run directory, corpus directory of three random documents) for the transformers comparison."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from superlm_jax import convert
  from tests.interop.hf_fixtures import TEXT, make_tiny_hf_llama

  import torch
  import transformers

  root = tmp_path_factory.mktemp("perplexity")
  hf_dir = make_tiny_hf_llama(root / "hf", max_position_embeddings=64)
  # Larger random weights than transformers' initialiser (std 0.02, a near-uniform next-token distribution), so
  # that a token's NLL depends on its context and a window scheme off by one token shows in the mean.
  hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
  torch.manual_seed(1)
  with torch.no_grad():
    for weight in hf_model.parameters():
      if weight.ndim == 2:
        weight.normal_(0.0, 0.25)
  hf_model.save_pretrained(hf_dir)
  run_dir = convert.from_hf(hf_dir, root / "run")
  rng = np.random.default_rng(3)
  words = " ".join(TEXT).split() + ["café", "naïve", "—", "😀"]  # some multi-byte characters
  corpus = root / "corpus"
  corpus.mkdir()
  for i in range(3):
    lines = [" ".join(rng.choice(words, int(rng.integers(3, 12)))) for _ in range(int(rng.integers(5, 12)))]
    (corpus / f"doc{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return hf_dir, run_dir, corpus


def hf_reference(hf_dir, corpus, max_tokens=0):
  """(token ids, text bytes) of the corpus by transformers' tokenizer, documents joined by <|endoftext|> (the eos id
  of the fixture's generation_config), and the loaded transformers model."""
  import transformers

  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
  texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.iterdir())]
  ids = [t for text in texts for t in tokenizer(text, add_special_tokens=False).input_ids + [eos]]
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
  return ids[:max_tokens + 1] if max_tokens else ids, sum(len(t.encode("utf-8")) for t in texts), model


def hf_guide_nll(model, ids, max_length, stride):
  """Summed NLL and token count by the loop of Hugging Face's "Perplexity of fixed-length models" guide (labels
  -100 on the context, the shift inside the model), with windows of max_length + 1 tokens and the log-softmax of
  torch's logits summed in float64."""
  import torch

  window, total, count, prev_end = max_length + 1, 0.0, 0, 0
  encodings = torch.tensor([ids])
  for begin in range(0, len(ids), stride):
    end = min(begin + window, len(ids))
    trg_len = end - prev_end
    input_ids = encodings[:, begin:end]
    target_ids = input_ids.clone()
    target_ids[:, :-trg_len] = -100
    with torch.no_grad():
      logits = model(input_ids).logits[0, :-1].double().numpy()
    labels = target_ids[0, 1:].numpy()
    keep = labels != -100
    total -= _log_softmax64(logits)[np.arange(len(labels))[keep], labels[keep]].sum()
    count += int(keep.sum())
    prev_end = end
    if end == len(ids):
      break
  return total, count


@pytest.mark.parametrize("stride, max_tokens", [(16, 0), (MAX_LENGTH, 0), (16, 100)])
def test_equals_transformers_perplexity_of_the_same_model(converted, stride, max_tokens):
  from superlm_jax.generate.restore import load_model, load_run_tokenizer

  hf_dir, run_dir, corpus = converted
  ids, text_bytes, hf_model = hf_reference(hf_dir, corpus, max_tokens)
  model, config, _ = load_model(run_dir)
  stream = token_stream(iter_documents(str(corpus)), load_run_tokenizer(run_dir, config), max_tokens=max_tokens)
  assert stream.tokens.tolist() == ids
  result = evaluate_perplexity(model, stream, max_length=MAX_LENGTH, stride=stride, batch_size=4)
  total, count = hf_guide_nll(hf_model, ids, MAX_LENGTH, stride)
  assert result.tokens == count == len(ids) - 1
  np.testing.assert_allclose(result.nll.mean, total / count, rtol=1e-5)
  np.testing.assert_allclose(result.perplexity, math.exp(total / count), rtol=1e-5)
  if not max_tokens:
    assert (result.text_bytes, result.documents, result.truncated) == (text_bytes, 3, False)
    np.testing.assert_allclose(result.bits_per_byte, total / math.log(2) / text_bytes, rtol=1e-5)
  else:
    assert result.truncated and result.text_bytes < text_bytes


SUMMARY = re.compile(r"^(?P<data>\S+): (?P<tokens>[\d,]+) tokens, NLL (?P<nll>[\d.]+) ± [\d.]+ nats/token, "
                     r"perplexity (?P<ppl>[\d.]+), (?P<bpb>[\d.]+) bits/byte \(step 0\)$", re.MULTILINE)


def test_cli_writes_the_report_and_prints_the_summary(converted):
  hf_dir, run_dir, corpus = converted
  proc = run("superlm_jax.evaluate", f"--checkpoint={run_dir}", f"--data={corpus}", f"--max_length={MAX_LENGTH}",
             "--stride=16", "--noprogress")
  assert proc.returncode == 0, proc.stderr
  report = json.loads((run_dir / "eval" / "corpus-step0.json").read_text())
  ids, text_bytes, hf_model = hf_reference(hf_dir, corpus)
  total, count = hf_guide_nll(hf_model, ids, MAX_LENGTH, 16)
  assert (report["tokens"], report["nll"]["n"], report["bytes"], report["documents"]) == (count, count, text_bytes, 3)
  np.testing.assert_allclose(report["nll"]["mean"], total / count, rtol=1e-5)
  np.testing.assert_allclose(report["bits_per_byte"], total / math.log(2) / text_bytes, rtol=1e-5)
  assert (report["step"], report["max_length"], report["stride"], report["data"]) == (0, MAX_LENGTH, 16, str(corpus))
  assert report["checkpoint"] == str(run_dir) and report["config"] and report["machine"] and report["time_s"] > 0
  summary = SUMMARY.search(proc.stdout)
  assert summary, proc.stdout
  assert int(summary["tokens"].replace(",", "")) == count
  assert float(summary["ppl"]) == pytest.approx(math.exp(total / count), rel=1e-2)
  assert f"Report: {run_dir / 'eval' / 'corpus-step0.json'}" in proc.stdout


def test_cli_bad_flags_checkpoint_or_corpus_is_one_line_before_any_model_loads(tmp_path):
  missing, not_a_run = tmp_path / "nowhere", tmp_path / "empty"
  not_a_run.mkdir()
  (tmp_path / "text.txt").write_text("some text\n")
  cases = [
      ([f"--checkpoint={missing}", f"--data={tmp_path / 'text.txt'}"], ["checkpoint directory", str(missing)]),
      ([f"--checkpoint={not_a_run}", f"--data={missing}.txt"], ["corpus path does not exist", f"{missing}.txt"]),
      ([f"--checkpoint={missing}", "--data=shakespeare", "--stride=0"], ["--stride=0"]),
      ([f"--checkpoint={missing}", "--data=shakespeare", "--max_length=8", "--stride=9"], ["--stride=9", "max_length"]),
      ([f"--checkpoint={missing}"], ["--data"]),
  ]
  for args, fragments in cases:
    assert_one_line_error(run("superlm_jax.evaluate", *args, "--noprogress"), *fragments)


def test_cli_window_longer_than_the_model_context_is_one_line(converted):
  _, run_dir, corpus = converted
  proc = run("superlm_jax.evaluate", f"--checkpoint={run_dir}", f"--data={corpus}", "--max_length=65", "--noprogress")
  assert_one_line_error(proc, "max_length=65", "context of 64")
  for max_length, stride, fragment in [(65, 1, "context of 64"), (0, 1, "max_length=0"), (64, 65, "stride=65"),
                                       (64, 0, "stride=0")]:  # the default stride is the model context
    with pytest.raises(UserError, match=fragment):
      check_window(max_length, stride, context=64)
