"""A converted Hugging Face chat model generates as `transformers.generate` does with it: every EOS id of its
generation config stops a row, stop strings stop where transformers' stop, per-token log-probabilities equal
transformers' (log-softmax of `output_logits`), min-p equals `MinPLogitsWarper`, the generation_config.json
defaults become `sample`'s and go back on export, and `--chat` renders the tokenizer's template as
`apply_chat_template` does."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from superlm_jax import convert  # noqa: E402
from superlm_jax.errors import UserError  # noqa: E402
from superlm_jax.generate.chat import render_chat  # noqa: E402
from superlm_jax.generate.decode import SamplingParams  # noqa: E402
from superlm_jax.generate.restore import load_for_inference  # noqa: E402
from superlm_jax.generate.sampling import min_p_filter  # noqa: E402
from superlm_jax.checkpoint import load_run_config  # noqa: E402
from tests.interop.hf_fixtures import make_tiny_hf_llama  # noqa: E402
from tests.system.test_cli import assert_one_line_error, run  # noqa: E402

PROMPTS = ["To be, or not", "The slings and", "Whether 'tis nobler in the mind"]
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return make_tiny_hf_llama(tmp_path_factory.mktemp("hf_chat") / "hf", seed=1, initializer_range=0.5)


def hf_generate(model, hf_tokenizer, prompt, **kwargs):
  ids = torch.tensor([hf_tokenizer(prompt, add_special_tokens=False).input_ids])
  with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                         return_dict_in_generate=True, output_logits=True, **kwargs)
  return out.sequences[0, ids.shape[1]:].tolist(), out.logits


def with_generation_config(hf_dir, tmp_path, **fields):
  """A copy of the checkpoint whose generation_config.json has `fields`."""
  import shutil
  copy = tmp_path / "hf_copy"
  shutil.copytree(hf_dir, copy)
  path = copy / "generation_config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
  return copy


def test_every_eos_id_stops_a_row_and_logprobs_equal_transformers(hf_dir, tmp_path):
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  # Greedy continuations without any EOS; the second EOS id of the list is a token that the rows produce, at
  # different steps, so the list (not just its first id) has to be honoured, per row.
  free = [hf_generate(model, tokenizer, p, eos_token_id=None)[0] for p in PROMPTS]
  k = next(k for k in range(3, 16) if free[0][k] not in free[0][:k] and free[0][k] != 1)
  stopper = free[0][k]
  stop_hf = with_generation_config(hf_dir, tmp_path, eos_token_id=[1, stopper])
  model = transformers.AutoModelForCausalLM.from_pretrained(stop_hf).eval()
  run_dir = convert.from_hf(stop_hf, tmp_path / "run")
  generator, ours_tokenizer, _, _ = load_for_inference(run_dir)
  assert ours_tokenizer.eos_ids == (1, stopper)
  rows = generator.generate_rows([ours_tokenizer.encode(p) for p in PROMPTS], GREEDY,
                                 eos_ids=ours_tokenizer.eos_ids)
  for prompt, row in zip(PROMPTS, rows):
    theirs, logits = hf_generate(model, tokenizer, prompt)
    ended = theirs[-1] in (1, stopper)
    assert row.ids == (theirs[:-1] if ended else theirs)  # ours leaves the EOS out
    assert row.finish_reason == ("eos" if ended else "length")
    reference = [float(torch.log_softmax(step[0].double(), -1)[t]) for step, t in zip(logits, theirs)]
    np.testing.assert_allclose(row.logprobs, reference[:len(row.ids)], atol=1e-4)
  assert rows[0].finish_reason == "eos" and len(rows[0].ids) == k


def test_stop_strings_stop_where_transformers_stops(hf_dir):
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  # A stop string that the text first contains when (and because) token k is appended, and that ends with it:
  # where both conventions (contains: ours, lm-eval's, vLLM's; ends with: transformers') stop at the same token.
  # Whole ASCII tokens only: a random byte-level model also emits lone UTF-8 bytes, which decode to U+FFFD.
  def candidates():
    for prompt in PROMPTS:
      free, _ = hf_generate(model, tokenizer, prompt, eos_token_id=None)
      for k in range(1, len(free)):
        piece = tokenizer.decode(free[k:k + 1])
        if len(piece.strip()) >= 2 and piece.isascii() and piece not in tokenizer.decode(free[:k]):
          yield prompt, free, k, piece
  prompt, free, k, stop = next(candidates())
  theirs, _ = hf_generate(model, tokenizer, prompt, eos_token_id=None, stop_strings=[stop], tokenizer=tokenizer)
  assert theirs == free[:k + 1]
  generator, ours_tokenizer, _, _ = load_for_inference(convert.from_hf(hf_dir, hf_dir.parent / "run_stop"))
  [row] = generator.generate_rows([ours_tokenizer.encode(prompt)], GREEDY, stop_strings=[stop],
                                  decode=ours_tokenizer.decode)
  assert (row.ids, row.finish_reason) == (theirs, "stop")
  with pytest.raises(UserError, match="stop strings must be non-empty"):
    generator.generate_rows([ours_tokenizer.encode(prompt)], GREEDY, stop_strings=[""], decode=ours_tokenizer.decode)


def test_min_p_equals_transformers_warper():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
  for min_p in (0.05, 0.3, 0.9):
    theirs = transformers.generation.logits_process.MinPLogitsWarper(min_p)(None, torch.from_numpy(logits)).numpy()
    ours = np.asarray(min_p_filter(logits, min_p))
    assert np.array_equal(np.isinf(ours), np.isinf(theirs)) and 0 < np.isinf(ours).sum() < ours.size
    np.testing.assert_array_equal(ours[~np.isinf(ours)], logits[~np.isinf(theirs)])
  assert np.array_equal(np.asarray(min_p_filter(logits, 0.0)), logits)


def test_generation_config_becomes_sample_defaults_and_goes_back(hf_dir, tmp_path):
  greedy = load_run_config(convert.from_hf(hf_dir, tmp_path / "greedy")).sample
  assert greedy.temperature == 0.0  # no do_sample: transformers decodes greedily
  sampling = with_generation_config(hf_dir, tmp_path, do_sample=True, temperature=0.6, top_p=0.9, min_p=0.05,
                                    repetition_penalty=1.1, max_new_tokens=33)
  run_dir = convert.from_hf(sampling, tmp_path / "sampling")
  s = load_run_config(run_dir).sample
  assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty, s.max_new_tokens) == (
      0.6, 50, 0.9, 0.05, 1.1, 33)  # top_k: transformers' default of 50 where the file gives none
  exported = convert.to_hf(run_dir, tmp_path / "export")
  config = transformers.GenerationConfig.from_pretrained(exported)
  assert (config.do_sample, config.temperature, config.top_k, config.top_p, config.min_p,
          config.repetition_penalty, config.max_new_tokens, config.eos_token_id) == (
      True, 0.6, 50, 0.9, 0.05, 1.1, 33, [0, 2])
  assert (exported / "tokenizer_config.json").is_file()


CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "To be?"},
                {"role": "assistant", "content": "Or not."}, {"role": "user", "content": "That is the question:"}]
# Uses what real templates use: the special-token variables, loop.first/last, namespace, raise_exception, tojson.
RICH_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>{% if not loop.last %}\n{% endif %}"
    "{% endfor %}\n{{ {'turns': ns.n} | tojson }}{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template", [None, RICH_TEMPLATE])
def test_chat_template_renders_and_encodes_as_transformers(hf_dir, tmp_path, template):
  source = hf_dir if template is None else make_tiny_hf_llama(tmp_path / "rich", chat_template=template, seed=1)
  reference = transformers.AutoTokenizer.from_pretrained(source)
  _, ours, _, _ = load_for_inference(convert.from_hf(source, tmp_path / "run"))
  for messages in (CONVERSATION, CONVERSATION[1:2]):
    text = render_chat(ours.chat_template, messages, special_tokens=ours.special_tokens)
    assert text == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ours.encode(text) == list(ids)


def test_sample_chat_cli_and_its_bad_input(hf_dir, tmp_path):
  run_dir = convert.from_hf(hf_dir, tmp_path / "run")
  conversation = tmp_path / "chat.json"
  conversation.write_text(json.dumps(CONVERSATION[1:2]))
  proc = run("superlm_jax.sample", f"--checkpoint={run_dir}", f"--conversation={conversation}", "--max_new_tokens=6",
             "--logprobs", "--min_p=0.1", "--temperature=0.7", "--stop=zzz")
  assert proc.returncode == 0, proc.stderr
  assert "log-probabilities" in proc.stdout and "<|im_start|>" not in proc.stdout.splitlines()[0]
  plain = convert.from_hf(make_tiny_hf_llama(tmp_path / "plain", chat_template=None), tmp_path / "plain_run")
  assert_one_line_error(run("superlm_jax.sample", f"--checkpoint={plain}", "--chat", "--prompt=hi"),
                        "needs a chat template")
  assert_one_line_error(run("superlm_jax.sample", f"--checkpoint={run_dir}", "--stop="), "stop strings")
  assert_one_line_error(run("superlm_jax.sample", f"--checkpoint={run_dir}", f"--conversation={tmp_path}/none.json"),
                        "none.json does not exist")
