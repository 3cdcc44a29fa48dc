"""Multi-token prediction (DeepSeek-V3 sec. 2.2) against a float64 NumPy formula of eq. 21-25, with the decoder
block TRM_k as the one black box (blocks are tested against references elsewhere); the gradient of the MTP loss
reaches the shared head; a depth the windows cannot hold is one line."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from superlm_jax.config import base_config, validate
from superlm_jax.errors import UserError
from superlm_jax.models.transformer import build_model, mtp_targets
from superlm_jax.training.step import init_train_state, make_train_step
from tests.conftest import VARIANTS, tiny_model_config

LAMBDA = 0.4


def randomise_norms(model, seed):
  """Norm scales start at 1, which would hide a norm applied to the wrong tensor: draw them."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and path and path[-1] == "scale":
      var.set_value(jnp.asarray(rng.uniform(0.5, 1.5, var.shape), jnp.float32))


def rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def reference(model, inputs, targets):
  """(main NLL, [NLL_k], total loss) by eq. 21-25 in float64: h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],
  h^k = TRM_k(h'), P^k_{i+k+1} = softmax(OutHead(h^k_i)), L_k = mean over i of -log P^k_{i+k+1}[t_{i+k+1}]."""
  f64 = lambda a: np.asarray(a, np.float64)
  eps = model.spec.norm_eps
  hidden = f64(nnx.jit(lambda m, x: m.hidden(x)[0])(model, inputs))
  table = f64(model.embed.embedding[...])
  head = table.T if model.head is None else f64(model.head[...])
  batch, seq = targets.shape

  def nll(h, labels, n):
    logp = log_softmax(h[:, :n] @ head)
    return -np.take_along_axis(logp, labels[:, :n, None], -1).mean()

  main = nll(hidden, targets, seq)
  previous, losses = hidden, []
  positions = jnp.broadcast_to(jnp.arange(seq)[None], (batch, seq))
  for k, module in enumerate(model.mtp, start=1):
    n = seq - k  # positions i with a target t_{i+k+1} = targets[i + k]
    embedded = np.zeros(hidden.shape)
    embedded[:, :n + 1] = table[targets[:, k - 1:]]  # Emb(t_{i+k}) = Emb(targets[i + k - 1])
    mixed = np.concatenate([rms(embedded, f64(module.embed_norm.scale[...]), eps),
                            rms(previous, f64(module.hidden_norm.scale[...]), eps)], -1) @ f64(module.projection[...])
    out = f64(module.block(jnp.asarray(mixed, jnp.float32), positions, None, jnp.zeros((batch,), jnp.int32))[0])
    losses.append(nll(rms(out, f64(module.output_norm.scale[...]), eps), targets[:, k:], n))
    previous = out
  return main, losses, main + LAMBDA / len(losses) * sum(losses)


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "mla_qlora"])
def test_loss_and_per_depth_nll_equal_the_equations(variant):
  cfg = tiny_model_config(**VARIANTS[variant], mtp_depth=2)
  model = build_model(cfg, seed=1)
  randomise_norms(model, 2)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (3, 17)).astype(np.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  main, losses, total = reference(model, inputs, targets)  # before the step, which donates the model's arrays
  graphdef, state = init_train_state(model, optax.sgd(0.0), seed=0)
  step = make_train_step(graphdef, optax.sgd(0.0), mtp_loss_weight=LAMBDA)
  _, metrics = step(state, {"inputs": jnp.asarray(inputs)[None], "targets": jnp.asarray(targets)[None]})
  np.testing.assert_allclose(float(metrics["nll"]), main, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(metrics["mtp_nll"]), losses, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["loss"]), total, rtol=2e-5)
  assert abs(losses[0] - losses[1]) > 1e-3  # the two depths really see different inputs and targets


def test_the_mtp_gradient_reaches_the_shared_head_and_weight_zero_trains_no_module():
  cfg = tiny_model_config(**VARIANTS["llama_gqa_untied"], mtp_depth=1)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 13)).astype(np.int32)
  batch = {"inputs": jnp.asarray(tokens[:, :-1])[None], "targets": jnp.asarray(tokens[:, 1:])[None]}

  def one_step(weight):
    graphdef, state = init_train_state(build_model(cfg, seed=3), optax.sgd(1.0), seed=0)
    before = jax.device_get(state["params"].to_pure_dict())  # the step donates the state
    new_state, _ = make_train_step(graphdef, optax.sgd(1.0), mtp_loss_weight=weight)(state, batch)
    return before, new_state["params"].to_pure_dict()

  before, off = one_step(0.0)
  _, on = one_step(1.0)
  moved = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max())
  assert moved(on["head"], off["head"]) > 1e-6  # the MTP loss changes the shared head's update
  assert moved(on["embed"]["embedding"], off["embed"]["embedding"]) > 1e-6  # and the shared embedding's
  for path, leaf in jax.tree_util.tree_flatten_with_path(off["mtp"])[0]:
    assert moved(leaf, _at(before["mtp"], path)) == 0.0, path  # weight 0: no gradient reaches the modules


def _at(tree, path):
  for key in path:
    tree = tree[getattr(key, "key", getattr(key, "idx", None))]
  return tree


def test_mtp_targets_mask_the_end_and_other_documents():
  targets = jnp.asarray([[10, 11, 12, 13, 14]])
  segments = jnp.asarray([[1, 1, 1, 2, 2]])
  labels, mask = mtp_targets(targets, 2, segments)
  assert labels.tolist() == [[12, 13, 14, 0, 0]]
  assert mask.tolist() == [[True, False, False, False, False]]  # i=1, 2 would predict into document 2
  assert mtp_targets(targets, 1)[1].tolist() == [[True, True, True, True, False]]


def test_a_depth_the_windows_cannot_hold_is_one_line():
  config = base_config()
  config.model.update(max_seq_len=32, mtp_depth=16)
  config.data.max_length = 16
  with pytest.raises(UserError, match=r"model.mtp_depth=16 needs windows longer than data.max_length=16"):
    validate(config, backend=False)
  config.model.mtp_depth = 31
  with pytest.raises(UserError, match=r"model.mtp_depth=31 is out of range"):
    validate(config, backend=False)


@pytest.mark.parametrize("variant", ["gpt2_learned", "llama_gqa_untied", "mla_qlora"])
def test_parameter_count_includes_the_modules(variant):
  from superlm_jax.models.accounting import parameter_count
  cfg = tiny_model_config(**VARIANTS[variant], mtp_depth=2)
  built = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(build_model(cfg, seed=0), nnx.Param)))
  counts = parameter_count(cfg)
  assert counts["total"] == built
  cfg.mtp_depth = 0
  assert counts["total"] - parameter_count(cfg)["total"] == counts["mtp"] > 0


def test_a_run_with_mtp_logs_each_depth_and_samples(tmp_path, shakespeare_data_dir):
  """Through the trainer on 8 (fake) devices: per-depth NLLs in metrics.jsonl, and the checkpoint restores and
  decodes (the modules are carried, not used, by generation)."""
  import json

  from superlm_jax.generate.decode import SamplingParams
  from superlm_jax.generate.restore import load_for_inference
  from superlm_jax.training.loop import train
  from tests.conftest import tiny_train_config
  config = tiny_train_config(tmp_path / "run", shakespeare_data_dir, steps=4)
  config.model.mtp_depth = 2
  result = train(config, progress=False)
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "mtp_nll/depth2" in r]
  assert train_rows and all(np.isfinite(r["mtp_nll/depth1"]) for r in train_rows)
  assert np.isfinite(result.val_loss)
  generator, tokenizer, _, step = load_for_inference(tmp_path / "run")
  assert step == 4
  greedy = SamplingParams(max_new_tokens=12, temperature=0)
  plain = generator.generate([tokenizer.encode("ROMEO.")], greedy)
  assert len(plain[0]) > 0
  speculative, *_ = load_for_inference(tmp_path / "run", speculative=True)
  assert speculative.draft_tokens == 2
  assert speculative.generate([tokenizer.encode("ROMEO.")], greedy) == plain
  from tests.system.test_cli import run
  proc = run("superlm_jax.sample", f"--checkpoint={tmp_path / 'run'}", "--prompt=ROMEO.", "--max_new_tokens=12",
             "--temperature=0", "--speculative")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == "ROMEO." + tokenizer.decode(plain[0]) + "\n"
  assert "speculative decoding:" in proc.stderr and "tokens per verify pass" in proc.stderr
