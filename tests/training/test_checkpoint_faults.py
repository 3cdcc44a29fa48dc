"""Checkpoint faults (issue 16, point 5): a save that fails stops the run in one line naming the directory and the
free space, leaves no partial folder and keeps the earlier checkpoints; an unreadable latest checkpoint makes
`train` and `sample` fall back to the newest readable one with one warning line naming it, or fail in one line.

A full disk is made real for one process with RLIMIT_FSIZE (writes past the limit fail with EFBIG inside
TensorStore, exactly where ENOSPC would): the tests run as root, for whom a read-only directory blocks nothing, and a
small filesystem needs mount rights. A vanished checkpoint directory is the other failing save.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from superlm_jax import checkpoint as ckpt_lib
from superlm_jax.errors import UserError
from superlm_jax.generate.restore import load_model
from superlm_jax.training.loop import train
from tests.conftest import tiny_train_config
from tests.training.test_checkpoint import assert_one_line_user_error

REPO = Path(__file__).resolve().parents[2]
# `python -m superlm_jax.train` in a process whose files may not grow past 20 kB (a checkpoint's chunk files do).
DISK_NEARLY_FULL = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                    "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY)); "
                    "sys.argv[0] = 'superlm_jax.train'; runpy.run_module('superlm_jax.train', run_name='__main__')")


def run_config(workdir, data_dir, steps=6):
  return tiny_train_config(workdir, data_dir, steps=steps, ckpt_every=2, eval_every=0, eval_batches=1)


def leftovers(directory: Path) -> list[str]:
  return sorted(p.name for p in directory.iterdir() if "tmp" in p.name)


def garble(step_dir: Path, seed: int = 0) -> None:
  """The TensorStore chunks of the weights overwritten with random bytes of their size (metadata intact)."""
  chunks = sorted(p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d")
  assert chunks
  rng = np.random.default_rng(seed)
  for path in chunks:
    path.write_bytes(rng.integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def test_a_full_disk_stops_training_in_one_line_and_keeps_the_checkpoints(tmp_path, shakespeare_data_dir):
  workdir = tmp_path / "run"
  train(run_config(workdir, shakespeare_data_dir), progress=False, stop_at=2)
  directory = workdir / "checkpoints"
  reference = ckpt_lib.Checkpointer(directory, keep=3, create=False).restore(2)[0]["params"]

  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  cfg = run_config(workdir, shakespeare_data_dir)
  result = subprocess.run(
      [sys.executable, "-c", DISK_NEARLY_FULL, "--config=configs/gpt2_small.py:tiny",
       *[f"--config.model.{k}={v}" for k, v in cfg.model.items() if k in
         ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len")],
       f"--config.data.dir={shakespeare_data_dir}", "--config.data.max_length=32", "--config.data.stride=16",
       *[f"--config.train.{k}={v}" for k, v in cfg.train.items() if k in
         ("workdir", "steps", "batch_size", "learning_rate", "warmup_steps", "log_every", "eval_every",
          "eval_batches", "ckpt_every", "keep_checkpoints", "sample_every")]],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

  assert result.returncode == 1, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("train", "\r"))]
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert errors[0].startswith(f"error: cannot save checkpoint step 4 in {directory} (File too large: "), errors[0]
  assert " free on " in errors[0] and "the earlier checkpoints are kept" in errors[0], errors[0]
  assert len(result.stderr.splitlines()) < 15, result.stderr  # Not Orbax's and TensorStore's hundreds of lines.
  assert leftovers(directory) == []  # No partial step folder.
  checkpointer = ckpt_lib.Checkpointer(directory, keep=3, create=False)
  assert checkpointer.all_steps() == [2]
  jax.tree.map(np.testing.assert_array_equal, checkpointer.restore(2)[0]["params"], reference)


def test_a_vanished_directory_fails_the_save_in_one_line(tmp_path, shakespeare_data_dir):
  workdir = tmp_path / "run"
  state = train(run_config(workdir, shakespeare_data_dir), progress=False, stop_at=2).state
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=3)
  shutil.rmtree(workdir)
  workdir.write_text("not a directory any more")  # Gone, and nothing can be created in its place.
  with pytest.raises(UserError) as excinfo:
    checkpointer.save(3, state, meta={"step": 3})
    checkpointer.wait()
  assert_one_line_user_error(excinfo, f"cannot save checkpoint step 3 in {workdir / 'checkpoints'}",
                             f"free on {tmp_path}")
  assert workdir.read_text() == "not a directory any more"


@pytest.fixture(scope="module")
def run_with_two_checkpoints(tmp_path_factory, shakespeare_data_dir):
  """A run stopped at step 4 (checkpoints 2 and 4), and the same run trained to 6 without interruption."""
  root = tmp_path_factory.mktemp("faults")
  train(run_config(root / "run", shakespeare_data_dir), progress=False, stop_at=4)
  uninterrupted = train(run_config(root / "reference", shakespeare_data_dir), progress=False)
  return root / "run", jax.device_get(uninterrupted.state["params"])


def copy_run(source: Path, tmp_path: Path) -> Path:
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  return workdir


def test_train_falls_back_from_a_corrupt_latest_checkpoint(run_with_two_checkpoints, tmp_path, capsys,
                                                           shakespeare_data_dir):
  source, reference = run_with_two_checkpoints
  workdir = copy_run(source, tmp_path)
  garble(workdir / "checkpoints" / "4")

  result = train(run_config(workdir, shakespeare_data_dir), progress=False)
  err = capsys.readouterr().err
  warnings = [line for line in err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1, err
  assert f"checkpoint step 4 in {workdir / 'checkpoints'} is unreadable" in warnings[0]
  assert warnings[0].endswith("using step 2"), warnings[0]
  assert "Traceback" not in err and "Event loop is closed" not in err, err
  # The bad step went aside (kept, not deleted), and the run resumed from step 2 exactly.
  assert (workdir / "checkpoints.after-2" / "4").is_dir()
  assert ckpt_lib.Checkpointer(workdir / "checkpoints", keep=3, create=False).all_steps() == [2, 4, 6]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.state["params"]), reference)


def test_sample_falls_back_and_an_asked_for_step_fails(run_with_two_checkpoints, tmp_path, capsys):
  source, _ = run_with_two_checkpoints
  workdir = copy_run(source, tmp_path)
  good_model, _, _ = load_model(workdir, step=2)
  garble(workdir / "checkpoints" / "4")
  capsys.readouterr()

  model, _, step = load_model(workdir)
  err = capsys.readouterr().err
  assert [line for line in err.splitlines() if line.strip()] == [
      line for line in err.splitlines() if line.startswith("warning: checkpoint step 4 ")], err
  assert step == 2 and "using step 2" in err and "Traceback" not in err
  params = lambda m: jax.device_get(nnx.state(m, nnx.Param).to_pure_dict())
  jax.tree.map(np.testing.assert_array_equal, params(model), params(good_model))

  with pytest.raises(UserError) as excinfo:  # A step asked for is that step or an error, never another one.
    load_model(workdir, step=4)
  assert_one_line_user_error(excinfo, "cannot restore checkpoint step 4", str(workdir / "checkpoints"))

  garble(workdir / "checkpoints" / "2", seed=1)
  with pytest.raises(UserError) as excinfo:
    load_model(workdir)
  assert_one_line_user_error(excinfo, f"no readable checkpoint in {workdir / 'checkpoints'}", "tried 4, 2")


def test_train_with_no_readable_checkpoint_fails_in_one_line_and_writes_nothing(
    run_with_two_checkpoints, tmp_path, shakespeare_data_dir):
  source, _ = run_with_two_checkpoints
  workdir = copy_run(source, tmp_path)
  for step in (2, 4):
    garble(workdir / "checkpoints" / str(step), seed=step)
  before = sorted(str(p) for p in workdir.rglob("*"))
  with pytest.raises(UserError) as excinfo:
    train(run_config(workdir, shakespeare_data_dir), progress=False)
  assert_one_line_user_error(excinfo, f"no readable checkpoint in {workdir / 'checkpoints'}", "tried 4, 2")

  explicit = run_config(workdir, shakespeare_data_dir)
  explicit.train.resume_step = 4
  with pytest.raises(UserError) as excinfo:
    train(explicit, progress=False)
  assert_one_line_user_error(excinfo, "cannot restore checkpoint step 4")
  assert sorted(str(p) for p in workdir.rglob("*")) == before
