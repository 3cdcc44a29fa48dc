"""A run directory keeps its identity (issue 16, point 6): resuming with data settings that change what the saved
iterator position means is refused with one line naming them, and writes nothing; train.allow_data_change lets it
continue; a plain resume rewrites nothing; `sample` refuses a tokenizer larger than the model's vocabulary."""

import shutil
from pathlib import Path

import pytest

from superlm_jax import checkpoint as ckpt_lib
from superlm_jax.data.prepare import prepare
from superlm_jax.errors import UserError
from superlm_jax.generate.restore import load_for_inference
from superlm_jax.training.loop import train
from tests.conftest import tiny_train_config
from tests.training.test_checkpoint import assert_one_line_user_error

LEGACY_RUN = Path(__file__).parent.parent / "fixtures" / "legacy_runs" / "gpt2_gqa_scan"  # vocabulary of 61


def run_config(workdir, data_dir, **train_overrides):
  """The shared tiny config, 4 steps, one validation batch (evaluated only when a call ends)."""
  return tiny_train_config(workdir, data_dir, steps=4, eval_every=0, eval_batches=1, **train_overrides)


def snapshot(workdir: Path) -> dict:
  """Every file of the run directory outside its checkpoints, with its bytes and modification time."""
  return {str(p.relative_to(workdir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(workdir.rglob("*"))
          if p.is_file() and "checkpoints" not in p.relative_to(workdir).parts}


def test_changed_data_settings_are_refused_and_nothing_is_rewritten(tmp_path, shakespeare_data_dir):
  workdir = tmp_path / "run"
  config = lambda **train_overrides: run_config(workdir, shakespeare_data_dir, **train_overrides)
  train(config(), progress=False, stop_at=2)
  before = snapshot(workdir)
  assert {"config.json", "tokenizer.model"} <= set(before)

  changed = config(batch_size=16)
  changed.data.stride = 8
  with pytest.raises(UserError) as excinfo:
    train(changed, progress=False)
  assert_one_line_user_error(excinfo, f"resuming {workdir} with different data settings", "data.stride 16 -> 8",
                             "train.batch_size 8 -> 16", "--config.train.allow_data_change=true")
  assert "data.seed" not in str(excinfo.value) and "the tokenizer (" not in str(excinfo.value)
  assert snapshot(workdir) == before  # config.json, tokenizer.model, metrics: same bytes, not even touched
  assert ckpt_lib.Checkpointer(workdir / "checkpoints", keep=3, create=False).all_steps() == [2]

  train(config(), progress=False, stop_at=3)  # A plain resume: the same config and tokenizer are not rewritten.
  after = snapshot(workdir)
  assert after["config.json"] == before["config.json"] and after["tokenizer.model"] == before["tokenizer.model"]

  allowed = config(allow_data_change=True)
  allowed.data.stride = 8
  result = train(allowed, progress=False)
  assert int(result.state["step"]) == 4
  assert ckpt_lib.load_run_config(workdir).data.stride == 8  # The run continues: its config says what it now is.
  assert not [p for p in workdir.iterdir() if p.name.startswith(".")]  # No temporary file left behind.


def test_a_different_tokenizer_is_refused(tmp_path, shakespeare_data_dir):
  """The tokenizer is compared by content: a run resumed with another one (here: one trained on another split,
  data.seed) is refused naming both the setting and the tokenizer."""
  workdir = tmp_path / "run"
  train(run_config(workdir, shakespeare_data_dir), progress=False, stop_at=2)
  before = snapshot(workdir)
  reseeded = run_config(workdir, shakespeare_data_dir)
  reseeded.data.seed = 1
  with pytest.raises(UserError) as excinfo:
    train(reseeded, progress=False)
  assert_one_line_user_error(excinfo, "data.seed 0 -> 1", "the tokenizer (tokenizer.model of", "differ")
  assert snapshot(workdir) == before


def test_save_tokenizer_and_config_writes_only_changes_atomically(tmp_path):
  source = tmp_path / "data"
  source.mkdir()
  (source / "tokenizer.model").write_bytes(b"\x00sentencepiece")
  run = tmp_path / "run"
  config = tiny_train_config(run, str(source))
  ckpt_lib.save_tokenizer_and_config(run, source, config)
  stamps = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
  ckpt_lib.save_tokenizer_and_config(run, source, config)
  assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == stamps
  # Another kind of tokenizer replaces the old one entirely: a stale tokenizer.model would be loaded first.
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "tokenizer.json").write_text("{}")
  config.train.steps = 9
  ckpt_lib.save_tokenizer_and_config(run, hf, config)
  assert sorted(p.name for p in run.iterdir()) == ["config.json", "tokenizer.json"]
  assert ckpt_lib.load_run_config(run).train.steps == 9


def test_sample_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, shakespeare_data_dir):
  data_dir = prepare(tiny_train_config(tmp_path / "unused", shakespeare_data_dir).data, 512)
  run = tmp_path / "legacy"
  shutil.copytree(LEGACY_RUN, run)
  shutil.copyfile(data_dir / "tokenizer.model", run / "tokenizer.model")  # 512 pieces for a 61-row embedding
  with pytest.raises(UserError) as excinfo:
    load_for_inference(run)
  assert_one_line_user_error(excinfo, str(run), "512 tokens", "model.vocab_size=61")
