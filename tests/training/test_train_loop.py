"""The training loop end to end on the real corpus: loss falls, resume is exact, accumulation is one step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from superlm_jax.models.transformer import build_model
from superlm_jax.training.loop import train
from superlm_jax.training.optim import make_optimizer
from superlm_jax.training.step import init_train_state, make_train_step
from tests.conftest import tiny_model_config, tiny_train_config


def params_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_loss_falls_below_unigram_baseline(tmp_path, shakespeare_data_dir):
  config = tiny_train_config(tmp_path / "run", shakespeare_data_dir, steps=300, eval_every=300, ckpt_every=300,
                             batch_size=8, warmup_steps=20, log_every=50)
  result = train(config, progress=False)
  assert result.val_loss < result.unigram_loss - 0.5, (result.val_loss, result.unigram_loss)


def test_resume_is_exact(tmp_path, shakespeare_data_dir):
  """8 steps straight == 4 steps, a restart of the same command, then 4 more: identical parameters and optimizer
  state (this needs the data iterator, step, RNG and optimizer state all restored)."""
  straight = train(tiny_train_config(tmp_path / "straight", shakespeare_data_dir), progress=False)
  train(tiny_train_config(tmp_path / "resumed", shakespeare_data_dir), progress=False, stop_at=4)
  resumed = train(tiny_train_config(tmp_path / "resumed", shakespeare_data_dir), progress=False)
  assert int(resumed.state["step"]) == int(straight.state["step"]) == 8
  assert params_equal(straight.state["params"], resumed.state["params"])
  assert params_equal(straight.state["opt_state"], resumed.state["opt_state"])
  assert resumed.val_loss == straight.val_loss


def test_resume_refuses_a_different_model(tmp_path, shakespeare_data_dir):
  from superlm_jax.errors import UserError
  train(tiny_train_config(tmp_path / "run", shakespeare_data_dir), progress=False, stop_at=2)
  config = tiny_train_config(tmp_path / "run", shakespeare_data_dir, steps=4)
  config.model.d_model = 64
  with pytest.raises(UserError, match="model.d_model"):
    train(config, progress=False)


def test_gradient_accumulation_is_one_optimizer_step_on_the_mean_gradient():
  """4 micro-batches of 2 == one batch of 8, with clipping active: the step clips the mean gradient once and the
  schedule advances once (the reference project clipped per micro-batch and stepped the schedule per micro-batch)."""
  from superlm_jax.config import base_config
  cfg = tiny_model_config()
  t = base_config().train
  t.update(learning_rate=1e-2, warmup_steps=1, steps=10, grad_clip=0.05)
  batch = {"inputs": jax.random.randint(jax.random.key(0), (8, 16), 0, 97)}
  batch["targets"] = jnp.roll(batch["inputs"], -1, axis=1)

  def run(accum):
    model = build_model(cfg, seed=0)
    tx = make_optimizer(t, model)
    graphdef, state = init_train_state(model, tx, seed=0)
    step = make_train_step(graphdef, tx)
    shaped = {k: v.reshape(accum, 8 // accum, 16) for k, v in batch.items()}
    for _ in range(2):
      state, metrics = step(state, shaped)
    return state, metrics

  one, m1 = run(1)
  four, m4 = run(4)
  assert float(m1["grad_norm"]) > t.grad_clip  # clipping is active
  np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(four["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)
  assert int(four["step"]) == 2


def test_moe_resume_is_exact_including_routing_biases(tmp_path, shakespeare_data_dir):
  """The aux-loss-free routing biases are model state: checkpointed, restored, and updated identically."""
  moe = dict(norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False, n_routed_experts=4,
             num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32, first_k_dense=1)

  def config(workdir):
    c = tiny_train_config(workdir, shakespeare_data_dir, moe_bias_update_rate=0.01, moe_aux_loss_coef=0.01,
                          moe_z_loss_coef=0.001)
    c.model.update(**moe)
    return c

  straight = train(config(tmp_path / "straight"), progress=False)
  train(config(tmp_path / "resumed"), progress=False, stop_at=4)
  resumed = train(config(tmp_path / "resumed"), progress=False)
  biases = jax.tree.leaves(straight.state["model_state"])
  assert biases and any(np.abs(np.asarray(b)).max() > 0 for b in biases)  # the biases did move
  assert params_equal(straight.state["model_state"], resumed.state["model_state"])
  assert params_equal(straight.state["params"], resumed.state["params"])
