"""Super weights (Yu et al. 2024, arXiv 2411.07191): a super weight planted in a small GPT-2 trained on the real
corpus is found at its exact coordinate, its ablations behave as the paper's, the int8 hold-out recipe beats naive
rounding, and the command line writes its report and a restorable pruned run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from superlm_jax.analysis import super_weights as sw
from superlm_jax.analysis.probes import DownProjProbe, down_proj_activations, with_probes
from superlm_jax.analysis.sites import mlp_sites, module_at, routed_expert_layers
from superlm_jax.data import pipeline
from superlm_jax.data.prepare import resolve_data_dir
from superlm_jax.generate.restore import load_model
from superlm_jax.layers.mlp import MLP
from superlm_jax.models.transformer import build_model
from superlm_jax.training.loop import train
from tests.conftest import numpy_init, tiny_model_config, tiny_train_config

REPO = Path(__file__).resolve().parents[2]
# The planted super weight: block 0's down[row, COL] (an early layer, as in the paper) = VALUE, where hidden unit
# `row`, a selective unit of the trained model (it fires on few tokens of real text, as super activations do), is
# made to fire SCALE times harder.
COL, VALUE, SCALE = 11, 5.0, 20.0


def selective_unit(model, site, tokens) -> int:
  """The hidden unit of `site` with the largest max / mean |activation| among the more active half."""
  h = np.abs(np.asarray(down_proj_activations(model, [site.path], tokens)[site.path][0]))
  h = h.reshape(-1, h.shape[-1])
  peak = h.max(0)
  return int(np.where(peak > np.median(peak), peak / h.mean(0), 0.0).argmax())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare_data_dir):
  """A ~70k-parameter GPT-2 trained for 60 steps: (run dir, prepared data dir)."""
  root = tmp_path_factory.mktemp("super_weights")
  config = tiny_train_config(root / "run", shakespeare_data_dir, steps=60, eval_every=60, ckpt_every=60,
                             batch_size=8, warmup_steps=10, log_every=30, eval_batches=1)
  train(config, progress=False)
  return root / "run", resolve_data_dir(config.data, config.model.vocab_size)


@pytest.fixture(scope="module")
def planted(trained):
  """(clean detection, planted row, the planted model's site, its analysis): detection on training windows,
  ablations and quantization on validation batches, as the command line does."""
  run_dir, data_dir = trained
  model, config, _ = load_model(run_dir)
  tokens = jnp.asarray(sw.text_windows(data_dir, config.data.max_length, 8))
  clean = sw.detect_super_weights(model, tokens)
  site = mlp_sites(model)[0]
  row = selective_unit(model, site, tokens)
  sw.plant_super_weight(model, site, row, COL, VALUE, SCALE)
  batches = pipeline.eval_batches(data_dir, config.data.max_length, 8, 3)
  return clean, row, site, sw.analyze(model, tokens, batches)


def test_detects_exactly_the_planted_super_weight(planted):
  clean, row, site, analysis = planted
  assert clean.super_weights == []  # the trained model has none at the default settings: no false positive
  found = analysis.detection.super_weights
  assert [w.coordinate for w in found] == [(site.name, row, COL)], found
  w = found[0]
  assert w.value == pytest.approx(VALUE) and w.iteration == 0 and w.share > 0.9 and w.passed
  assert w.paper_row == row  # the paper's rule (largest input channel) agrees
  # After removing it the output spike is gone (the iteration's last pass).
  assert analysis.detection.passes[-1][site.name]["ratio"] < analysis.detection.threshold


def test_zeroing_it_moves_the_loss_more_than_the_100_largest_and_restoring_the_activation_recovers(planted):
  """The planted weight is what makes the model differ, so zeroing it must move the validation loss more than
  zeroing the 100 largest other down-projection weights; writing its super activation back through a
  down-projection probe's override (paper sec. 3.2) must undo most of that move."""
  conditions = planted[3].ablation["conditions"]
  original = conditions["original"]["nll"]
  delta = {name: abs(c["nll"] - original) for name, c in conditions.items()}
  assert delta["zero_super"] > 3 * delta["zero_largest_100"], conditions
  assert delta["zero_super"] > 3 * delta["zero_largest_same_count"], conditions
  assert delta["zero_super_restore_activation"] < 0.5 * delta["zero_super"], conditions
  # ... by writing back only the few outlier tokens, not the whole channel.
  assert 0 < conditions["zero_super_restore_activation"]["restored_token_fraction"] < 0.3


def test_int8_hold_out_beats_naive_rounding():
  """A planted outlier sets the naive absmax scale and crushes every other weight to a few levels; holding it out
  (excluded from the scale, restored after dequantization) keeps the rest accurate (paper sec. 4)."""
  rng = np.random.default_rng(0)
  w = rng.normal(0.0, 0.02, (64, 48)).astype(np.float32)
  w[5, 7] = 2.0
  mask = np.zeros(w.shape, bool)
  mask[5, 7] = True
  naive, naive_scale = sw.quantize_int8(jnp.asarray(w))
  held, held_scale = sw.quantize_int8(jnp.asarray(w), jnp.asarray(mask))
  err_naive = np.mean((np.asarray(naive) - w) ** 2)
  err_held = np.mean((np.asarray(held) - w) ** 2)
  assert err_held < err_naive / 100, (err_held, err_naive)
  assert float(held[5, 7]) == w[5, 7]  # restored in full precision
  assert float(naive_scale) == pytest.approx(2.0 / 127)
  assert float(held_scale) == pytest.approx(np.abs(w[~mask]).max() / 127)
  assert np.abs(np.asarray(held) - w)[~mask].max() <= float(held_scale) / 2 + 1e-7  # round to nearest


def test_int8_hold_out_on_the_planted_model(planted):
  q = planted[3].quantization
  original = q["original"]["nll"]
  assert q["int8_holdout_super"]["mse"] < q["int8_naive"]["mse"]
  assert abs(q["int8_holdout_super"]["nll"] - original) < abs(q["int8_naive"]["nll"] - original), q


def test_site_summary_matches_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 5, 16)).astype(np.float32)
  down = rng.normal(0.0, 0.1, (16, 8)).astype(np.float32)
  x[1, 2, 9], down[9, 4] = 12.0, 3.0
  y = x @ down
  s = {k: np.asarray(v) for k, v in sw.site_summary(jnp.asarray(x), jnp.asarray(y), jnp.asarray(down)).items()}
  flat_y = y.reshape(-1, 8)
  t, j = np.unravel_index(np.argmax(np.abs(flat_y)), flat_y.shape)
  products = x.reshape(-1, 16)[t] * down[:, j]
  assert (int(s["out_token"]), int(s["out_channel"]), int(s["row"])) == (t, j, np.argmax(np.abs(products))) == (7, 4, 9)
  np.testing.assert_allclose(s["out_max"], np.abs(y).max(), rtol=1e-6)
  np.testing.assert_allclose(s["out_median"], np.median(np.abs(y)), rtol=1e-6)
  np.testing.assert_allclose(s["contribution"] / s["contribution_sum"], products[9] / products.sum(), rtol=1e-5)
  assert int(s["paper_row"]) == 9


def test_probes_see_the_down_projection_of_a_copy_and_leave_the_model_as_built():
  """Probes go into a copy: the forward pass is unchanged, the sown output is the MLP's own, and the model the
  caller holds still has its MLPs (no hook in the layer, nothing left behind)."""
  model = numpy_init(lambda: build_model(tiny_model_config()), seed=0, std=0.05)
  tokens = jnp.asarray(np.random.default_rng(8).integers(0, 64, (2, 8)), jnp.int32)
  paths = [site.path for site in mlp_sites(model)]
  probed = with_probes(model, capture=paths)
  assert all(isinstance(module_at(probed, p), DownProjProbe) for p in paths)
  assert all(type(module_at(model, p)) is MLP for p in paths)
  logits, captured = nnx.capture(probed, nnx.Intermediate)(tokens)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(model(tokens)))
  assert set(module_at(captured, paths[0])) == {"down_proj_input", "down_proj_output"}
  x, y = down_proj_activations(model, paths[:1], tokens)[paths[0]]
  np.testing.assert_allclose(np.asarray(y), np.asarray(module_at(model, paths[0]).down_proj(x)), rtol=1e-6)


def test_output_override_writes_only_the_masked_channel_values():
  mlp = numpy_init(lambda: MLP(8, 16, activation="swiglu", use_bias=False, std=0.3, out_std=0.3,
                               rngs=nnx.Rngs(0)), seed=2, std=0.3)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 8)), jnp.float32)
  y = mlp(x)
  mask = jnp.asarray(np.random.default_rng(4).random((2, 5, 2)) < 0.5)
  values = jnp.asarray(np.random.default_rng(5).normal(size=(2, 5, 2)) + 10.0, jnp.float32)
  z = DownProjProbe(mlp, override=(jnp.asarray([1, 6]), mask, values))(x)
  expected = np.asarray(y).copy()
  for i, c in enumerate((1, 6)):
    expected[..., c] = np.where(np.asarray(mask[..., i]), np.asarray(values[..., i]), expected[..., c])
  np.testing.assert_array_equal(np.asarray(z), expected)


@pytest.mark.parametrize("arch", ["llama", "deepseek_moe"])
def test_detection_on_llama_and_deepseek_moe(arch):
  """Dense SwiGLU, and MLA + MoE where the dense first block and the shared experts are searched (routed experts
  are not); the planted weight sits in a shared expert."""
  llama = dict(norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False)
  moe = dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
             n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
             first_k_dense=1, num_layers=3)
  cfg = tiny_model_config(**llama, **(moe if arch == "deepseek_moe" else {}))
  model = numpy_init(lambda: build_model(cfg), seed=0, std=0.05)
  sites = mlp_sites(model)
  if arch == "deepseek_moe":
    assert [s.kind for s in sites] == ["mlp", "shared_experts", "shared_experts"]
    assert routed_expert_layers(model) == [1, 2]
  site = sites[-1]
  sw.plant_super_weight(model, site, 3, 7, VALUE, SCALE)
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (4, 16)), jnp.int32)
  found = sw.detect_super_weights(model, tokens).super_weights
  assert [w.coordinate for w in found] == [(site.name, 3, 7)]


def _run_cli(*args):
  # XLA_FLAGS (8 fake devices) is kept: the run was saved by this process on that topology, and Orbax restores
  # arrays onto the saved device layout.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "superlm_jax.super_weights", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_writes_report_and_a_restorable_pruned_run(trained, tmp_path):
  run_dir, _ = trained
  out, pruned = tmp_path / "report", tmp_path / "pruned"
  before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
  proc = _run_cli(f"--checkpoint={run_dir}", f"--out={out}", f"--prune={pruned}", "--eval_batches=2",
                  "--batch_size=4", "--control_count=10", "--max_iters=2")
  assert proc.returncode == 0, proc.stderr
  assert "Report:" in proc.stdout and "perplexity" in proc.stdout
  for name in ("report.md", "report.json", "activations.png"):
    assert (out / name).stat().st_size > 0, name
  report = json.loads((out / "report.json").read_text())
  assert {"original", "zero_super", "zero_largest_10", "zero_super_restore_activation"} <= set(
      report["ablation"]["conditions"])
  assert {"int8_naive", "int8_holdout_super"} <= set(report["quantization"])
  assert len(report["sites"]) == 2 and report["ablated"]
  # The pruned run restores like any run (superlm_jax.sample uses load_model) with exactly the ablated weights zeroed.
  original, _, step = load_model(run_dir)
  restored, config, pruned_step = load_model(pruned)
  assert pruned_step == step and config.train.workdir == str(pruned)
  zeroed = {(w["site"], w["row"], w["col"]) for w in report["ablated"]}
  for site in mlp_sites(original):
    a = np.array(module_at(original, site.path).down[...])
    b = np.asarray(module_at(restored, site.path).down[...])
    for name, row, col in zeroed:
      if name == site.name:
        assert b[row, col] == 0.0 and a[row, col] != 0.0
        a[row, col] = 0.0
    np.testing.assert_array_equal(a, b)
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # the source is untouched
  again = _run_cli(f"--checkpoint={run_dir}", f"--prune={pruned}")
  assert again.returncode == 1 and "already exists" in again.stderr


def test_cli_missing_checkpoint_is_one_line(tmp_path):
  missing = tmp_path / "no_such_run"
  proc = _run_cli(f"--checkpoint={missing}")
  assert proc.returncode == 1
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr


def test_converted_hugging_face_deepseek_v3(tmp_path):
  """On a model converted from transformers (MLA + MoE, one dense block, shared experts), a super weight planted in
  the Hugging Face layout (nn.Linear: down_proj.weight[out, in]) is found at our [in, out] coordinate, and its
  super activation equals the one transformers computes at that token and channel."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from superlm_jax.interop import hf as hf_lib

  torch.manual_seed(0)
  config = transformers.DeepseekV3Config(
      vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
      qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
      n_shared_experts=1, n_group=1, topk_group=1, max_position_embeddings=64, bos_token_id=None,
      eos_token_id=None, pad_token_id=None)
  hf_model = transformers.DeepseekV3ForCausalLM(config).eval()
  row, col, layer = 5, 7, 2
  shared = hf_model.model.layers[layer].mlp.shared_experts
  with torch.no_grad():
    shared.down_proj.weight[col, row] = VALUE
    shared.up_proj.weight[row, :] *= 40.0
  hf_model.save_pretrained(tmp_path, safe_serialization=True)
  model, _ = hf_lib.from_pretrained(tmp_path)
  tokens = np.random.default_rng(7).integers(0, 97, (4, 16))
  found = sw.detect_super_weights(model, jnp.asarray(tokens)).super_weights
  assert [w.coordinate for w in found] == [(f"blocks.{layer}.ffn.shared", row, col)]
  captured = {}
  hook = shared.down_proj.register_forward_hook(lambda module, args, out: captured.update(y=out.detach().numpy()))
  with torch.no_grad():
    hf_model(torch.tensor(tokens))
  hook.remove()
  y = captured["y"].reshape(-1, captured["y"].shape[-1])
  np.testing.assert_allclose(found[0].super_activation, y[found[0].token, col], rtol=1e-4)
