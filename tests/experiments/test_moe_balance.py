"""The MoE load-balancing study (reference project 002/003): three runs of one MoE model that differ only in the balancing
scheme. The end-to-end test trains the tiny preset on the real corpus (about 50 s on 2 cores) and checks that each
scheme did what it claims to the routing biases, read back from the checkpoints; the others check the config's
guarantees without training. No timing or quality assertions: 30 steps say nothing about which scheme wins."""

import json
import os

import numpy as np
import pytest

from superlm_jax.checkpoint import Checkpointer
from superlm_jax.errors import UserError
from superlm_jax.experiments.moe_balance import (SCHEMES, check_study_config, max_violation_per_layer,
                                                 routing_biases, run_study, sampling_floor)
from tests.conftest import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = ("report.md", "report.json", "maxvio.png", "loss_curves.png", "expert_load.png")


def load_config(preset):
  return load_config_file("moe_balance", preset)


def test_tiny_study_end_to_end(tmp_path, shakespeare_data_dir):
  config = load_config("tiny")
  out_dir = tmp_path / "study"
  config.study.out_dir = str(out_dir)
  config.no_balancing.data.dir = shakespeare_data_dir  # A shared key: the other two runs follow.
  assert config.aux_free.data.dir == config.aux_loss.data.dir == shakespeare_data_dir
  assert config.no_balancing.model.vocab_size == 512  # The session's prepared tokenizer is reused.
  assert config.aux_free.train.workdir == str(out_dir / "aux_free")

  report = run_study(config, progress=False)

  for name in FILES:
    assert (out_dir / name).is_file(), name
  for name in FILES[2:]:
    assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((out_dir / "report.json").read_text())
  assert saved["headline"] == report["headline"]
  markdown = (out_dir / "report.md").read_text()
  assert "| scheme | α / β / γ | final val loss |" in markdown
  for name in SCHEMES:
    assert len(saved["runs"][name]["curves"]["maxvio"]) == len(saved["runs"][name]["curves"]["step"]) > 0

  # The three runs trained, and logged, the same number of steps.
  steps = config.no_balancing.train.steps
  for name in SCHEMES:
    assert saved["runs"][name]["steps_trained"] == steps
    assert saved["runs"][name]["last_logged_step"] == steps
    records = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["split"] == "train"]
    assert max(r["step"] for r in train_rows) == steps
    assert all("moe_max_violation" in r and len(r["moe_load"]) == config[name].model.num_layers for r in train_rows)

  # Routing biases read back from each run's final checkpoint (no abstract state: plain nested arrays): only the
  # aux-loss-free run moved them, by at most gamma per step, and the report shows the same biases.
  layers, experts = config.no_balancing.model.num_layers, config.no_balancing.model.n_routed_experts
  for name in SCHEMES:
    state, meta = Checkpointer(out_dir / name / "checkpoints", keep=1, create=False).restore()
    assert meta["step"] == steps
    biases = routing_biases(state["model_state"])
    assert biases.shape == (layers, experts)
    np.testing.assert_allclose(biases, np.array(saved["runs"][name]["bias"]), atol=1e-7)
    if name == "aux_free":
      gamma = config.aux_free.train.moe_bias_update_rate
      assert np.abs(biases).max() > 0
      assert np.abs(biases).max() <= gamma * steps + 1e-6
      assert (biases.max(-1) > biases.min(-1)).all()  # every layer's experts were told apart
    else:
      assert np.all(biases == 0), name

  # MaxVio in the report is the formula applied to the logged loads.
  for name in SCHEMES:
    curves = saved["runs"][name]["curves"]
    np.testing.assert_allclose(curves["maxvio"],
                               [max_violation_per_layer(np.array(load)).mean() for load in curves["load"]], rtol=1e-5)


def test_shared_keys_are_one_setting():
  """An override of a shared key in any section changes all three runs; the balancing coefficients stay apart."""
  config = load_config("tiny")
  config.aux_free.train.steps = 7
  config.aux_loss.data.seed = 3
  config.no_balancing.model.d_model = 96
  for name in SCHEMES:
    assert (config[name].train.steps, config[name].data.seed, config[name].model.d_model) == (7, 3, 96)
  coefs = {name: (config[name].train.moe_aux_loss_coef, config[name].train.moe_z_loss_coef,
                  config[name].train.moe_bias_update_rate) for name in SCHEMES}
  assert coefs == {"no_balancing": (0.0, 0.0, 0.0), "aux_loss": (0.01, 0.001, 0.0), "aux_free": (0.0, 0.0, 0.001)}
  config.study.out_dir = "elsewhere"
  assert [config[name].train.workdir for name in SCHEMES] == [f"elsewhere/{name}" for name in SCHEMES]


def test_a_comparison_that_differs_in_more_than_balancing_is_refused():
  config = load_config("tiny")
  config.aux_free = config.aux_free.copy_and_resolve_references()  # Cut the shared references.
  config.aux_free.train.seed = 1
  with pytest.raises(UserError, match="train.seed"):
    check_study_config(config)


def test_a_run_that_does_not_use_its_scheme_is_refused():
  config = load_config("tiny")
  config.aux_free.train.moe_aux_loss_coef = 0.01
  with pytest.raises(UserError, match="aux_free needs"):
    check_study_config(config)
  config = load_config("tiny")
  config.no_balancing.train.moe_bias_update_rate = 0.001
  with pytest.raises(UserError, match="no_balancing needs"):
    check_study_config(config)


@pytest.mark.parametrize("preset", ["tiny", "default"])
def test_presets_are_valid_moe_comparisons(preset):
  config = load_config(preset)
  check_study_config(config)
  model = config.no_balancing.model
  assert (model.n_routed_experts, model.num_experts_per_tok, model.moe_dispatch) == (8, 2, "dropless")


def test_max_violation_and_sampling_floor():
  assert max_violation_per_layer(np.full(8, 0.125)) == 0.0
  # A top-2 router collapsed onto 2 of 8 experts.
  assert max_violation_per_layer(np.array([0.5, 0.5, 0, 0, 0, 0, 0, 0])) == pytest.approx(3.0)
  # A uniform random router's MaxVio shrinks like 1/sqrt(tokens) and is small but not zero.
  small, large = sampling_floor(1_000, 8, 2, draws=16), sampling_floor(16_000, 8, 2, draws=16)
  assert 0 < large < small < 0.3
  assert small / large == pytest.approx(4.0, rel=0.35)
