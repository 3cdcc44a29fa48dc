"""train.nonfinite: a NaN step is never applied and never checkpointed; stop names it, skip counts it; and
train.resume_step goes back to an earlier checkpoint (training/nonfinite.py, training/rewind.py)."""

import json

import jax
import numpy as np
import pytest

from superlm_jax import checkpoint as ckpt_lib
from superlm_jax.errors import UserError
from superlm_jax.training.loop import train
from tests.conftest import tiny_train_config

VOCAB = 512  # tiny_train_config's model.vocab_size


def poison(*steps):
  """A batch hook putting an out-of-vocabulary token into the inputs of `steps`: its embedding lookup (jnp.take,
  mode "fill") is NaN, so that step's loss and gradients are NaN, as from a corrupt data shard."""
  def hook(step, batch):
    if step in steps:
      batch = dict(batch, inputs=np.array(batch["inputs"]))
      batch["inputs"][0, 0] = VOCAB
    return batch
  return hook


def checkpoints(workdir):
  return ckpt_lib.Checkpointer(workdir / "checkpoints", keep=100, create=False)


def restored(workdir, step):
  state, meta = checkpoints(workdir).restore(step)
  return jax.tree.map(np.asarray, state), meta


def all_finite(tree):
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating))


def same_bits(a, b):
  return all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def train_records(workdir):
  return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_stop_names_the_first_bad_step_and_saves_nothing_after_it(tmp_path, shakespeare_data_dir):
  """The host never looks before step 4's save (log_every=100): the step-3 update was already dropped inside the
  jitted step, and the check before the save stops the run with one line naming step 3."""
  config = tiny_train_config(tmp_path / "run", shakespeare_data_dir, ckpt_every=2, log_every=100, eval_every=0,
                             nonfinite="stop")
  with pytest.raises(UserError) as excinfo:
    train(config, progress=False, batch_hook=poison(3))
  message = str(excinfo.value)
  assert "\n" not in message and "at step 3 " in message and "latest checkpoint is step 2" in message, message
  assert checkpoints(tmp_path / "run").all_steps() == [2]  # Kept; nothing written at or after the bad step.
  state, _ = restored(tmp_path / "run", 2)
  assert all_finite(state["params"]) and all_finite(state["opt_state"])


def test_skip_drops_the_update_counts_it_and_gives_up_after_max_skipped_in_a_row(tmp_path, shakespeare_data_dir):
  # One bad step: skipped, counted, and training goes on with finite weights.
  config = tiny_train_config(tmp_path / "skip", shakespeare_data_dir, steps=5, ckpt_every=1, log_every=1,
                             eval_every=0, keep_checkpoints=10, nonfinite="skip", max_skipped=2)
  result = train(config, progress=False, batch_hook=poison(3))
  assert "guard" not in result.state and all_finite(result.state["params"])
  (before, _), (after, meta_3), (next_state, _) = (restored(tmp_path / "skip", s) for s in (2, 3, 4))
  for key in ("params", "opt_state"):  # Step 3 changed nothing; step 4 trained again.
    assert same_bits(after[key], before[key]), key
  assert not same_bits(next_state["params"], after["params"])
  assert int(after["step"]) == 3 and meta_3["nonfinite"] == {"in_a_row": 1, "total": 1, "first_bad": 3}
  records = train_records(tmp_path / "skip")
  assert records[2]["loss"] is None and records[3]["loss"] is not None  # null: JSON has no NaN
  assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]

  # Two bad steps in a row with max_skipped=2: the run stops at the second, naming both; step 3's save (one skip
  # so far, finite weights) stays, nothing is saved from step 4 on.
  config = tiny_train_config(tmp_path / "give_up", shakespeare_data_dir, steps=6, ckpt_every=1, log_every=1,
                             eval_every=0, keep_checkpoints=10, nonfinite="skip", max_skipped=2)
  with pytest.raises(UserError, match=r"2 non-finite steps in a row \(steps 3-4, 2 skipped in all"):
    train(config, progress=False, batch_hook=poison(3, 4))
  assert checkpoints(tmp_path / "give_up").all_steps() == [1, 2, 3]


def test_resume_step_goes_back_and_replays_exactly(tmp_path, shakespeare_data_dir):
  """Resuming from step 2 of a finished 6-step run moves checkpoints 4 and 6 aside, drops the metrics after step
  2, and retrains to the same bits (same data positions); a step that was never saved is a one-line error."""
  workdir = tmp_path / "run"
  config = lambda **kw: tiny_train_config(workdir, shakespeare_data_dir, steps=6, ckpt_every=2, log_every=1,
                                          eval_every=0, **kw)
  first = train(config(), progress=False)
  with pytest.raises(UserError, match=r"no checkpoint for step 3 .*\(available: 2, 4, 6\)"):
    train(config(resume_step=3), progress=False)
  again = train(config(resume_step=2), progress=False)
  assert same_bits(jax.device_get(again.state["params"]), jax.device_get(first.state["params"]))
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints.after-2").iterdir()) == ["4", "6"]
  assert checkpoints(workdir).all_steps() == [2, 4, 6]
  assert [r["step"] for r in train_records(workdir)] == [1, 2, 3, 4, 5, 6]  # Each step once.
