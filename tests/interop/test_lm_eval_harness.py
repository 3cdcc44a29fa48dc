"""The lm-evaluation-harness adapter (`--model superlm_jax`) scores a converted checkpoint as lm-eval's own `hf`
model scores the Hugging Face original: per-sample log-likelihoods within 1e-4, the same greedy flags, identical
greedy generations and equal metrics, on local tasks written here (multiple choice, rolling perplexity over texts
longer than the context, generation with a stop string), all offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read by `datasets` when imported: no hub look-ups
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from lm_eval.tasks import TaskManager  # noqa: E402

from superlm_jax import convert  # noqa: E402
from superlm_jax.errors import UserError  # noqa: E402
from superlm_jax.interop.lm_eval_harness import SuperLMJax  # noqa: E402
from tests.interop.hf_fixtures import TEXT, make_tiny_hf_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TASKS = ("tiny_mc", "tiny_ppl", "tiny_gen")
LINES = sorted(set(TEXT))


def _json(path: Path, rows: list[dict]) -> str:
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def greedy_choice(hf_dir: Path) -> dict:
  """A multiple-choice doc whose right choice is the reference model's own greedy next token, so that is_greedy is
  True for one request (a random model's greedy text is otherwise never among hand-written choices). The token is
  ASCII and encodes the same after its question as alone, so lm-eval's context/continuation split keeps it whole."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  for line in LINES:
    for cut in range(8, len(line)):
      question = line[:cut]
      ids = tokenizer(question, add_special_tokens=False).input_ids
      with torch.no_grad():
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
      text = tokenizer.decode([token])
      if text.isascii() and text.strip() and tokenizer(question + text, add_special_tokens=False).input_ids == (
          ids + [token]):
        return {"question": question, "choices": [text, text + "zq"], "answer": 0}
  raise AssertionError("no question has an ASCII greedy next token")


def write_tasks(root: Path, greedy_doc: dict) -> Path:
  """Three lm-eval task configs on jsonl files in `root`: their shapes reach every branch of the adapter (an empty
  context, contexts longer than the 64-token model, texts that roll over several windows, a stop string)."""
  long_question = " ".join(LINES * 3)  # ~200 tokens: truncated on the left
  mc = [{"question": "To be, or not to be,", "choices": [" that is the question:", " a sea of troubles"], "answer": 0},
        {"question": "The slings and arrows", "choices": [" of outrageous fortune,", " nobler", " in the mind"],
         "answer": 0},
        {"question": "", "choices": ["Whether 'tis", "Or to take arms"], "answer": 1},
        {"question": "The slings and arrows of outrageous fortune,", "choices": [",", ";"], "answer": 0},
        {"question": long_question, "choices": [" to suffer", " against a sea"], "answer": 1}, greedy_doc]
  ppl = [{"text": "\n".join(LINES)}, {"text": "\n".join(LINES * 2)}, {"text": LINES[2]}]
  gen = [{"prompt": line, "target": "x"} for line in LINES] + [{"prompt": long_question, "target": "x"}]
  files = {name: _json(root / f"{name}.jsonl", rows) for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen))}
  common = lambda name, task: {"task": task, "dataset_path": "json", "test_split": "test",
                               "dataset_kwargs": {"data_files": {"test": files[name]}}}
  configs = {
      "tiny_mc": {**common("mc", "tiny_mc"), "output_type": "multiple_choice", "doc_to_text": "{{question}}",
                  "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "target_delimiter": "",
                  "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
      "tiny_ppl": {**common("ppl", "tiny_ppl"), "output_type": "loglikelihood_rolling", "doc_to_text": "",
                   "doc_to_target": "{{text}}",
                   "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]},
      "tiny_gen": {**common("gen", "tiny_gen"), "output_type": "generate_until", "doc_to_text": "{{prompt}}",
                   "doc_to_target": "{{target}}", "generation_kwargs": {"until": ["e", "\n"], "max_gen_toks": 8,
                                                                         "do_sample": False},
                   "metric_list": [{"metric": "exact_match"}]},
  }
  for task, config in configs.items():  # JSON is YAML
    (root / f"{task}.yaml").write_text(json.dumps(config, indent=2))
  return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("lm_eval")
  hf_dir = make_tiny_hf_llama(root / "hf", initializer_range=0.5)  # greedy text that varies
  run_dir = convert.from_hf(hf_dir, root / "run")
  tasks = root / "tasks"
  tasks.mkdir()
  return hf_dir, run_dir, write_tasks(tasks, greedy_choice(hf_dir))


def local_tasks(tasks_dir: Path) -> TaskManager:
  """Only the tasks written here: indexing lm-eval's thousands of built-in task files takes ~15 s a time."""
  return TaskManager(include_path=str(tasks_dir), include_defaults=False)


def evaluate(model: str, model_args: str, task_manager: TaskManager, batch_size: int) -> dict:
  return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), batch_size=batch_size,
                                 log_samples=True, task_manager=task_manager, bootstrap_iters=0)


def by_doc(results: dict, task: str) -> list[dict]:
  return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def loglikelihoods(results: dict, task: str) -> list[tuple[float, bool | None]]:
  """(log-likelihood, is_greedy) per request in document order; is_greedy is None for rolling ones."""
  rows = []
  for sample in by_doc(results, task):
    for (response,) in sample["resps"]:
      rows.append(tuple(response) if isinstance(response, (tuple, list)) else (response, None))
  return rows


def test_scores_and_generations_match_lm_eval_hf_model(setup):
  pytest.importorskip("accelerate")  # lm-eval's `hf` model imports it
  hf_dir, run_dir, tasks_dir = setup
  task_manager = local_tasks(tasks_dir)
  ours = evaluate("superlm_jax", f"checkpoint={run_dir}", task_manager, batch_size=4)
  reference = evaluate("hf", f"pretrained={hf_dir},dtype=float32,device=cpu", task_manager, batch_size=1)

  for task in ("tiny_mc", "tiny_ppl"):
    mine, theirs = loglikelihoods(ours, task), loglikelihoods(reference, task)
    assert len(mine) == len(theirs)
    worst = max(abs(a[0] - b[0]) for a, b in zip(mine, theirs))
    print(f"{task}: max |loglikelihood - hf| = {worst:.2e} over {len(mine)} requests")
    assert worst <= 1e-4, task
    assert [a[1] for a in mine] == [b[1] for b in theirs], task  # is_greedy (None for rolling)
  assert any(greedy for _, greedy in loglikelihoods(ours, "tiny_mc")), "no greedy continuation was checked"

  generations = [(a["resps"], b["resps"]) for a, b in zip(by_doc(ours, "tiny_gen"), by_doc(reference, "tiny_gen"))]
  print("generations:", [g[0] for g in generations])
  assert all(mine == theirs for mine, theirs in generations), generations
  assert any(len(r[0][0]) for r, _ in generations), "the random model generated nothing to compare"

  for task in TASKS:
    mine, theirs = ours["results"][task], reference["results"][task]
    metrics = {k for k, v in theirs.items() if isinstance(v, float) and "stderr" not in k}
    assert metrics and metrics <= set(mine)
    for key in metrics:
      assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), (task, key)


@pytest.mark.parametrize("add_bos_token", [None, True, False])
def test_encoding_follows_hflm(setup, add_bos_token):
  """HFLM's BOS rule (the tokenizer's default, or add_bos_token; none added to a text that starts with it) with
  the tokenizer the conversion copied; the tasks above only reach the default."""
  pytest.importorskip("accelerate")  # lm-eval's `hf` model imports it
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel

  hf_dir, run_dir, _ = setup
  bos = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
  ours, theirs = SuperLMJax(checkpoint=str(run_dir), **bos), HFLM(pretrained=str(hf_dir), device="cpu", **bos)
  assert ours.prefix_token_id == theirs.prefix_token_id
  for text in ("To be, or not", "<|endoftext|>To be", " slings", ""):
    assert ours.tok_encode(text) == theirs.tok_encode(text), text
    assert ours.tok_encode(text, add_special_tokens=False) == theirs.tok_encode(text, add_special_tokens=False)
    assert ours.tok_encode(text, left_truncate_len=2) == theirs.tok_encode(text, left_truncate_len=2)


def test_bad_model_args_are_one_line_errors(setup):
  _, run_dir, _ = setup
  with pytest.raises(UserError, match="checkpoint=RUN_DIR"):
    SuperLMJax()
  with pytest.raises(UserError, match="unknown model_args chekpoint"):
    SuperLMJax(chekpoint=str(run_dir))
  with pytest.raises(UserError, match="longer than the model context of 64"):
    SuperLMJax(checkpoint=str(run_dir), max_length=65)
  with pytest.raises(UserError, match="max_gen_toks='x' must be an integer >= 1"):
    SuperLMJax(checkpoint=str(run_dir), max_gen_toks="x")


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(REPO), *sys.path[1:]]),
             HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
  return subprocess.run([sys.executable, "-m", "superlm_jax.eval_harness", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_wrapper_cli_runs_a_task_end_to_end(setup, tmp_path):
  _, run_dir, tasks_dir = setup
  done = _cli("--model", "superlm_jax", "--model_args", f"checkpoint={run_dir}", "--tasks", "tiny_mc",
              "--include_path", str(tasks_dir), "--limit", "2", "--batch_size", "2", "--output_path",
              str(tmp_path / "out"))
  assert done.returncode == 0, done.stderr[-3000:]
  assert "tiny_mc" in done.stdout and "acc" in done.stdout
  assert list((tmp_path / "out").rglob("results_*.json"))


def test_wrapper_cli_names_an_unknown_task_in_one_line(setup, monkeypatch, capsys):
  """In process (lm-eval's built-in tasks left out of the index, as above): the same code path as the CLI's."""
  from superlm_jax import eval_harness  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr("lm_eval.tasks.TaskManager", lambda **kwargs: TaskManager(**kwargs, include_defaults=False))
  with pytest.raises(SystemExit) as exit_info:
    eval_harness.main(["--model", "superlm_jax", "--model_args", f"checkpoint={setup[1]}", "--tasks", "no_such_task"])
  err = capsys.readouterr().err
  assert exit_info.value.code == 1 and "Traceback" not in err
  assert err.strip().splitlines()[-1].startswith("error: lm-eval does not know the task(s) no_such_task"), err


def test_wrapper_without_lm_eval_says_how_to_install(monkeypatch, capsys):
  from superlm_jax import eval_harness  # pylint: disable=import-outside-toplevel

  monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)  # `import` raises ImportError
  with pytest.raises(SystemExit) as exit_info:
    eval_harness.main(["--tasks", "x"])
  assert exit_info.value.code == 1
  expected = 'error: lm-evaluation-harness is not installed: pip install "superlm_jax[eval]"'
  assert capsys.readouterr().err.strip() == expected


def test_chat_template_is_the_tokenizers_and_a_prefill_is_one_line(setup):
  import transformers

  from superlm_jax.errors import UserError
  from superlm_jax.interop.lm_eval_harness import SuperLMJax
  hf_dir, run_dir, _ = setup
  lm = SuperLMJax(checkpoint=str(run_dir))
  messages = [{"role": "user", "content": "To be, or not to be?"}, {"role": "assistant", "content": "That is"},
              {"role": "user", "content": "the question:"}]
  reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
  assert lm.apply_chat_template(messages) == reference.apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=True)
  with pytest.raises(UserError, match="cannot continue a final assistant message"):
    lm.apply_chat_template(messages[:2], add_generation_prompt=False)
