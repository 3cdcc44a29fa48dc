"""train.profile_steps and sample --profile write jax.profiler traces (issue 17, point 6); bad values are one line."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from superlm_jax.errors import UserError
from superlm_jax.training.loop import train
from superlm_jax.training.profiling import parse_profile_steps
from tests.conftest import tiny_train_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value, expected", [("", None), ("3", (3, 3)), ("2,5", (2, 5)), (" 2 , 5 ", (2, 5))])
def test_parse_profile_steps(value, expected):
  assert parse_profile_steps(value) == expected


@pytest.mark.parametrize("value", ["0,3", "5,2", "a,b", "1,2,3", "-1"])
def test_bad_profile_steps_are_one_line(value):
  with pytest.raises(UserError, match=r"train.profile_steps=.* is not FIRST,LAST"):
    parse_profile_steps(value)


def trace_events(directory: Path) -> list[dict]:
  traces = sorted(directory.rglob("*.trace.json.gz"))
  assert traces and sorted(directory.rglob("*.xplane.pb")), sorted(directory.rglob("*"))
  return json.loads(gzip.decompress(traces[-1].read_bytes()))["traceEvents"]


def test_profile_steps_trace_the_training_steps_and_sample_traces_the_generation(tmp_path, shakespeare_data_dir,
                                                                                 capsys):
  workdir = tmp_path / "run"
  train(tiny_train_config(workdir, shakespeare_data_dir, steps=6, profile_steps="3,4"), progress=False)
  assert "profile of steps 3-4 written to " + str(workdir / "profile") in capsys.readouterr().out
  names = {e.get("name", "") for e in trace_events(workdir / "profile")}
  assert any("train_step" in n or "jit" in n for n in names), sorted(names)[:20]

  out = tmp_path / "sample_profile"
  result = subprocess.run([sys.executable, "-m", "superlm_jax.sample", f"--checkpoint={workdir}", "--prompt=ROMEO.",
                           "--max_new_tokens=4", f"--profile={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  assert f"written to {out}" in result.stderr
  assert trace_events(out)
