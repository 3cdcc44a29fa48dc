"""The SSMax x NoPE study: a controlled comparison of attention scoring x positions, evaluated past the training
length. The end-to-end test trains three of the tiny preset's six variants on the real corpus (learned positions
and a softmax/SSMax pair with NoPE; a RoPE model is evaluated exactly as a NoPE one, and the scorer test covers its
rebuild); the others check the probe, the scorer and the config's guarantees without training. No timing
assertions: timings depend on the machine."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from superlm_jax.checkpoint import Checkpointer
from superlm_jax.errors import UserError
from superlm_jax.experiments.common import with_max_seq_len
from superlm_jax.experiments.ssmax_nope import (build_probe, check_study_config, make_scorer, paired, probe_pool,
                                                restarted_losses, run_study, score_probe, segments,
                                                summarise_probe)
from superlm_jax.experiments.ssmax_nope_report import FIGURES, write_report
from superlm_jax.models.transformer import build_model
from tests.conftest import load_config_file, tiny_model_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
E2E_VARIANTS = ("softmax_learned", "softmax_nope", "ssmax_nope")


def load_config(preset):
  return load_config_file("ssmax_nope", preset)


def test_tiny_study_end_to_end(tmp_path, shakespeare_data_dir):
  config = load_config("tiny")
  out_dir = tmp_path / "study"
  config.study.out_dir = str(out_dir)
  config.study.variants = ",".join(E2E_VARIANTS)  # Three of the six runs keep CI time down.
  config.softmax_learned.data.dir = shakespeare_data_dir  # A shared key: every section follows.
  assert config.ssmax_rope.data.dir == config.ssmax_nope.data.dir == shakespeare_data_dir
  assert config.ssmax_nope.model.vocab_size == 512  # The session's prepared tokenizer is reused.

  report = run_study(config, progress=False)

  for name in ("report.md", "report.json", "loss_curves.png", "position_loss.png", "probe.png"):
    assert (out_dir / name).is_file(), name
  for name in ("loss_curves.png", "position_loss.png", "probe.png"):
    assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((out_dir / "report.json").read_text())
  assert saved["runs"]["ssmax_nope"]["probe"] == report["runs"]["ssmax_nope"]["probe"]
  assert list(saved["runs"]) == list(E2E_VARIANTS)

  # The same data in the same order: the fingerprints of the configs' iterators, and the iterator position each
  # run saved with its last checkpoint.
  assert saved["data_order_identical"]
  assert len({r["data_order_fingerprint"] for r in saved["runs"].values()}) == 1
  iterator_states = []
  for name in E2E_VARIANTS:
    checkpointer = Checkpointer(out_dir / name / "checkpoints", keep=1, create=False)
    iterator_states.append(json.dumps(checkpointer.restore_meta()["data_iterator"], sort_keys=True))
    checkpointer.close()
  assert len(set(iterator_states)) == 1

  steps, T = config.softmax_learned.train.steps, config.softmax_learned.data.max_length
  E = config.study.eval_factor * T
  assert saved["train_length"] == T and saved["eval_length"] == E == 4 * T
  for name, run in saved["runs"].items():
    assert run["steps_trained"] == run["last_logged_step"] == steps
    per_position = run["position_loss"]["per_position"]
    segs = run["position_loss"]["segments"]
    assert [(s["start"], s["end"]) for s in segs] == [(0, T), (T, 2 * T), (2 * T, 4 * T)]
    if run["positions"] == "learned":
      # A learned table has T rows: nothing past T is scored, and the probe runs at 1x only.
      assert len(per_position) == T and run["eval_length"] == T
      assert segs[0]["mean"] is not None and segs[1]["mean"] is None and segs[2]["mean"] is None
      assert run["probe"]["1"] is not None and run["probe"]["2"] is None and run["probe"]["4"] is None
    else:
      assert len(per_position) == E and run["eval_length"] == E
      assert all(s["mean"] is not None for s in segs)
      assert all(run["probe"][str(f)] is not None for f in (1, 2, 4))
    assert all(v is not None and 0 < v < 20 for v in per_position)
    assert np.mean(per_position[:T]) == pytest.approx(segs[0]["mean"], rel=1e-5)
    assert (run["ssmax_scale"] is not None) == (run["scoring"] == "ssmax")
    if run["ssmax_scale"] is not None:
      assert np.array(run["ssmax_scale"]).shape == (config.ssmax_nope.model.num_layers,
                                                     config.ssmax_nope.model.num_heads)
  # Paired SSMax - softmax only where both were run (NoPE here), and the headline says n/a past T for learned.
  assert list(saved["ssmax_minus_softmax"]) == ["none"]
  assert len(saved["ssmax_minus_softmax"]["none"]["segments"]) == 3
  assert list(saved["positions_differences"]["softmax"]) == ["nope-learned"]
  assert saved["positions_differences"]["softmax"]["nope-learned"]["n"] == saved["position_windows"]
  # The restarted-context baseline scores every variant past T, including learned positions (T tokens at a time).
  for name, run in saved["runs"].items():
    restarted = run["restarted_loss"]["segments"]
    assert all(seg["mean"] is not None for seg in restarted)
    assert restarted[0]["mean"] == pytest.approx(run["position_loss"]["segments"][0]["mean"], rel=1e-5)
    beyond = run["beyond_training_length"]
    assert (beyond["whole_window"] is None) == (run["positions"] == "learned")
  learned_row = next(r for r in saved["headline"] if r[0] == "softmax + learned")
  assert learned_row[4:6] == ["n/a", "n/a"]
  markdown = (out_dir / "report.md").read_text()
  assert "cannot represent a later position" in markdown
  assert "| variant | parameters | val loss (T) |" in markdown
  # report.json alone redraws the report, without retraining or re-evaluating.
  write_report(saved, tmp_path / "redrawn")
  assert (tmp_path / "redrawn" / "report.md").read_text() == markdown
  assert all((tmp_path / "redrawn" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in FIGURES)


def test_the_published_report_is_drawn_from_its_report_json(tmp_path):
  """docs/experiments/ssmax_nope: report.md is what the report module draws from report.json alone (the default
  preset's numbers, not retrained here)."""
  docs = os.path.join(REPO, "docs", "experiments", "ssmax_nope")
  with open(os.path.join(docs, "report.json")) as f:
    write_report(json.load(f), tmp_path)
  with open(os.path.join(docs, "report.md")) as f:
    assert (tmp_path / "report.md").read_text() == f.read()


# ---------------------------------------------------------------------------------------------- the probe
def oracle_induction(inputs, targets):
  """A perfect induction head as a scorer: predicts the token that followed the previous occurrence of the current
  token (uniform over the vocabulary when there is none). Returns (nll, top-1 correct) like `make_scorer`'s."""
  vocab = 64
  nll = np.full(inputs.shape, np.log(vocab), np.float32)
  correct = np.zeros(inputs.shape, bool)
  for b in range(inputs.shape[0]):
    last = {}
    for i, token in enumerate(inputs[b]):
      if token in last:
        predicted = inputs[b, last[token] + 1]
        correct[b, i] = predicted == targets[b, i]
        nll[b, i] = 0.0 if correct[b, i] else 30.0
      last[int(token)] = i
  return nll, correct


def context_free(inputs, targets):
  """A scorer that ignores the context (a unigram model): it cannot tell a planted key from the control."""
  return (targets % 7).astype(np.float32) + 1.0, targets % 2 == 0


def synthetic_probe(length=48, trials=6, key_len=5, offset=3):
  rng = np.random.default_rng(0)
  text = rng.integers(4, 40, size=2000)  # "Filler" uses tokens 4..39; the pool reaches up to 63.
  counts_source = np.concatenate([text, np.arange(4, 64).repeat(3)])
  pool = probe_pool(counts_source, 64, 60)
  return build_probe(text, pool, length, key_len, offset, trials, seed=1), key_len, offset, length


def test_probe_layout_plants_the_key_early_and_repeats_it_at_the_end():
  probe, key_len, offset, length = synthetic_probe()
  planted, control, keys = probe["planted"], probe["control"], probe["keys"]
  assert planted.shape == control.shape == (6, length + 1)
  np.testing.assert_array_equal(planted[:, offset:offset + key_len], keys)
  np.testing.assert_array_equal(planted[:, -key_len:], keys)
  np.testing.assert_array_equal(control[:, -key_len:], keys)
  # Planted and control differ only in the key at the offset, and the control's key shares no token with it.
  np.testing.assert_array_equal(np.delete(planted, np.s_[offset:offset + key_len], axis=1),
                                np.delete(control, np.s_[offset:offset + key_len], axis=1))
  for t in range(len(keys)):
    assert not set(keys[t]) & set(control[t, offset:offset + key_len])
    assert len(set(keys[t])) == key_len
    filler = np.concatenate([planted[t, :offset], planted[t, offset + key_len:-key_len]])
    assert not set(keys[t]) & set(filler)  # The planted key is the only earlier occurrence of each query token.
    assert not {0, 1, 2, 3} & set(keys[t])  # No control symbols.
  # Scored: the inputs whose targets are key tokens 2..k.
  np.testing.assert_array_equal(planted[:, 1:][:, probe["scored"]], keys[:, 1:])


def test_a_perfect_induction_head_retrieves_the_planted_key_and_not_the_control():
  probe, *_ = synthetic_probe()
  result = score_probe(oracle_induction, probe)
  np.testing.assert_array_equal(result["acc_planted"], 1.0)
  np.testing.assert_array_equal(result["acc_control"], 0.0)
  assert np.all(result["gain"] > 0)
  np.testing.assert_allclose(result["gain"], np.log(64))  # 0 nats planted vs log V uniform in the control.


def test_a_context_free_model_gains_nothing_from_the_key():
  probe, *_ = synthetic_probe()
  result = score_probe(context_free, probe)
  np.testing.assert_array_equal(result["gain"], 0.0)
  np.testing.assert_array_equal(result["acc_planted"], result["acc_control"])


def test_summaries_are_the_mean_and_its_standard_error_over_trials():
  """{"mean", "se", "n"}: the sample mean and std(ddof=1) / sqrt(n), paired differences likewise."""
  rng = np.random.default_rng(0)
  gain, acc = rng.normal(0.1, 0.5, size=37), (rng.random(37) < 0.3).astype(np.float64)
  summary = summarise_probe({"gain": gain, "acc_planted": acc})
  for key, x in (("gain", gain), ("acc_planted", acc)):
    assert summary[key]["n"] == 37
    assert summary[key]["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert summary[key]["se"] == pytest.approx(x.std(ddof=1) / np.sqrt(x.size), rel=1e-9)
  np.testing.assert_array_equal(summary["per_trial_gain"], gain)  # Kept for the paired comparisons.
  difference = paired(gain, acc)
  assert difference["mean"] == pytest.approx((gain - acc).mean(), rel=1e-12)
  assert difference["se"] == pytest.approx((gain - acc).std(ddof=1) / np.sqrt(37), rel=1e-9)
  assert np.isnan(paired(gain[:1], acc[:1])["se"]) and paired(None, acc) is None


# ---------------------------------------------------------------------------------------------- the scorer
def _state(model):
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return {"params": params, "model_state": rest}


@pytest.mark.parametrize("positions", ["none", "rope"])
def test_a_longer_rebuilt_scorer_matches_the_trained_model_within_its_length(positions):
  """Right-padding to the scorer's length and rebuilding for 4x the tokens change nothing inside the trained
  length: the model is causal and SSMax counts n_i from the causal mask."""
  cfg = tiny_model_config(positions=positions, scoring="ssmax", max_seq_len=16)
  model = build_model(cfg, seed=3)
  model.blocks[0].attn.ssmax_scale[...] = jnp.linspace(0.5, 2.0, cfg.num_heads)  # Not the init 1.
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(3, 17)).astype(np.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  log_probs = jax.nn.log_softmax(model(jnp.asarray(inputs)), axis=-1)
  expected = -np.take_along_axis(np.asarray(log_probs), targets[..., None], axis=-1)[..., 0]
  scorer = make_scorer(cfg, _state(model), length=64, batch=2)
  nll, correct = scorer(inputs, targets)
  np.testing.assert_allclose(nll, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(correct, np.asarray(log_probs).argmax(-1) == targets)


def test_learned_positions_are_never_evaluated_past_their_table():
  cfg = tiny_model_config(positions="learned", max_seq_len=16)
  with pytest.raises(UserError, match="learned positions"):
    with_max_seq_len(cfg, 64)
  with pytest.raises(UserError, match="learned positions"):
    make_scorer(cfg, _state(build_model(cfg)), length=64, batch=2)


def test_restarted_context_scores_each_block_of_t_tokens_as_its_own_sequence():
  def position_in_sequence(inputs, targets):  # A scorer whose NLL is the position within the scored sequence.
    return np.broadcast_to(np.arange(inputs.shape[1], dtype=np.float32), inputs.shape).copy(), inputs == targets
  tokens = np.arange(2 * 13).reshape(2, 13)
  windows = {"inputs": tokens[:, :12], "targets": tokens[:, 1:]}
  nll = restarted_losses(position_in_sequence, windows, train_length=4, length=12)
  np.testing.assert_array_equal(nll, np.tile(np.arange(4), (2, 3)))


def test_segments_double_up_to_the_eval_factor():
  assert segments(32, 4) == [(0, 32), (32, 64), (64, 128)]
  assert segments(10, 1) == [(0, 10)]
  assert segments(10, 3) == [(0, 10), (10, 20), (20, 30)]
  assert segments(10, 8) == [(0, 10), (10, 20), (20, 40), (40, 80)]


# ---------------------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("preset", ["tiny", "default"])
def test_presets_are_valid_controlled_comparisons(preset):
  config = load_config(preset)
  assert check_study_config(config) == ["softmax_learned", "ssmax_learned", "softmax_nope", "ssmax_nope",
                                        "softmax_rope", "ssmax_rope"]
  for name in ("softmax_learned", "ssmax_nope", "softmax_rope"):
    assert config[name].model.max_seq_len == config[name].data.max_length
  assert tuple(config.study.probe_factors) == (1, 2, 4) and config.study.eval_factor == 4


def test_shared_keys_are_one_setting():
  config = load_config("tiny")
  config.ssmax_rope.train.steps = 7
  config.softmax_nope.data.max_length = 40
  assert {config[n].train.steps for n in ("softmax_learned", "ssmax_nope", "softmax_rope")} == {7}
  assert {config[n].model.max_seq_len for n in ("softmax_learned", "ssmax_learned", "ssmax_rope")} == {40}
  assert (config.ssmax_nope.model.scoring, config.ssmax_nope.model.positions) == ("ssmax", "none")
  config.study.out_dir = "elsewhere"
  assert config.ssmax_rope.train.workdir == "elsewhere/ssmax_rope"


def test_softmax_and_ssmax_start_from_the_same_weights():
  """s_h starts at 1 and draws no randomness, and neither NoPE nor RoPE has position parameters: these runs share
  their initial weights exactly (learned positions draw their table first, so their other weights differ)."""
  config = load_config("tiny")
  params = {name: nnx.state(build_model(config[name].model, seed=config[name].train.seed), nnx.Param)
            for name in ("softmax_nope", "ssmax_rope")}
  flat = {name: {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(s)[0]}
          for name, s in params.items()}
  shared = set(flat["softmax_nope"]) & set(flat["ssmax_rope"])
  assert set(flat["ssmax_rope"]) - shared == {k for k in flat["ssmax_rope"] if "ssmax_scale" in k}
  for key in shared:
    np.testing.assert_array_equal(flat["softmax_nope"][key], flat["ssmax_rope"][key])


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.study, "variants", "softmax_nope,alibi"), "unknown variant 'alibi'"),
    (lambda c: setattr(c.study, "variants", ""), "study.variants is empty"),
    (lambda c: setattr(c.study, "probe_factors", (1, 8)), "probe_factors"),
    (lambda c: setattr(c.study, "probe_key_len", 1), "probe_key_len"),
    (lambda c: setattr(c.study, "probe_key_len", 20), "does not fit"),
    (lambda c: setattr(c.study, "position_windows", 0), "position_windows"),
])
def test_bad_study_settings_are_user_errors(change, message):
  config = load_config("tiny")
  change(config)
  with pytest.raises(UserError, match=message):
    check_study_config(config)


def test_a_comparison_that_differs_in_more_than_scoring_and_positions_is_refused():
  config = load_config("tiny")
  config.ssmax_nope = config.ssmax_nope.copy_and_resolve_references()  # Cut the shared references.
  config.ssmax_nope.train.seed = 1
  with pytest.raises(UserError, match="train.seed"):
    check_study_config(config)
  config = load_config("tiny")
  config.softmax_rope = config.softmax_rope.copy_and_resolve_references()
  config.softmax_rope.model.positions = "none"
  with pytest.raises(UserError, match="softmax_rope needs model.scoring='softmax' and model.positions='rope'"):
    check_study_config(config)
