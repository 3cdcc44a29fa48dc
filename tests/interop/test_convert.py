"""`python -m superlm_jax.convert`: a Hugging Face directory (made by transformers, with a `tokenizers`
tokenizer.json) becomes a run directory that sample and a warm-started train accept, and goes back to a directory
transformers loads to the identical model."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from tests.system.test_cli import assert_one_line_error, run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from superlm_jax import convert  # noqa: E402
from superlm_jax.config import base_config  # noqa: E402
from superlm_jax.generate.restore import load_for_inference, load_model  # noqa: E402
from superlm_jax.training.loop import train  # noqa: E402

TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"] * 20


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny SmolLM2-like Llama (GQA, tied embeddings) with a byte-level BPE tokenizer.json, saved by HF."""
  path = tmp_path_factory.mktemp("hf_llama")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(TEXT, tokenizers.trainers.BpeTrainer(
      vocab_size=120, special_tokens=["<|endoftext|>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path / "tokenizer.json"))
  vocab = tok.get_vocab_size()
  config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=None)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  return path


def test_from_hf_run_samples_warm_starts_and_exports_back(hf_dir, tmp_path):
  run_dir = convert.from_hf(hf_dir, tmp_path / "run")
  assert {p.name for p in run_dir.iterdir()} == {"config.json", "tokenizer.json", "special_tokens.json",
                                                  "checkpoints"}
  assert json.loads((run_dir / "special_tokens.json").read_text())["eos_id"] == 0
  generator, tokenizer, config, step = load_for_inference(run_dir)
  assert (step, config.model.num_kv_heads, tokenizer.eos_id) == (0, 2, 0)
  prompt = tokenizer.encode("To be, or not")
  assert tokenizer.decode(prompt) == "To be, or not"

  # A warm start on a corpus of text files: the converted weights, its tokenizer, its architecture.
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(4):
    (corpus / f"doc{i}.txt").write_text("\n".join(TEXT[i::4]))
  train_config = base_config()
  train_config.data.update(corpus=str(corpus), dir=str(tmp_path / "data"), max_length=16, stride=16,
                           val_fraction=0.25)
  train_config.train.update(workdir=str(tmp_path / "warm"), init_from=str(run_dir), steps=2, batch_size=8,
                            learning_rate=0.0, warmup_steps=1, eval_batches=1, sample_every=0, log_every=1)
  train(train_config, progress=False)
  warm, warm_config, _ = load_model(tmp_path / "warm")
  converted, _, _ = load_model(run_dir)
  assert warm_config.model.to_dict() == config.model.to_dict()
  assert (tmp_path / "warm" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
  for a, b in zip(jax.tree.leaves(nnx.state(converted, nnx.Param)), jax.tree.leaves(nnx.state(warm, nnx.Param))):
    assert np.array_equal(np.asarray(a), np.asarray(b)), "learning rate 0 must leave the warm-started weights"

  exported = convert.to_hf(run_dir, tmp_path / "export")
  original = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
  again = transformers.LlamaForCausalLM.from_pretrained(exported).eval()
  tokens = torch.from_numpy(np.random.default_rng(0).integers(0, original.config.vocab_size, (2, 20)))
  with torch.no_grad():
    assert torch.equal(original(tokens).logits, again(tokens).logits)
  assert (exported / "tokenizer.json").is_file()


def test_cli_converts_and_sample_reads_it(hf_dir, tmp_path):
  proc = run("superlm_jax.convert", f"--from_hf={hf_dir}", f"--to={tmp_path / 'run'}")
  assert proc.returncode == 0, proc.stderr
  assert "llama" in proc.stdout and "checkpoint step 0" in proc.stdout
  proc = run("superlm_jax.sample", f"--checkpoint={tmp_path / 'run'}", "--prompt=To be", "--max_new_tokens=5",
             "--temperature=0")
  assert proc.returncode == 0, proc.stderr
  assert "To be" in proc.stdout
  # An existing output is never overwritten; a missing input is one line naming it.
  assert_one_line_error(run("superlm_jax.convert", f"--from_hf={hf_dir}", f"--to={tmp_path / 'run'}"),
                        "already exists")
  assert_one_line_error(run("superlm_jax.convert", f"--from_hf={tmp_path / 'nowhere'}", f"--to={tmp_path / 'x'}"),
                        "nowhere", "does not exist")
  assert not (tmp_path / "x").exists()
