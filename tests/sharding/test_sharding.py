"""Sharding on 8 fake CPU devices (tests/conftest.py): one training step under data, FSDP and expert-parallel
meshes equals the single-device step; parameters and optimizer state really live in shards (experts split over
`expert`); a checkpoint saved on one mesh resumes on another; the mesh config, rules and multi-host detection.

Compilations dominate the time on 2 cores: 1-layer models, and each (model, mesh) step compiled once per module.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from superlm_jax import sharding
from superlm_jax.checkpoint import Checkpointer
from superlm_jax.config import base_config, validate
from superlm_jax.errors import UserError
from superlm_jax.layers.moe import expert_parallel_dispatch
from superlm_jax.models.transformer import build_model
from superlm_jax.training.optim import make_optimizer
from superlm_jax.training.step import (MoEBalancing, create_train_state, init_train_state, make_train_step,
                                       split_model)
from tests.conftest import VARIANTS, numpy_init, tiny_model_config

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs the 8 fake devices of tests/conftest.py")

MODELS = {
    "gpt2": tiny_model_config(num_layers=1),  # LayerNorm, learned positions, GELU, biases, tied head
    "mla": tiny_model_config(num_layers=1, **VARIANTS["mla_qlora"]),
    # 8 experts, 2 per device on a 4-way expert axis; a shared expert; every balancing term switched on.
    "moe": tiny_model_config(num_layers=1, norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False,
                             n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32),
}
MESHES = {"8x1x1": (8, 1, 1, 1), "2x4x1": (2, 4, 1, 1), "2x1x4": (2, 1, 4, 1)}
ACCUM, ROWS, SEQ = 2, 8, 12


def train_config():
  t = base_config().train
  # eps 1e-4: Adam's first update is lr * g / (|g| + eps), which for |g| near 0 turns float-rounding differences
  # between meshes into sign flips; with a larger eps the comparison measures the gradients, not the rounding.
  t.update(learning_rate=1e-2, warmup_steps=1, steps=10, eps=1e-4, moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001,
           moe_bias_update_rate=0.01)
  return t


def make_mesh(data, fsdp, expert, tensor=1):
  c = base_config().mesh
  c.data, c.fsdp, c.expert, c.tensor = data, fsdp, expert, tensor
  return sharding.make_mesh(c)


class Setup:
  """Per model: the host state (numpy init, no PRNG compilations), the optimizer, the batch, the single-device
  result, and the jitted sharded steps by mesh (each compiled once)."""

  def __init__(self, name):
    cfg = MODELS[name]
    self.make_model = lambda: build_model(cfg, seed=0)
    t = train_config()
    self.tx = make_optimizer(t, nnx.eval_shape(self.make_model))
    self.moe = MoEBalancing.from_config(t)
    self.graphdef, state = init_train_state(numpy_init(self.make_model, seed=0, std=0.05), self.tx, seed=0)
    self.host_state = jax.device_get(state)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(ACCUM, ROWS, SEQ + 1)).astype(np.int32)
    self.batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}
    reference = make_train_step(self.graphdef, self.tx, moe=self.moe)
    self.reference = jax.device_get(reference(jax.device_put(self.host_state), self.batch))
    self._steps = {}

  def step(self, mesh_name, state=None):
    """One sharded step from `state` (default: the host state placed on the mesh) -> (state, metrics, shardings)."""
    mesh = make_mesh(*MESHES[mesh_name])
    shardings = sharding.state_shardings(jax.eval_shape(lambda: self.host_state), mesh)
    if mesh_name not in self._steps:
      self._steps[mesh_name] = make_train_step(self.graphdef, self.tx, moe=self.moe, mesh=mesh,
                                               state_shardings=shardings)
    state = jax.device_put(self.host_state, shardings) if state is None else state
    batch = sharding.put_batch(self.batch, sharding.batch_sharding(mesh, ndim=3, batch_dim=1))
    new_state, metrics = self._steps[mesh_name](state, batch)
    return new_state, metrics, shardings


_SETUPS = {}


def setup(name):
  if name not in _SETUPS:
    _SETUPS[name] = Setup(name)
  return _SETUPS[name]


def assert_trees_close(actual, expected, rtol=2e-5, atol=2e-6):
  paths = jax.tree_util.tree_flatten_with_path(expected)[0]
  actual = jax.tree.leaves(actual)
  assert len(paths) == len(actual)
  for (path, want), got in zip(paths, actual):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_one_step_equals_single_device(model, mesh_name):
  s = setup(model)
  state, metrics, _ = s.step(mesh_name)
  ref_state, ref_metrics = s.reference
  np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(ref_metrics["grad_norm"]), rtol=1e-5)
  assert_trees_close(jax.device_get(state["params"]), ref_state["params"])
  assert_trees_close(jax.device_get(state["opt_state"]), ref_state["opt_state"], atol=1e-8)
  # MoE routing biases moved by +-gamma from the same loads (an exact update of identical counts).
  np.testing.assert_array_equal(jax.tree.leaves(jax.device_get(state["model_state"])),
                                jax.tree.leaves(ref_state["model_state"]))
  if model == "moe":
    np.testing.assert_allclose(np.asarray(metrics["moe_load"]), np.asarray(ref_metrics["moe_load"]), atol=1e-6)
    assert float(ref_metrics["moe_aux_loss"]) > 0


def shard_shape(array):
  return array.addressable_shards[0].data.shape


def test_parameters_and_optimizer_state_live_in_shards():
  """After a step (the jit's out_shardings), each device holds only its part: experts split 4 ways over `expert`
  (2 of 8 per device) and d_model split 4 ways over `fsdp`, moments like their parameters."""
  s = setup("moe")
  ep, _, _ = s.step("2x1x4")
  fsdp, _, _ = s.step("2x4x1")
  d, hidden = MODELS["moe"].d_model, MODELS["moe"].moe_intermediate_size
  w_up = lambda tree: tree["blocks"][0]["ffn"]["w_up"][...]
  adam_mu = lambda state: state["opt_state"][1][0].mu

  assert w_up(ep["params"]).shape == (8, d, hidden)
  assert shard_shape(w_up(ep["params"])) == (2, d, hidden)
  assert shard_shape(w_up(adam_mu(ep))) == (2, d, hidden)
  assert shard_shape(ep["model_state"]["blocks"][0]["ffn"]["balance_bias"][...]) == (2,)
  # Under expert parallelism the dense weights stay whole (the expert axis splits only experts and rows).
  assert shard_shape(ep["params"]["embed"]["embedding"][...]) == (97, d)

  assert shard_shape(w_up(fsdp["params"])) == (8, d // 4, hidden)
  assert shard_shape(w_up(adam_mu(fsdp))) == (8, d // 4, hidden)
  assert shard_shape(fsdp["params"]["embed"]["embedding"][...]) == (97, d // 4)
  assert shard_shape(fsdp["params"]["blocks"][0]["attn"]["wq"][...]) == (d // 4, 4, 8)
  for state in (ep, fsdp):
    assert state["step"].sharding.is_fully_replicated


def test_state_is_created_in_its_shards():
  """create_train_state builds the model and the optimizer state inside one jit with sharded outputs: the
  same values as on one device (the threefry draws do not depend on the mesh), already split."""
  s = setup("moe")
  mesh = make_mesh(2, 1, 4)
  _, sharded, shardings = create_train_state(s.make_model, s.tx, 0, mesh)
  _, single, _ = create_train_state(s.make_model, s.tx, 0)
  flat_arrays = jax.tree.leaves(sharded)
  flat_shardings = jax.tree.leaves(shardings)
  assert all(a.sharding == want for a, want in zip(flat_arrays, flat_shardings))
  assert shard_shape(sharded["params"]["blocks"][0]["ffn"]["w_down"][...]) == (2, 32, MODELS["moe"].d_model)
  assert_trees_close(jax.device_get(sharded), jax.device_get(single), rtol=0, atol=0)


def test_checkpoint_from_one_mesh_resumes_on_another(tmp_path):
  """Two steps on (8,1,1) == one step on (8,1,1), save, restore onto (2,1,4) (experts now split), one step."""
  s = setup("moe")
  straight, _, _ = s.step("8x1x1")
  straight, straight_metrics, _ = s.step("8x1x1", straight)

  first, _, _ = s.step("8x1x1")
  ckpt = Checkpointer(tmp_path, keep=1)
  ckpt.save(1, first, {"step": 1})
  ckpt.wait()
  target = sharding.state_shardings(jax.eval_shape(lambda: s.host_state), make_mesh(2, 1, 4))
  restored, meta = ckpt.restore(abstract_state=jax.eval_shape(lambda: s.host_state), shardings=target)
  assert meta["step"] == 1 and int(restored["step"]) == 1
  w_up = restored["params"]["blocks"][0]["ffn"]["w_up"][...]
  assert w_up.sharding.spec == P("expert", None, None) and shard_shape(w_up) == (2,) + w_up.shape[1:]
  resumed, resumed_metrics, _ = s.step("2x1x4", restored)

  np.testing.assert_allclose(float(resumed_metrics["loss"]), float(straight_metrics["loss"]), rtol=1e-6)
  assert_trees_close(jax.device_get(resumed["params"]), jax.device_get(straight["params"]))

  # The weights also load in a process with a single device (sampling a pod-trained model on a laptop).
  saved = [float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(jax.device_get(first["params"]))]
  assert saved == one_device_restore(tmp_path, MODELS["moe"])  # bit for bit


ONE_DEVICE_RESTORE = """
import json, sys
import jax, ml_collections, numpy as np
from flax import nnx
from superlm_jax.checkpoint import Checkpointer
from superlm_jax.models.transformer import build_model
assert jax.device_count() == 1
cfg = ml_collections.ConfigDict(json.loads(sys.argv[2]))
_, params, rest = nnx.split(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param, ...)
params, _ = Checkpointer(sys.argv[1], keep=1, create=False).restore_weights(params, rest)
print(json.dumps([float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(params)]))
"""


def one_device_restore(directory, cfg):
  import json
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=os.getcwd())
  proc = subprocess.run([sys.executable, "-c", ONE_DEVICE_RESTORE, str(directory), cfg.to_json()], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dispatch,collectives", [
    ("dropless", ("all_gather", "reduce_scatter")),
    ("capacity", ("all_to_all",)),
])
def test_tokens_travel_to_their_experts(dispatch, collectives):
  """The expert-parallel dispatch moves rows between devices with the collectives its docstring names (read
  from the lowered program, no compilation), inside a shard_map whose expert weights are split 4 ways."""
  mesh = make_mesh(2, 1, 4)
  axes = sharding.mesh_axes(mesh, MODELS["moe"])
  assert axes.batch == ("data", "expert") and axes.experts == "expert" and axes.expert_hidden is None
  x = jnp.zeros((16, 32))
  ids, gates = jnp.zeros((16, 2), jnp.int32), jnp.zeros((16, 2))
  w_in, w_out = jnp.zeros((8, 32, 32)), jnp.zeros((8, 32, 32))
  dispatch_fn = lambda *a: expert_parallel_dispatch(*a, activation="swiglu", dispatch=dispatch,
                                                    capacity_factor=1.0, axes=axes)
  text = jax.jit(dispatch_fn).lower(x, ids, gates, w_in, w_in, w_out).as_text()
  for name in collectives:
    assert f"stablehlo.{name}" in text, name


def test_capacity_dispatch_with_tensor_and_fsdp_axes():
  """Capacity dispatch (GShard all-to-all), with each expert's hidden width split over `tensor` and d_model over
  `fsdp` as well, on a (1, 2, 2, 2) mesh. With room for every assignment (capacity factor E / k) nothing is
  dropped, so it equals the single-device dropless step of the same weights."""
  s = setup("moe")
  cfg = MODELS["moe"].copy_and_resolve_references()
  cfg.update(moe_dispatch="capacity", capacity_factor=4.0)
  graphdef = split_model(nnx.eval_shape(lambda: build_model(cfg)))[0]
  mesh = make_mesh(1, 2, 2, 2)
  shardings = sharding.state_shardings(jax.eval_shape(lambda: s.host_state), mesh)
  step = make_train_step(graphdef, s.tx, moe=s.moe, mesh=mesh, state_shardings=shardings)
  state, metrics = step(jax.device_put(s.host_state, shardings),
                        sharding.put_batch(s.batch, sharding.batch_sharding(mesh, ndim=3, batch_dim=1)))
  assert float(metrics["moe_dropped"]) == 0.0
  w_down = state["params"]["blocks"][0]["ffn"]["w_down"][...]
  assert shard_shape(w_down) == (4, 16, 16)  # experts / expert, hidden / tensor, d_model / fsdp
  ref_state, ref_metrics = s.reference
  np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-6)
  assert_trees_close(jax.device_get(state["params"]), ref_state["params"])


# ------------------------------------------------------------------------------------------------ no devices


def test_rules_split_what_divides():
  mesh = make_mesh(1, 2, 2, 2)
  spec = lambda names, shape: sharding.logical_to_spec(names, shape, mesh)
  assert spec(("vocab", "embed"), (96, 32)) == P("tensor", "fsdp")
  assert spec(("vocab", "embed"), (97, 32)) == P(None, "fsdp")  # 97 rows do not split: whole
  assert spec(("embed", "kv_heads", "head_dim"), (32, 1, 8)) == P("fsdp", None, None)  # MQA's one KV head
  assert spec(("experts", "embed", "mlp"), (8, 32, 64)) == P("expert", "fsdp", "tensor")
  assert spec(("kv_lora", "heads", "head_dim"), (16, 4, 8)) == P("fsdp", "tensor", None)
  assert spec(("embed", "kv_lora"), (32, 16)) == P("fsdp", None)  # a mesh axis splits one dimension only
  assert sharding.batch_axes(mesh) == ("fsdp", "expert") and sharding.batch_shards(mesh) == 4
  with pytest.raises(ValueError, match="no rule"):
    spec(("nonsense",), (4,))
  # Every logical name a model uses has a rule (a new layer with a new name must add one).
  for cfg in MODELS.values():
    graph_state = nnx.state(nnx.eval_shape(lambda: build_model(cfg)))
    sharding.state_shardings(graph_state, mesh)


def test_mesh_config():
  c = base_config().mesh
  assert sharding.mesh_shape(c, 8) == (8, 1, 1, 1) and sharding.mesh_shape(c, 1) == (1, 1, 1, 1)
  c.fsdp = 4
  assert sharding.mesh_shape(c, 8) == (2, 4, 1, 1)
  c.data, c.expert = 2, -1
  assert sharding.mesh_shape(c, 16) == (2, 4, 2, 1)
  c.data = -1
  with pytest.raises(UserError, match="only one mesh axis may be -1.*mesh.data and mesh.expert"):
    sharding.mesh_shape(c, 8)
  c.data, c.expert = 3, 1
  with pytest.raises(UserError, match=r"mesh.data=3 x mesh.fsdp=4 .* = 12 devices, but there are 8"):
    sharding.mesh_shape(c, 8)
  with pytest.raises(UserError, match="mesh.data=-1: the other mesh axes take 12 devices"):
    sharding.mesh_shape(_mesh(fsdp=4, tensor=3), 8)
  full = base_config()
  full.mesh.tensor = 0
  with pytest.raises(UserError, match="mesh.tensor=0 must be a positive size"):
    validate(full)


def _mesh(**sizes):
  c = base_config().mesh
  c.update(**sizes)
  return c


def test_check_fits():
  config = base_config()
  config.model.update(n_routed_experts=6, use_bias=False)
  config.train.batch_size = 4
  with pytest.raises(UserError, match=r"train.batch_size=4 does not split over the 8 batch shards \(mesh.data=8\)"):
    sharding.check_fits(config, make_mesh(8, 1, 1))
  config.train.batch_size = 8
  with pytest.raises(UserError, match="mesh.expert=4 does not divide model.n_routed_experts=6"):
    sharding.check_fits(config, make_mesh(2, 1, 4))
  sharding.check_fits(config, make_mesh(2, 4, 1))


@pytest.mark.parametrize("environ,flag,expected", [
    ({}, None, False),  # a plain run never waits for a coordinator
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, None, False),  # the sbatch script itself, outside srun
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "8"}, None, True),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "1"}, None, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, None, True),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, None, True),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}, None, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None, False),
    ({}, True, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False, False),
])
def test_distributed_only_when_the_environment_says_so(environ, flag, expected):
  assert sharding.distributed_requested(environ, flag) is expected


def test_data_pipeline_reads_this_process_shard(tmp_path, monkeypatch):
  """Without explicit indices the pipeline asks JAX which process it is: 4 processes read disjoint rows."""
  from superlm_jax.data import pipeline
  tokens = np.arange(64 + 5, dtype=np.uint16)
  (tmp_path / "train.bin").write_bytes(tokens.tobytes())
  (tmp_path / "meta.json").write_text('{"dtype": "uint16"}')
  seen = []
  for index in range(4):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    batch = next(pipeline.make_train_iterator(tmp_path, 4, 1, 8, seed=0))
    assert batch["inputs"].shape == (2, 4)
    explicit = next(pipeline.make_train_iterator(tmp_path, 4, 1, 8, seed=0, process_index=index, process_count=4))
    np.testing.assert_array_equal(batch["inputs"], explicit["inputs"])
    seen.extend(batch["inputs"][:, 0].tolist())
  assert len(seen) == len(set(seen)) == 8


def test_scan_layout_stacks_split_like_their_layers():
  """The leading `layers` axis of the scan layout is never split; the dimensions after it split as one layer's."""
  from superlm_jax.models.transformer import build_model
  from tests.conftest import tiny_model_config
  mesh = make_mesh(2, 4, 1)
  assert sharding.logical_to_spec(("layers", "embed", "mlp"), (3, 32, 64), mesh) == P(None, "fsdp", None)
  cfg = tiny_model_config(scan_layers=True)
  specs = sharding.state_shardings({"params": nnx.state(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param)},
                                   mesh)["params"]
  up = specs["layer_stacks"][0]["ffn"]["up"]
  assert (up.get_value() if hasattr(up, "get_value") else up).spec == P(None, "fsdp", None)
