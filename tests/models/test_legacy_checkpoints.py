"""Checkpoints written before a refactor still restore: run directories frozen in tests/fixtures/legacy_runs (made by
tests/fixtures/make_legacy_runs.py at commit cf15e82) load for inference in both layouts, give the logits they
gave then, and restore as a full train state for resuming."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from superlm_jax import checkpoint as ckpt_lib
from superlm_jax.generate.restore import load_model
from superlm_jax.training.step import abstract_train_state

LEGACY = Path(__file__).parent.parent / "fixtures" / "legacy_runs"
RUNS = sorted(p.name for p in LEGACY.iterdir() if p.is_dir())


@pytest.fixture(params=RUNS)
def legacy_run(request, tmp_path):
  run = tmp_path / request.param
  shutil.copytree(LEGACY / request.param, run)  # Orbax may touch the directory: never the repository's copy.
  return run


def test_fixtures_present():
  assert set(RUNS) == {"mla_moe_loop", "gpt2_gqa_scan"}


@pytest.mark.parametrize("layout", [None, "loop", "scan"])
def test_legacy_weights_give_the_same_logits(legacy_run, layout):
  expected = np.load(legacy_run / "expected.npz")
  model, _, step = load_model(legacy_run, layout=layout)
  assert step == 2
  logits = model(jnp.asarray(expected["tokens"]))
  np.testing.assert_allclose(np.asarray(logits), expected["logits"], rtol=1e-5, atol=1e-5)


def test_legacy_train_state_restores_for_resuming(legacy_run):
  config = ckpt_lib.load_run_config(legacy_run)
  checkpointer = ckpt_lib.Checkpointer(legacy_run / "checkpoints", keep=1, create=False)
  state, meta = checkpointer.restore(2, abstract_state=abstract_train_state(config))
  assert meta["step"] == 2 and int(state["step"]) == 2
  expected = json.loads((legacy_run / "expected.json").read_text())
  total = float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(state["opt_state"])
                    if jnp.issubdtype(x.dtype, jnp.floating)))
  assert total == pytest.approx(expected["opt_state_abs_sum"], rel=1e-6)
  assert total > 0
