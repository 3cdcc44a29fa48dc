"""Tests of the LR schedule, the weight-decay mask and clipping (superlm_jax/training/optim.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from superlm_jax.config import base_config
from superlm_jax.training import optim


class Tiny(nnx.Module):
  """A stand-in for the real model, with the same kinds of params and axis-name metadata."""

  def __init__(self, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.5)
    self.embed = nnx.Embed(11, 4, rngs=rngs, embedding_init=nnx.with_partitioning(init, ("vocab", "embed")))
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (3, 4)), out_sharding=("position", "embed"))
    self.ln = nnx.LayerNorm(4, rngs=rngs, scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
                            bias_init=nnx.with_partitioning(init, ("embed",)))
    self.up = nnx.Linear(4, 6, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                         bias_init=nnx.with_partitioning(init, ("mlp",)))
    self.blocks = nnx.List([nnx.Linear(6, 4, rngs=rngs, kernel_init=init, bias_init=init)])

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...][: tokens.shape[-1]]
    return self.embed.attend(self.blocks[0](jax.nn.gelu(self.up(self.ln(x)))))


def make_model(seed: int = 0) -> Tiny:
  # Axis names without a mesh: create the params unsharded.
  with nnx.use_eager_sharding(False):
    return Tiny(nnx.Rngs(seed))


def train_cfg(**overrides):
  t = base_config().train
  t.update(dict(learning_rate=1e-2, warmup_steps=3, steps=10, min_lr_ratio=0.1, weight_decay=0.0,
                grad_clip=0.0, grad_accum_steps=1))
  t.update(overrides)
  return t


def params_of(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def random_grads(model, seed, scale=1.0):
  """A grads State like nnx.grad's output (Param leaves), with chosen values."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  values = [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, values)


def grads_via_nnx_grad(model, target):
  """Real nnx.grad output whose values are `target` (the gradient of <params, target>)."""
  flat_target = jax.tree.leaves(target)

  def loss(m):
    return sum(jnp.vdot(p, t) for p, t in zip(jax.tree.leaves(nnx.state(m, nnx.Param)), flat_target))

  return nnx.grad(loss)(model)


@nnx.jit
def apply_grads(model, opt, target):
  """opt.update with nnx.grad's output for gradient values `target` (jitted: eager optax is slow)."""
  opt.update(model, grads_via_nnx_grad(model, target))


def assert_trees_close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw), a, b)


# ------------------------------------------------------------------------------------------- schedule


def test_schedule_endpoints():
  cfg = train_cfg(learning_rate=1e-3, warmup_steps=4, steps=20, min_lr_ratio=0.1)
  sched = optim.lr_schedule(cfg)
  # Update n (1-based) is evaluated at count n-1 by optax.
  np.testing.assert_allclose(float(sched(0)), 1e-3 / 4, rtol=1e-6)  # First update: no wasted LR-0 step.
  np.testing.assert_allclose(float(sched(1)), 2e-3 / 4, rtol=1e-6)
  np.testing.assert_allclose(float(sched(3)), 1e-3, rtol=1e-6)  # Update 4 = warmup_steps: the peak.
  # Halfway through the cosine (update 12 of 4..20), the LR is the midpoint of peak and minimum.
  np.testing.assert_allclose(float(sched(11)), (1e-3 + 1e-4) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(sched(19)), 1e-4, rtol=1e-5)  # The last update: exactly the minimum.
  np.testing.assert_allclose(float(sched(100)), 1e-4, rtol=1e-5)  # Held after the end.
  lrs = [float(sched(i)) for i in range(20)]
  assert all(a < b for a, b in zip(lrs[:3], lrs[1:4])) and all(a > b for a, b in zip(lrs[3:19], lrs[4:]))
  assert optim.current_lr(cfg, 3) == pytest.approx(1e-3)


def test_schedule_degenerate_lengths():
  no_warmup = optim.lr_schedule(train_cfg(learning_rate=1.0, warmup_steps=0, steps=5))
  assert float(no_warmup(0)) < 1.0 and float(no_warmup(4)) == pytest.approx(0.1)
  short = optim.lr_schedule(train_cfg(learning_rate=1.0, warmup_steps=10, steps=5))
  assert float(short(9)) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- decay mask


def test_decay_mask_follows_axis_names():
  model = make_model()
  mask = nnx.to_pure_dict(optim.decay_mask(nnx.state(model, nnx.Param)))
  assert mask["up"]["kernel"] and mask["blocks"][0]["kernel"]  # Matrices (annotated or not) decay.
  assert not mask["embed"]["embedding"] and not mask["pos"]  # Embeddings: 'vocab' / 'position' axes.
  assert not mask["ln"]["scale"] and not mask["ln"]["bias"] and not mask["up"]["bias"]
  everything = optim.decay_mask(nnx.state(model, nnx.Param), decay_all=True)
  assert all(jax.tree.leaves(everything))


@pytest.mark.parametrize("decay_all", [False, True])
def test_weight_decay_only_shrinks_masked_params(decay_all):
  """Zero gradients make Adam's step 0, leaving only AdamW's decoupled decay: p <- p - lr * wd * p."""
  cfg = train_cfg(weight_decay=0.5, decay_all=decay_all)
  model = make_model()
  before = params_of(model)
  mask = nnx.to_pure_dict(optim.decay_mask(nnx.state(model, nnx.Param), decay_all))
  opt = nnx.Optimizer(model, optim.make_optimizer(cfg, model), wrt=nnx.Param)
  apply_grads(model, opt, jax.tree.map(jnp.zeros_like, random_grads(model, 0)))
  lr = optim.current_lr(cfg, 0)
  expected = jax.tree.map(lambda p, m: p * (1 - lr * 0.5) if m else p, before, mask)
  assert_trees_close(params_of(model), expected, rtol=1e-6)
  assert any(jax.tree.leaves(mask)) and (decay_all or not all(jax.tree.leaves(mask)))


# ------------------------------------------------------------------------------------------- clipping


def test_clipping_scales_the_gradient_to_the_clip_norm():
  """Adam's first moment after one step is (1 - b1) * the clipped gradient."""
  cfg = train_cfg(grad_clip=1.0)
  model = make_model()
  tx = optim.make_optimizer(cfg, model)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = random_grads(model, 1, scale=10.0)
  _, state = jax.jit(tx.update)(grads, tx.init(nnx.state(model, nnx.Param)), params)
  norm = optax.tree.norm(grads)
  assert float(norm) > 1.0
  expected_mu = jax.tree.map(lambda g: (1 - cfg.b1) * g / norm, grads)
  assert_trees_close(optax.tree.get(state, "mu"), expected_mu, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("as_dict", [False, True])
def test_functional_path_matches_nnx_optimizer(as_dict):
  """tx.init/update on nnx.split's param State (Variable leaves) or a plain dict, outside nnx.Optimizer."""
  cfg = train_cfg(weight_decay=0.3, grad_clip=0.5)
  model, ref_model = make_model(), make_model()
  tx = optim.make_optimizer(cfg, model)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  if as_dict:
    params = nnx.to_pure_dict(params)
  state = tx.init(params)
  grads = random_grads(model, 7)
  g = nnx.to_pure_dict(grads) if as_dict else grads

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  params, state = step(params, state, g)
  ref_opt = nnx.Optimizer(ref_model, optim.make_optimizer(cfg, ref_model), wrt=nnx.Param)
  apply_grads(ref_model, ref_opt, grads)
  got = params if as_dict else nnx.to_pure_dict(params)
  assert_trees_close(got, params_of(ref_model), rtol=1e-6)


def test_nnx_optimizer_under_nnx_jit():
  cfg = train_cfg(weight_decay=0.1, grad_clip=1.0)
  model = make_model()
  opt = nnx.Optimizer(model, optim.make_optimizer(cfg, model), wrt=nnx.Param)
  tokens = jnp.array([[1, 2, 3], [4, 5, 6]])

  @nnx.jit
  def train_step(model, opt, tokens):
    def loss_fn(model):
      logits = model(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(train_step(model, opt, tokens)) for _ in range(20)]
  assert losses[-1] < losses[0]
  assert int(opt.step[...]) == 20
