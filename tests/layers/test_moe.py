"""MoE dispatch (dropless ragged_dot and fixed capacity) against a naive per-token loop over experts in float64,
gradients, the balance bias as non-trainable state, compile-once, and one expert == the dense model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from superlm_jax.layers import router as R
from superlm_jax.layers.moe import MoE, MoEStats, RouterBias, capacity_dispatch, dropless_dispatch
from superlm_jax.models.transformer import build_model
from tests.conftest import numpy_init, tiny_model_config

dropless = jax.jit(dropless_dispatch, static_argnums=6)
capacity = jax.jit(capacity_dispatch, static_argnums=(6, 7))


def np64(a):
  return np.asarray(a, np.float64)


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
  return x / (1.0 + np.exp(-x))


def ffn(x, w_gate, w_up, w_down, activation):
  """One expert on one token (vector x), float64."""
  up = x @ w_up
  hidden = silu(x @ w_gate) * up if activation == "swiglu" else gelu_tanh(up)
  return hidden @ w_down


def naive_moe(x, ids, gates, w_gate, w_up, w_down, activation, kept=None):
  """For each token: sum over its k assignments (those kept) of gate * FFN_expert(x)."""
  x, gates, w_up, w_down = np64(x), np64(gates), np64(w_up), np64(w_down)
  w_gate = None if w_gate is None else np64(w_gate)
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    for j in range(ids.shape[1]):
      if kept is not None and not kept[t, j]:
        continue
      e = int(ids[t, j])
      out[t] += gates[t, j] * ffn(x[t], None if w_gate is None else w_gate[e], w_up[e], w_down[e], activation)
  return out


def naive_capacity_kept(ids, num_experts, capacity_factor):
  """Slot-major priority: every token's first choice is placed (tokens in order) before any second choice."""
  tokens, k = ids.shape
  cap = max(1, math.ceil(capacity_factor * tokens * k / num_experts))
  used = [0] * num_experts
  kept = np.zeros(ids.shape, bool)
  for j in range(k):
    for t in range(tokens):
      e = int(ids[t, j])
      if used[e] < cap:
        kept[t, j] = True
        used[e] += 1
  return kept


def skewed_assignments(tokens, k, num_experts, seed, unused=(2, 5)):
  """Distinct experts per token, very uneven loads, and some experts that get no token at all."""
  rng = np.random.default_rng(seed)
  p = np.array([0.0 if e in unused else 1.0 + 4.0 * (e == 0) + 2.0 * (e == 1) for e in range(num_experts)])
  ids = np.stack([rng.choice(num_experts, size=k, replace=False, p=p / p.sum()) for _ in range(tokens)])
  gates = rng.uniform(0.1, 1.0, size=(tokens, k))
  return ids.astype(np.int32), gates.astype(np.float32)


def expert_weights(num_experts, d, h, activation, seed):
  rng = np.random.default_rng(seed)
  w = lambda *s: (rng.normal(size=s) / math.sqrt(s[-2])).astype(np.float32)
  return (w(num_experts, d, h) if activation == "swiglu" else None), w(num_experts, d, h), w(num_experts, h, d)


def as_jnp(*arrays):
  return tuple(None if a is None else jnp.asarray(a) for a in arrays)


T, D, H, E, K = 24, 8, 12, 6, 2


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_dropless_matches_naive_loop(activation):
  x = np.random.default_rng(1).normal(size=(T, D)).astype(np.float32)
  ids, gates = skewed_assignments(T, K, E, seed=2)
  counts = np.bincount(ids.reshape(-1), minlength=E)
  assert counts[2] == counts[5] == 0 and counts.max() >= 2 * counts[counts > 0].min()  # uneven, with empty experts
  weights = expert_weights(E, D, H, activation, seed=3)
  y, dropped = dropless(*as_jnp(x, ids, gates, *weights), activation)
  np.testing.assert_allclose(np64(y), naive_moe(x, ids, gates, *weights, activation), rtol=2e-5, atol=2e-6)
  assert float(dropped) == 0.0


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_capacity_matches_naive_loop_when_nothing_is_dropped(activation):
  x = np.random.default_rng(4).normal(size=(T, D)).astype(np.float32)
  ids, gates = skewed_assignments(T, K, E, seed=5)
  weights = expert_weights(E, D, H, activation, seed=6)
  # capacity_factor = E: every expert has T * k slots, more than any load.
  y, dropped = capacity(*as_jnp(x, ids, gates, *weights), activation, float(E))
  np.testing.assert_allclose(np64(y), naive_moe(x, ids, gates, *weights, activation), rtol=2e-5, atol=2e-6)
  assert float(dropped) == 0.0


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_capacity_drops_overflow_slot_major(activation):
  x = np.random.default_rng(7).normal(size=(T, D)).astype(np.float32)
  ids, gates = skewed_assignments(T, K, E, seed=8)
  weights = expert_weights(E, D, H, activation, seed=9)
  factor, cap = 1.5, 12  # capacity = ceil(1.5 * 48 / 6) = 12 slots per expert; expert 0 wants far more
  kept = naive_capacity_kept(ids, E, factor)
  assert 0 < (~kept).sum() < kept.size / 2
  # The priority rule matters here: token-major order would keep a different set.
  token_major = np.zeros_like(kept)
  used = [0] * E
  for t in range(T):
    for j in range(K):
      if used[ids[t, j]] < cap:
        token_major[t, j], used[ids[t, j]] = True, used[ids[t, j]] + 1
  assert (token_major != kept).any()
  y, dropped = capacity(*as_jnp(x, ids, gates, *weights), activation, factor)
  np.testing.assert_allclose(float(dropped), (~kept).mean(), rtol=1e-6)
  np.testing.assert_allclose(np64(y), naive_moe(x, ids, gates, *weights, activation, kept=kept),
                             rtol=2e-5, atol=2e-6)




def make_moe(activation="swiglu", dispatch="dropless", num_shared=1, seed=0, capacity_factor=1.25, **spec):
  spec = R.RouterSpec(**{"num_experts": 8, "top_k": 2, **spec})
  return numpy_init(lambda: MoE(D, spec=spec, expert_hidden=H, num_shared=num_shared, activation=activation,
                                dispatch=dispatch, capacity_factor=capacity_factor, std=0.5, out_std=0.3,
                                rngs=nnx.Rngs(params=seed)), seed, std=0.4)


def ref_route(logits, spec, bias):
  """Float64 routing: biased selection within the best groups, unbiased gates (see tests/layers/test_router.py)."""
  scores = 1 / (1 + np.exp(-logits)) if spec.scoring == "sigmoid" else np.exp(logits) / np.exp(logits).sum(-1)[:, None]
  sel = scores + bias
  per = spec.num_experts // spec.n_group
  ids = []
  for row in sel:
    groups = row.reshape(spec.n_group, per)
    gscore = np.sort(groups, -1)[:, -2:].sum(-1) if spec.scoring == "sigmoid" else groups.max(-1)
    allowed = np.repeat(np.isin(np.arange(spec.n_group), np.argsort(-gscore)[:spec.topk_group]), per)
    ids.append(np.argsort(-np.where(allowed, row, -np.inf))[:spec.top_k])
  ids = np.array(ids)
  gates = np.take_along_axis(scores, ids, -1)
  if spec.norm_topk_prob:
    gates = gates / gates.sum(-1, keepdims=True)
  return ids, gates * spec.routed_scaling_factor


@pytest.mark.parametrize("dispatch,activation,spec", [
    ("dropless", "swiglu", dict(scoring="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5)),
    ("capacity", "gelu", dict(scoring="softmax", norm_topk_prob=False)),
])
def test_moe_module_matches_naive(dispatch, activation, spec):
  """Router (with a nonzero balance bias) + routed experts + shared expert, all recomputed in float64."""
  moe = make_moe(activation, dispatch, capacity_factor=8.0, **spec)
  bias = np.random.default_rng(10).normal(size=8).astype(np.float32) * 0.1
  moe.balance_bias[...] = jnp.asarray(bias)
  x = np.random.default_rng(11).normal(size=(2, 5, D)).astype(np.float32)
  y = nnx.jit(lambda m, x: m(x))(moe, jnp.asarray(x))
  xt = np64(x).reshape(-1, D)
  ids, gates = ref_route(xt @ np64(moe.router[...]), moe.spec, np64(bias))
  w_gate = None if moe.w_gate is None else moe.w_gate[...]
  ref = naive_moe(xt, ids, gates, w_gate, moe.w_up[...], moe.w_down[...], activation)
  sh = moe.shared
  shared_gate = None if sh.gate is None else np64(sh.gate[...])
  ref += np.stack([ffn(row, shared_gate, np64(sh.up[...]), np64(sh.down[...]), activation) for row in xt])
  np.testing.assert_allclose(np64(y).reshape(-1, D), ref, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------------- gradients


def stats_of(model_fn, *args):
  y, captured = nnx.capture(model_fn, MoEStats)(*args)
  (stats,) = [v.get_value()[0] for _, v in nnx.to_flat_state(captured)]
  return y, stats


def test_balance_bias_is_state_not_param_and_gets_no_gradient():
  moe = make_moe(scoring="softmax")
  assert isinstance(moe.balance_bias, RouterBias) and not isinstance(moe.balance_bias, nnx.Param)
  param_paths = [path for path, _ in nnx.to_flat_state(nnx.state(moe, nnx.Param))]
  assert not any("balance_bias" in map(str, path) for path in param_paths)
  assert any("router" in map(str, path) for path in param_paths)
  graphdef, params, bias, rest = nnx.split(moe, nnx.Param, RouterBias, ...)
  x = jnp.asarray(np.random.default_rng(12).normal(size=(16, D)), jnp.float32)

  def loss(params, bias):
    y, stats = stats_of(nnx.merge(graphdef, params, bias, rest), x)
    return jnp.sum(y ** 2) + stats["load_balancing_loss"] + stats["z_loss"]

  g_params, g_bias = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, bias)
  np.testing.assert_array_equal(np64(g_bias["balance_bias"][...]), 0.0)
  assert np.abs(np64(g_params["router"][...])).max() > 0


def test_load_balancing_loss_gradient_reaches_router_weights():
  """d/dW of E * sum_i f_i * mean_t p_ti (f constant) against the softmax Jacobian written out in float64."""
  moe = make_moe(scoring="softmax", num_shared=0)
  graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
  xt = np.random.default_rng(13).normal(size=(20, D)).astype(np.float32)

  def aux(params):
    return stats_of(nnx.merge(graphdef, params, rest), jnp.asarray(xt))[1]["load_balancing_loss"]

  grads = jax.jit(jax.grad(aux))(params)
  g_router = np64(grads["router"][...])
  assert np.abs(g_router).max() > 1e-4
  for name in ("w_up", "w_gate", "w_down"):  # the aux loss does not involve the experts
    np.testing.assert_array_equal(np64(grads[name][...]), 0.0)
  x, w = np64(xt), np64(moe.router[...])
  logits = x @ w
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ids = np.argsort(-p, -1)[:, :2]
  f = np.bincount(ids.reshape(-1), minlength=8) / ids.size
  dl_dp = np.broadcast_to(8 * f / len(x), p.shape)
  dl_dlogits = p * (dl_dp - (p * dl_dp).sum(-1, keepdims=True))
  np.testing.assert_allclose(g_router, x.T @ dl_dlogits, rtol=1e-4, atol=1e-7)


def dense_per_token(x, ids, gates, w_gate, w_up, w_down, activation):
  """The same mixture with every token's k expert matrices gathered: [T, k, d, h] (jnp, differentiable)."""
  up = jnp.einsum("td,tkdh->tkh", x, w_up[ids])
  hidden = jax.nn.silu(jnp.einsum("td,tkdh->tkh", x, w_gate[ids])) * up if activation == "swiglu" else \
      jax.nn.gelu(up, approximate=True)
  return jnp.einsum("tk,tkh,tkhd->td", gates, hidden, w_down[ids])


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_dispatch_gradients_match_dense_formulation(activation):
  x = np.random.default_rng(14).normal(size=(T, D)).astype(np.float32)
  ids, gates = skewed_assignments(T, K, E, seed=15)
  weights = expert_weights(E, D, H, activation, seed=16)
  cot = jnp.asarray(np.random.default_rng(17).normal(size=(T, D)), jnp.float32)
  argnums = (0, 2, 4, 5) if activation == "gelu" else (0, 2, 3, 4, 5)  # x, gates, (w_gate,) w_up, w_down
  ids_j = jnp.asarray(ids)

  def grads(fn):
    g = jax.jit(jax.grad(lambda x, i, g, wg, wu, wd: jnp.sum(fn(x, i, g, wg, wu, wd) * cot), argnums=argnums))
    return g(*as_jnp(x), ids_j, *as_jnp(gates, *weights))

  ref = grads(lambda *a: dense_per_token(*a, activation))
  got_dropless = grads(lambda *a: dropless_dispatch(*a, activation)[0])
  got_capacity = grads(lambda *a: capacity_dispatch(*a, activation, float(E))[0])
  for got in (got_dropless, got_capacity):
    for g, want in zip(got, ref):
      np.testing.assert_allclose(np64(g), np64(want), rtol=2e-5, atol=2e-6)
  # Experts with no tokens get exactly zero gradient.
  for w in got_dropless[2:]:
    np.testing.assert_array_equal(np64(w)[[2, 5]], 0.0)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_forward_and_backward_compile_once_per_shape(dispatch):
  moe = make_moe(dispatch=dispatch, scoring="sigmoid", n_group=2, topk_group=1)
  graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

  def loss(params, x):
    y, stats = stats_of(nnx.merge(graphdef, params, rest), x)
    return jnp.mean(y ** 2) + 0.01 * stats["load_balancing_loss"]

  step = jax.jit(jax.value_and_grad(loss))
  rng = np.random.default_rng(18)
  results = [step(params, jnp.asarray(rng.normal(size=(3, 7, D)), jnp.float32)) for _ in range(2)]
  assert step._cache_size() == 1
  assert float(results[0][0]) != float(results[1][0])


def test_single_expert_top1_moe_equals_dense_model():
  """One routed expert, top-1, renormalised gate (= 1), no shared experts: exactly the dense SwiGLU model."""
  common = dict(norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False)
  dense = numpy_init(lambda: build_model(tiny_model_config(**common)), seed=0, std=0.2)
  moe_model = numpy_init(lambda: build_model(tiny_model_config(
      n_routed_experts=1, num_experts_per_tok=1, n_shared_experts=0, norm_topk_prob=True, **common)), seed=1, std=0.2)
  assert all(isinstance(b.ffn, MoE) for b in moe_model.blocks)
  # Everything but the feed-forward weights: copy dense -> MoE; then the expert takes the dense MLP's weights.
  for name in ("embed", "final_norm"):
    nnx.update(getattr(moe_model, name), nnx.state(getattr(dense, name)))
  for d_block, m_block in zip(dense.blocks, moe_model.blocks):
    for name in ("attn_norm", "attn", "ffn_norm"):
      nnx.update(getattr(m_block, name), nnx.state(getattr(d_block, name)))
    m_block.ffn.w_up[...] = d_block.ffn.up[...][None]
    m_block.ffn.w_gate[...] = d_block.ffn.gate[...][None]
    m_block.ffn.w_down[...] = d_block.ffn.down[...][None]
  tokens = jnp.asarray(np.random.default_rng(19).integers(0, 97, size=(2, 11)), jnp.int32)
  forward = nnx.jit(lambda m, t: m(t))
  want, got = forward(dense, tokens), forward(moe_model, tokens)
  np.testing.assert_allclose(np64(got), np64(want), rtol=1e-5, atol=1e-5)
  assert np.abs(np64(want)).max() > 0.1
