"""Runs with the real-size settings end to end on the real corpus: scan layout (with MoE stacks), remat, fused loss
and packed documents; checkpoints restore in their layout and convert to the other."""

import jax
import numpy as np
import pytest

from superlm_jax.convert import convert_layout
from superlm_jax.generate.restore import load_model
from superlm_jax.models.layout import scan_to_loop
from superlm_jax.training.loop import train
from tests.conftest import tiny_train_config

# A tiny DeepSeek-style MoE: one dense first block and two MoE blocks, so the scan layout has two stacks.
MOE = dict(norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False, n_routed_experts=4, num_experts_per_tok=2,
           n_shared_experts=1, moe_intermediate_size=32, first_k_dense=1, num_layers=3)


def _config(workdir, data_dir, **train):
  config = tiny_train_config(workdir, data_dir, moe_aux_loss_coef=0.01, moe_bias_update_rate=0.01, remat="full",
                             loss_chunk_size=64, **train)
  config.model.update(**MOE, scan_layers=True)
  config.data.packing = "segments"
  return config


@pytest.fixture
def no_compilation_cache():
  """XLA:CPU (jaxlib 0.10.2) aborts the process when it loads this program (expert-parallel shard_map inside
  nnx.scan, 8 host devices) back from the persistent compilation cache that tests/conftest.py turns on; compiling
  it afresh works. JAX decides once per process whether the cache is used, so instead of switching it off, nothing
  compiled here is written to it (see docs/architecture.md, "Known issues")."""
  previous = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
  yield
  jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)


def test_scan_run_converts_and_continues_in_the_loop_layout(tmp_path, shakespeare_data_dir, no_compilation_cache):
  scan = train(_config(tmp_path / "scan", shakespeare_data_dir), progress=False)  # checkpoints at steps 4 and 8
  # The step-4 checkpoint, converted to the loop layout, continues to step 8 like the scan run did.
  convert_layout(tmp_path / "scan", tmp_path / "loop", "loop", step=4)
  loop_config = _config(tmp_path / "loop", shakespeare_data_dir)
  loop_config.model.scan_layers = False
  continued = train(loop_config, progress=False)
  assert int(continued.state["step"]) == int(scan.state["step"]) == 8 and np.isfinite(scan.val_loss)
  # Loop and scan compute the same steps up to float rounding (exact resume itself: test_train_loop.py).
  scan_params = scan_to_loop(scan.state["params"].to_pure_dict(), resumed_config_model(tmp_path / "scan"))
  for a, b in zip(jax.tree.leaves(continued.state["params"].to_pure_dict()), jax.tree.leaves(scan_params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  # A run in either layout loads for inference, and in the other layout on request.
  for run in ("scan", "loop"):
    model, config, step = load_model(tmp_path / run)
    assert step == 8 and config.model.scan_layers == (run == "scan")
  model, config, _ = load_model(tmp_path / "scan", layout="loop")
  assert model.layer_stacks is None and not config.model.scan_layers


def resumed_config_model(run_dir):
  from superlm_jax.checkpoint import load_run_config
  return load_run_config(run_dir).model
