"""The MHA vs MLA study (reference project 004): a controlled comparison whose report states the numbers the accounting and the
built models give. The end-to-end test trains the tiny preset on the real corpus (about 40 s on 2 cores); the
others check the config's guarantees without training. No timing assertions: timings depend on the machine."""

import json
import os

import jax
import pytest

from flax import nnx

from superlm_jax.errors import UserError
from superlm_jax.experiments.mla_vs_mha import check_study_config, run_study
from superlm_jax.experiments.mla_vs_mha_report import write_report
from superlm_jax.models import accounting
from superlm_jax.models.transformer import build_model
from tests.conftest import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(preset):
  return load_config_file("mla_vs_mha", preset)


def counted_from_built_model(model_cfg):
  """Total and attention-only parameter counts read off the built model's leaves, independently of the study."""
  params = nnx.state(build_model(model_cfg), nnx.Param)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  total = sum(leaf.size for _, leaf in leaves)
  attention = sum(leaf.size for path, leaf in leaves if "attn" in jax.tree_util.keystr(path).split("'"))
  return total, attention


def test_tiny_study_end_to_end(tmp_path, shakespeare_data_dir):
  config = load_config("tiny")
  out_dir = tmp_path / "study"
  config.study.out_dir = str(out_dir)
  config.mha.data.dir = shakespeare_data_dir  # A shared key: the MLA section follows.
  config.study.update(decode_repeats=1, timing_windows=1, timing_steps=2)  # Measurements kept short for CI.
  assert config.mla.data.dir == shakespeare_data_dir
  assert config.mha.model.vocab_size == 512  # The session's prepared tokenizer is reused.
  assert config.mla.train.workdir == str(out_dir / "mla")

  report = run_study(config, progress=False)

  for name in ("report.md", "report.json", "loss_curves.png", "memory.png"):
    assert (out_dir / name).is_file(), name
  for name in ("loss_curves.png", "memory.png"):
    assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((out_dir / "report.json").read_text())
  assert saved["models"]["mla"]["kv_cache"] == report["models"]["mla"]["kv_cache"]
  markdown = (out_dir / "report.md").read_text()
  assert "| metric | MHA | MLA | MLA/MHA |" in markdown
  assert "KV cache bytes / token (bf16, all layers)" in markdown

  # The cache ratio is the accounting formula's: 2 * heads * head_dim vs kv_lora_rank + qk_rope_head_dim.
  mha_cfg, mla_cfg = config.mha.model, config.mla.model
  expected = accounting.kv_cache_bytes_per_token(mha_cfg) / accounting.kv_cache_bytes_per_token(mla_cfg)
  assert saved["ratios"]["kv_cache_mha_over_mla"] == pytest.approx(expected)
  assert expected == pytest.approx(2 * mha_cfg.num_heads * (mha_cfg.d_model // mha_cfg.num_heads) /
                                   (mla_cfg.kv_lora_rank + mla_cfg.qk_rope_head_dim))
  assert expected >= 4
  for name, cfg in (("mha", mha_cfg), ("mla", mla_cfg)):
    kv = saved["models"][name]["kv_cache"]
    assert kv["bytes_per_token"] == accounting.kv_cache_bytes_per_token(cfg)
    tokens = config.study.long_context * config.study.long_context_batch
    assert kv["long_context_bytes"] == kv["bytes_per_token"] * tokens

  # Parameter counts are those of the built models.
  for name in ("mha", "mla"):
    total, attention = counted_from_built_model(config[name].model)
    assert total == accounting.parameter_count(config[name].model)["total"]
    assert saved["models"][name]["parameters"]["total"] == total
    assert saved["models"][name]["parameters"]["attention"] == attention

  # Both runs trained the same number of steps, and logged up to it.
  steps = config.mha.train.steps
  for name in ("mha", "mla"):
    assert saved["models"][name]["steps_trained"] == steps
    assert saved["models"][name]["last_logged_step"] == steps
    records = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if r["split"] == "train") == steps
  for name in ("mha", "mla"):
    memory = saved["models"][name]["train_memory_long_context"]
    assert memory["total"] == memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] > 0
    assert saved["models"][name]["train_time_s"] > 0
  assert "training time (summed over the invocations that trained it)" in markdown

  # The paired difference is over the training loop's validation batches (all full here), so its mean is the
  # difference of the two runs' final validation losses: the study's evaluator scores as the loop's does.
  loss = saved["loss_difference"]
  assert loss["n"] == config.mha.train.eval_batches and loss["se"] > 0
  final = {name: saved["models"][name]["final_val_loss"] for name in ("mha", "mla")}
  assert loss["mean"] == pytest.approx(final["mla"] - final["mha"], abs=1e-5)

  # The report is drawn from report.json alone.
  redrawn = tmp_path / "redrawn"
  write_report(saved, redrawn)
  assert (redrawn / "report.md").read_text() == markdown
  for name in ("loss_curves.png", "memory.png"):
    assert (redrawn / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_keys_are_one_setting():
  """An override of a shared key in either section changes both runs; the attention settings stay separate."""
  config = load_config("tiny")
  config.mla.train.steps = 7
  config.mha.data.seed = 3
  config.mha.model.d_model = 96
  assert (config.mha.train.steps, config.mla.data.seed, config.mla.model.d_model) == (7, 3, 96)
  assert (config.mha.model.attention, config.mla.model.attention) == ("mha", "mla")
  config.study.out_dir = "elsewhere"
  assert (config.mha.train.workdir, config.mla.train.workdir) == ("elsewhere/mha", "elsewhere/mla")


def test_a_comparison_that_differs_in_more_than_attention_is_refused():
  config = load_config("tiny")
  config.mla = config.mla.copy_and_resolve_references()  # Cut the shared references.
  config.mla.train.seed = 1
  with pytest.raises(UserError, match="train.seed"):
    check_study_config(config)


@pytest.mark.parametrize("preset", ["tiny", "default"])
def test_presets_are_valid_and_compress_the_cache_at_least_4x(preset):
  config = load_config(preset)
  check_study_config(config)
  mha, mla = config.mha.model, config.mla.model
  ratio = accounting.kv_cache_bytes_per_token(mha) / accounting.kv_cache_bytes_per_token(mla)
  assert ratio >= 4
  assert mla.kv_lora_rank < mla.d_model  # A latent that compresses (the reference project's expanded).
