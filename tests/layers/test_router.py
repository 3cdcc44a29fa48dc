"""MoE routing (pure functions) against float64 NumPy references written out naively, token by token."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from superlm_jax.layers import router as R


# Jitted once per spec/shape: eager dispatch of the many small ops is slower than one compile.
route = jax.jit(R.route, static_argnums=1)
load_balancing_loss = jax.jit(R.load_balancing_loss, static_argnums=2)
expert_load = jax.jit(R.expert_load, static_argnums=1)


def np64(a):
  return np.asarray(a, np.float64)


def ref_scores(logits, scoring):
  logits = np64(logits)
  if scoring == "softmax":
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  return 1.0 / (1.0 + np.exp(-logits))


def ref_route(logits, spec, bias=None, group_score="auto"):
  """Per token: selection = score + bias; keep the best topk_group groups (group score = max expert, or for sigmoid
  the sum of the two best experts); pick the k best eligible experts; gates are the UNBIASED scores."""
  scores = ref_scores(logits, spec.scoring)
  tokens, e = scores.shape
  per_group = e // spec.n_group
  if group_score == "auto":
    group_score = "top2sum" if spec.scoring == "sigmoid" else "max"
  ids = np.zeros((tokens, spec.top_k), np.int64)
  gates = np.zeros((tokens, spec.top_k))
  for t in range(tokens):
    sel = scores[t] + (0.0 if bias is None else np64(bias))
    eligible = np.ones(e, bool)
    if spec.n_group > 1:
      gscores = []
      for g in range(spec.n_group):
        members = sorted(sel[g * per_group:(g + 1) * per_group], reverse=True)
        gscores.append(members[0] + members[1] if group_score == "top2sum" else members[0])
      best_groups = sorted(range(spec.n_group), key=lambda g: -gscores[g])[:spec.topk_group]
      eligible[:] = False
      for g in best_groups:
        eligible[g * per_group:(g + 1) * per_group] = True
    candidates = sorted((i for i in range(e) if eligible[i]), key=lambda i: -sel[i])[:spec.top_k]
    ids[t] = candidates
    g = scores[t, candidates]
    if spec.norm_topk_prob:
      g = g / g.sum()
    gates[t] = g * spec.routed_scaling_factor
  return ids, gates, scores


def random_logits(tokens, experts, seed, scale=1.5):
  return np.random.default_rng(seed).normal(size=(tokens, experts)).astype(np.float32) * scale


SPECS = {
    "softmax_top2_norm": dict(num_experts=8, top_k=2, scoring="softmax", norm_topk_prob=True),
    "softmax_top3_raw": dict(num_experts=8, top_k=3, scoring="softmax", norm_topk_prob=False),
    "sigmoid_top2_norm_scaled": dict(num_experts=8, top_k=2, scoring="sigmoid", norm_topk_prob=True,
                                     routed_scaling_factor=2.5),
    "sigmoid_top4_raw_scaled": dict(num_experts=8, top_k=4, scoring="sigmoid", norm_topk_prob=False,
                                    routed_scaling_factor=1.7),
    "softmax_top1": dict(num_experts=6, top_k=1, scoring="softmax", norm_topk_prob=False),
    "softmax_groups": dict(num_experts=16, top_k=3, scoring="softmax", n_group=4, topk_group=2),
    "sigmoid_groups_v3": dict(num_experts=16, top_k=4, scoring="sigmoid", n_group=4, topk_group=2,
                              routed_scaling_factor=2.5),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_route_matches_reference(name):
  spec = R.RouterSpec(**SPECS[name])
  logits = random_logits(64, spec.num_experts, seed=len(name))
  bias = np.random.default_rng(7).normal(size=spec.num_experts).astype(np.float32) * 0.05
  # The MoE layer always passes its bias; the bias-free path is checked once (one compilation per variant).
  for b in ((None, bias) if name == "softmax_top2_norm" else (bias,)):
    ids, gates, scores = route(jnp.asarray(logits), spec, None if b is None else jnp.asarray(b))
    ref_ids, ref_gates, ref_s = ref_route(logits, spec, b)
    assert ids.dtype == jnp.int32 and gates.dtype == jnp.float32 and scores.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_allclose(np64(gates), ref_gates, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np64(scores), ref_s, rtol=1e-5, atol=1e-7)
    if spec.norm_topk_prob:
      np.testing.assert_allclose(np64(gates).sum(-1), spec.routed_scaling_factor, rtol=1e-5)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_group_limited_routing_is_discriminative(scoring):
  """The grouped reference differs from ungrouped routing on some tokens (so the test above has teeth), and for
  sigmoid the DeepSeek-V3 group score (sum of the two best) differs from the max on some tokens."""
  spec = R.RouterSpec(num_experts=16, top_k=4, scoring=scoring, n_group=4, topk_group=2)
  logits = random_logits(256, 16, seed=3)
  ids = np.asarray(route(jnp.asarray(logits), spec)[0])
  ungrouped = ref_route(logits, R.RouterSpec(num_experts=16, top_k=4, scoring=scoring))[0]
  assert (np.sort(ids, -1) != np.sort(ungrouped, -1)).any(axis=-1).sum() > 10
  # Every chosen expert lies in at most topk_group groups.
  assert all(len(set(row // 4)) <= 2 for row in ids)
  if scoring == "sigmoid":
    by_max = ref_route(logits, spec, group_score="max")[0]
    differs = (ids != by_max).any(-1)
    assert differs.sum() > 0
    np.testing.assert_array_equal(ids, ref_route(logits, spec, group_score="top2sum")[0])


def test_sigmoid_group_score_is_top2_sum_handcrafted():
  """Group 0 has the single best expert (0.9) but a weak second (0.1); group 1 has 0.8 + 0.8. With topk_group=1 the
  V3 rule (sum of two best: 1.0 vs 1.6) picks group 1, the max rule would pick group 0."""
  probs = np.array([[0.9, 0.1, 0.05, 0.05, 0.8, 0.8, 0.05, 0.05]])
  logits = np.log(probs / (1 - probs)).astype(np.float32)
  spec = R.RouterSpec(num_experts=8, top_k=1, scoring="sigmoid", n_group=2, topk_group=1, norm_topk_prob=False)
  ids, gates, _ = route(jnp.asarray(logits), spec)
  assert int(ids[0, 0]) in (4, 5)
  np.testing.assert_allclose(float(gates[0, 0]), 0.8, rtol=1e-5)
  softmax_spec = R.RouterSpec(num_experts=8, top_k=1, scoring="softmax", n_group=2, topk_group=1)
  assert int(route(jnp.asarray(np.log(probs).astype(np.float32)), softmax_spec)[0][0, 0]) == 0


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_bias_changes_selection_not_gates(scoring):
  """Expert 0 is best, expert 1 second, expert 3 fourth; a bias on expert 3 makes it chosen instead of expert 1, and
  its gate is its UNBIASED score."""
  logits = np.array([[2.0, 1.0, 0.5, 0.2, -1.0, -0.5]], np.float32)
  scores = ref_scores(logits, scoring)[0]
  bias = np.zeros(6, np.float32)
  bias[3] = 1.0
  for k, norm in ((1, False), (2, False), (2, True)):
    spec = R.RouterSpec(num_experts=6, top_k=k, scoring=scoring, norm_topk_prob=norm, routed_scaling_factor=1.5)
    ids0, gates0, _ = route(jnp.asarray(logits), spec)
    ids1, gates1, s1 = route(jnp.asarray(logits), spec, jnp.asarray(bias))
    assert list(np.asarray(ids0[0])) == [0, 1][:k]
    assert list(np.asarray(ids1[0])) == [3, 0][:k]
    chosen = scores[[3, 0][:k]]
    expected = (chosen / chosen.sum() if norm else chosen) * 1.5
    np.testing.assert_allclose(np64(gates1[0]), expected, rtol=1e-6)
    np.testing.assert_allclose(np64(s1[0]), scores, rtol=1e-6)  # scores returned unbiased
    assert not np.allclose(np64(gates1[0]), (scores + bias)[[3, 0][:k]] * 1.5)


def test_expert_load_fractions():
  rng = np.random.default_rng(0)
  ids = np.stack([rng.choice(7, size=3, replace=False, p=[.4, .2, .1, .1, .1, .1, 0]) for _ in range(50)])
  load = np64(expert_load(jnp.asarray(ids, jnp.int32), 7))
  ref = np.array([(ids == e).sum() for e in range(7)]) / ids.size
  np.testing.assert_allclose(load, ref, rtol=1e-6)
  assert load[6] == 0 and abs(load.sum() - 1) < 1e-6


def ref_switch_loss(scores, ids, e):
  probs = scores / scores.sum(-1, keepdims=True)
  f = np.array([(ids == i).sum() for i in range(e)]) / ids.size
  p = probs.mean(0)
  return e * sum(f[i] * p[i] for i in range(e))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_load_balancing_loss_matches_reference(scoring):
  spec = R.RouterSpec(num_experts=8, top_k=2, scoring=scoring)
  logits = random_logits(40, 8, seed=11)
  ids, _, scores = route(jnp.asarray(logits), spec)
  loss = float(load_balancing_loss(scores, ids, 8))
  np.testing.assert_allclose(loss, ref_switch_loss(ref_scores(logits, scoring), np.asarray(ids), 8), rtol=1e-5)


def test_switch_loss_is_one_when_uniform_and_above_one_when_imbalanced():
  e, tokens, k = 8, 32, 2
  scores = jnp.asarray(ref_scores(random_logits(tokens, e, seed=5), "softmax"), jnp.float32)
  uniform_ids = (np.arange(tokens * k).reshape(tokens, k) % e).astype(np.int32)  # every expert gets T*k/E
  np.testing.assert_allclose(float(load_balancing_loss(scores, jnp.asarray(uniform_ids), e)), 1.0, rtol=1e-6)
  # Perfectly uniform router probabilities too.
  flat = jnp.full((tokens, e), 1.0 / e)
  np.testing.assert_allclose(float(load_balancing_loss(flat, jnp.asarray(uniform_ids), e)), 1.0, rtol=1e-6)
  # A router that prefers experts 0 and 1 for every token: f and P concentrate together -> loss > 1.
  skew = random_logits(tokens, e, seed=6, scale=0.3)
  skew[:, :2] += 3.0
  spec = R.RouterSpec(num_experts=e, top_k=k)
  ids, _, s = route(jnp.asarray(skew), spec)
  loss = float(load_balancing_loss(s, ids, e))
  assert loss > 1.5, loss
  np.testing.assert_allclose(loss, ref_switch_loss(ref_scores(skew, "softmax"), np.asarray(ids), e), rtol=1e-5)


def test_z_loss_matches_reference():
  logits = random_logits(30, 8, seed=9, scale=4.0)
  ref = np.mean([math.log(np.exp(np64(row)).sum()) ** 2 for row in logits])
  np.testing.assert_allclose(float(R.router_z_loss(jnp.asarray(logits))), ref, rtol=1e-5)
  np.testing.assert_allclose(float(R.router_z_loss(jnp.asarray(logits, jnp.bfloat16))),
                             np.mean(np.log(np.exp(np64(jnp.asarray(logits, jnp.bfloat16))).sum(-1)) ** 2),
                             rtol=1e-5)


def test_max_violation_and_entropy():
  load = np.array([0.4, 0.3, 0.2, 0.1, 0.0], np.float32)
  np.testing.assert_allclose(float(R.max_violation(jnp.asarray(load))), (0.4 - 0.2) / 0.2, rtol=1e-6)
  assert float(R.max_violation(jnp.full((8,), 0.125))) == 0.0
  for scoring in ("softmax", "sigmoid"):
    scores = ref_scores(random_logits(20, 8, seed=12), scoring)
    probs = scores / scores.sum(-1, keepdims=True)
    ref = np.mean([-sum(p * math.log(p) for p in row) for row in probs])
    np.testing.assert_allclose(float(R.router_entropy(jnp.asarray(scores, jnp.float32))), ref, rtol=1e-5)
  np.testing.assert_allclose(float(R.router_entropy(jnp.full((4, 8), 0.3))), math.log(8), rtol=1e-6)


def test_bias_update_rule():
  rng = np.random.default_rng(4)
  bias = rng.normal(size=6).astype(np.float32) * 0.01
  load = np.array([0.3, 0.1, 0.25, 0.15, 0.05, 0.15], np.float32)  # mean 1/6: three over, three under
  new = np64(R.update_balance_bias(jnp.asarray(bias), jnp.asarray(load), 0.001))
  mean = np64(load).mean()
  ref = np64(bias) + 0.001 * np.array([1.0 if mean > l else -1.0 if mean < l else 0.0 for l in np64(load)])
  np.testing.assert_allclose(new, ref, rtol=0, atol=1e-7)
  over = load > mean
  assert (new[over] < bias[over]).all() and (new[~over] > bias[~over]).all()
  # Perfect balance leaves the bias alone.
  same = np64(R.update_balance_bias(jnp.asarray(bias), jnp.full((6,), 1 / 6, jnp.float32), 0.001))
  np.testing.assert_array_equal(same, np64(bias))


def test_spec_validation():
  with pytest.raises(ValueError):
    R.RouterSpec(num_experts=8, top_k=2, scoring="relu")
  with pytest.raises(ValueError):
    R.RouterSpec(num_experts=10, top_k=2, n_group=4)
  with pytest.raises(ValueError):
    R.RouterSpec(num_experts=16, top_k=9, n_group=4, topk_group=2)
