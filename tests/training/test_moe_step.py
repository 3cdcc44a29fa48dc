"""The train step on a tiny MoE model: aux losses averaged over MoE layers and added to the cross-entropy, and the
aux-loss-free balance biases moved by exactly gamma * sign(mean load - load) after the optimizer step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from superlm_jax.layers.moe import MoE, RouterBias
from superlm_jax.models.transformer import build_model
from superlm_jax.training.moe_balancing import MoEBalancing
from superlm_jax.training.step import init_train_state, make_train_step
from tests.conftest import numpy_init, tiny_model_config

E, K, BATCH, SEQ = 4, 2, 4, 12


def moe_config():
  # 3 layers, the first dense: two MoE layers, so "mean over layers" differs from "sum over layers".
  return tiny_model_config(n_routed_experts=E, num_experts_per_tok=K, mlp="swiglu", use_bias=False, norm="rmsnorm",
                           positions="rope", first_k_dense=1, n_shared_experts=1, num_layers=3)




@pytest.fixture(scope="module")
def setup():
  model = numpy_init(lambda: build_model(moe_config()), seed=0, std=0.1)
  moe_layers = [i for i, block in enumerate(model.blocks) if isinstance(block.ffn, MoE)]
  assert moe_layers == [1, 2]
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 97, size=(BATCH, SEQ + 1))
  batch = {"inputs": jnp.asarray(tokens[None, :, :-1], jnp.int32), "targets": jnp.asarray(tokens[None, :, 1:], jnp.int32)}
  ref = reference(model, moe_layers, tokens[:, :-1], tokens[:, 1:])
  return model, moe_layers, batch, ref


def reference(model, moe_layers, inputs, targets):
  """Float64 cross-entropy and, per MoE layer, the Switch loss E * sum_i f_i P_i, z-loss and assignment counts,
  recomputed from the router inputs (the blocks are run one by one to read each feed-forward input)."""
  @nnx.jit
  def blockwise(model, tokens):
    positions = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), tokens.shape)
    start = jnp.zeros((BATCH,), jnp.int32)
    x = model.embed(tokens)
    ffn_inputs = []
    for block in model.blocks:
      h, _ = block.attn(block.attn_norm(x), positions, None, start)
      x = x + h
      u = block.ffn_norm(x)
      ffn_inputs.append(u.reshape(-1, u.shape[-1]))
      x = x + block.ffn(u)
    return model.embed.attend(model.final_norm(x)), ffn_inputs, model(tokens)

  logits, ffn_inputs, model_logits = blockwise(model, jnp.asarray(inputs, jnp.int32))
  nnx.pop(model, nnx.Intermediate)  # drop the router statistics these calls sowed: the model is as built
  logits, ffn_inputs = np.asarray(logits, np.float64), [np.asarray(u, np.float64) for u in ffn_inputs]
  np.testing.assert_allclose(logits, np.asarray(model_logits), rtol=1e-5, atol=1e-5)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce = np.mean(log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0])
  switch, z, counts = [], [], []
  for i in moe_layers:
    r = ffn_inputs[i] @ np.asarray(model.blocks[i].ffn.router[...], np.float64)
    p = np.exp(r - r.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, -1)[:, :K]  # softmax router, zero bias at initialisation
    c = np.bincount(ids.reshape(-1), minlength=E)
    f = c / ids.size
    switch.append(E * np.sum(f * p.mean(0)))
    z.append(np.mean(np.log(np.exp(r).sum(-1)) ** 2))
    counts.append(c)
  return {"ce": ce, "switch": np.array(switch), "z": np.array(z), "counts": np.array(counts)}


def run_step(model, batch, moe):
  graphdef, state = init_train_state(model, optax.sgd(0.1), seed=0)
  assert all(isinstance(v, RouterBias) for _, v in nnx.to_flat_state(state["model_state"]))
  state = jax.tree.map(jnp.copy, state)  # the step donates its input state; keep the model's arrays alive
  before = jax.tree.map(np.asarray, state)
  new_state, metrics = make_train_step(graphdef, optax.sgd(0.1), moe=moe)(state, batch)
  return before, new_state, metrics


def biases(model_state, moe_layers):
  return np.stack([np.asarray(model_state["blocks"][i]["ffn"]["balance_bias"][...]) for i in moe_layers])


def test_bias_update_and_aux_losses(setup):
  """aux 0.5, z 0.1, bias rate 0.01: loss = ce + 0.5 * (mean over MoE layers of the Switch loss) + 0.1 * (mean
  z-loss); each bias moves by exactly +-0.01 (0 at exactly mean load), down for overloaded experts, consistent with
  the reported loads."""
  model, moe_layers, batch, ref = setup
  before, state, metrics = run_step(model, batch, MoEBalancing(aux_loss_coef=0.5, z_loss_coef=0.1,
                                                               bias_update_rate=0.01))
  load = np.asarray(metrics["moe_load"], np.float64)
  assert load.shape == (len(moe_layers), E)
  np.testing.assert_allclose(load * BATCH * SEQ * K, ref["counts"], atol=1e-4)  # the reported loads are the real ones
  assert (ref["counts"] != ref["counts"][:, :1]).any()  # not already balanced: the update has something to do
  np.testing.assert_allclose(float(metrics["moe_aux_loss"]), ref["switch"].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["moe_z_loss"]), ref["z"].mean(), rtol=1e-5)
  assert abs(ref["switch"].mean() - ref["z"].mean()) > 0.1  # swapped coefficients would show
  np.testing.assert_allclose(float(metrics["loss"]), ref["ce"] + 0.5 * ref["switch"].mean() + 0.1 * ref["z"].mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics["nll"]), ref["ce"], rtol=1e-5)
  old, new = biases(before["model_state"], moe_layers), biases(state["model_state"], moe_layers)
  np.testing.assert_array_equal(old, 0.0)
  mean_count = BATCH * SEQ * K / E
  expected = np.float32(0.01) * np.sign(mean_count - ref["counts"]).astype(np.float32)
  np.testing.assert_array_equal(new - old, expected)
  assert (new[ref["counts"] > mean_count] < 0).all() and (new[ref["counts"] < mean_count] > 0).all()
  # The parameters did take an SGD step, and the biases are not parameters.
  assert not np.allclose(np.asarray(state["params"]["blocks"][1]["ffn"]["router"][...]),
                         before["params"]["blocks"][1]["ffn"]["router"][...])
  assert "balance_bias" not in str(jax.tree_util.tree_structure(nnx.to_pure_dict(state["params"])))


def test_no_balancing_loss_is_cross_entropy_and_biases_stay(setup):
  model, moe_layers, batch, ref = setup
  before, state, metrics = run_step(model, batch, MoEBalancing())
  np.testing.assert_allclose(float(metrics["loss"]), ref["ce"], rtol=1e-5)
  np.testing.assert_array_equal(biases(state["model_state"], moe_layers), biases(before["model_state"], moe_layers))
  # The router statistics are still reported.
  np.testing.assert_allclose(float(metrics["moe_aux_loss"]), ref["switch"].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["moe_z_loss"]), ref["z"].mean(), rtol=1e-5)
  mean_count = BATCH * SEQ * K / E
  np.testing.assert_allclose(np.asarray(metrics["moe_max_violation"]),
                             (ref["counts"].max(-1) - mean_count) / mean_count, rtol=1e-5)

