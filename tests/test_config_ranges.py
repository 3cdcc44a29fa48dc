"""Every config value with a meaningful range is checked before anything is written (issue 16, point 7), with one
line naming the key, the value and the allowed range (superlm_jax.config.RANGES)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from superlm_jax import config as config_lib
from superlm_jax.errors import UserError

REPO = Path(__file__).resolve().parent.parent

BAD = [
    ("train.ckpt_every", 0, "an integer >= 1"),
    ("train.log_every", 0, "an integer >= 1"),
    ("train.eval_batches", 0, "an integer >= 1"),
    ("train.batch_size", 0, "an integer >= 1"),
    ("train.batch_size", -3, "an integer >= 1"),
    ("train.grad_accum_steps", 0, "an integer >= 1"),
    ("train.steps", -5, "an integer >= 1"),
    ("train.learning_rate", math.nan, "a number >= 0"),
    ("train.learning_rate", math.inf, "a number >= 0"),
    ("train.learning_rate", -1e-3, "a number >= 0"),
    ("train.min_lr_ratio", 1.5, "a number in [0, 1]"),
    ("train.b2", 1.0, "a number in [0, 1)"),
    ("train.eps", 0.0, "a number > 0"),
    ("train.label_smoothing", 1.0, "a number in [0, 1)"),
    ("train.keep_checkpoints", 0, "an integer >= 1"),
    ("train.warmup_steps", -1, "an integer >= 0"),
    ("train.eval_every", -1, "an integer >= 0"),
    ("data.val_fraction", 0.0, "a number in (0, 1)"),
    ("data.stride", 0, "an integer >= 1"),
    ("data.worker_count", -1, "an integer >= 0"),
    ("model.d_model", 0, "an integer >= 1"),
    ("model.norm_eps", -1e-5, "a number > 0"),
    ("sample.top_p", 0.0, "a number in (0, 1]"),
]


@pytest.mark.parametrize("dotted,value,allowed", BAD, ids=[f"{d}={v}" for d, v, _ in BAD])
def test_out_of_range_values_are_one_line_errors(dotted, value, allowed):
  config = config_lib.base_config()
  section, _, key = dotted.partition(".")
  config[section][key] = value
  with pytest.raises(UserError) as excinfo:
    config_lib.validate(config, backend=False)
  message = str(excinfo.value)
  assert message == f"{dotted}={value!r} is out of range: must be {allowed}"


def test_every_preset_and_every_default_is_in_range():
  """Study configs hold one full config per arm (every section but `study`)."""
  from tests.conftest import load_config_module
  config_lib.check_ranges(config_lib.base_config())
  for family in sorted(p.stem for p in (REPO / "configs").glob("*.py")):
    module = load_config_module(family)
    for preset in module.PRESETS:
      config = module.get_config(preset)
      arms = [config[name] for name in config if name != "study"] if "study" in config else [config]
      for arm in arms:
        assert "train" in arm, (family, preset)
        config_lib.check_ranges(arm)


def test_every_range_names_a_key_of_the_schema():
  base = config_lib.base_config()
  for dotted in config_lib.RANGES:
    section, _, key = dotted.partition(".")
    assert key in base[section], dotted


def test_train_refuses_before_writing_anything(tmp_path):
  workdir, data = tmp_path / "run", tmp_path / "data"
  proc = subprocess.run(
      [sys.executable, "-m", "superlm_jax.train", "--config=configs/gpt2_small.py:tiny", "--config.train.ckpt_every=0",
       f"--config.train.workdir={workdir}", f"--config.data.dir={data}"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
  assert proc.returncode == 1, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.strip()]
  assert errors == ["error: train.ckpt_every=0 is out of range: must be an integer >= 1"], proc.stderr
  assert "Done" not in proc.stdout and not workdir.exists() and not data.exists()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 2.5, True, "3", None])
def test_a_range_of_integers_holds_no_other_value(value):
  assert value not in config_lib.Range(low=1, integer=True)
  assert 3 in config_lib.Range(low=1, integer=True) and 3.0 in config_lib.Range(low=1, integer=True)
