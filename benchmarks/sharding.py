"""What sharding buys and costs: per-device parameter memory under several meshes, and the train step time on N
(fake) CPU devices against one.

  python benchmarks/sharding.py [--memory_config=configs/deepseek_mini.py] [--step_config=configs/deepseek_mini.py:tiny]
      [--devices=8] [--steps=5] [--json=out.json]

Memory is computed from abstract shapes and the shardings of the rules table (superlm_jax/sharding.py) on an
abstract mesh, so a 745M-parameter model is "placed" on 8 devices without allocating anything (or having 8
devices): bytes on one device for the parameters, and for the whole train state (parameters + AdamW's two
moments). The step time runs the real
sharded train step on `--devices` fake CPU devices (XLA's --xla_force_host_platform_device_count): they share
this machine's cores, so the multi-device step can only be slower; the difference is the partitioned program's
overhead and its collectives (gradient all-reduce, FSDP all-gathers, expert all-to-all), not a speed-up.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _device_count_from_argv(default: int = 8) -> int:
  for arg in sys.argv[1:]:
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
  return default


# The fake devices must be configured before JAX starts.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={_device_count_from_argv()}").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AbstractMesh, AxisType  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import machine  # noqa: E402
from superlm_jax import sharding  # noqa: E402
from superlm_jax.cli import run_main  # noqa: E402
from superlm_jax.config import MESH_AXES, base_config  # noqa: E402
from superlm_jax.models import accounting  # noqa: E402
from superlm_jax.models.transformer import build_model  # noqa: E402
from superlm_jax.training.optim import make_optimizer  # noqa: E402
from superlm_jax.training.moe_balancing import MoEBalancing  # noqa: E402
from superlm_jax.training.step import create_train_state, init_train_state, make_train_step  # noqa: E402

_MEMORY_CONFIG = config_flags.DEFINE_config_file("memory_config", "configs/deepseek_mini.py",
                                                 "Config whose per-device memory is computed.", lock_config=True)
_STEP_CONFIG = config_flags.DEFINE_config_file("step_config", "configs/deepseek_mini.py:tiny",
                                               "Config whose train step is timed.", lock_config=True)
flags.DEFINE_integer("devices", 8, "Fake CPU devices (set before JAX starts).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per mesh, after a warm-up step (median reported).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Rows per timed step (a multiple of --devices).")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")

# (label, data, fsdp, expert): with 8 devices, the meshes of the README's advice.
MEMORY_MESHES = (("1 device", 1, 1, 1), ("8 fsdp", 1, 8, 1), ("2 data x 4 expert", 2, 1, 4))


def mesh_of(data: int, fsdp: int, expert: int, devices) -> jax.sharding.Mesh:
  c = base_config().mesh
  c.data, c.fsdp, c.expert = data, fsdp, expert
  return sharding.make_mesh(c, devices=devices)


def bytes_per_device(abstract_tree, shardings) -> int:
  """Bytes one device holds (the largest over devices: dimensions that do not divide stay whole, so all hold the
  same)."""
  total = 0
  for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    total += int(np.prod(s.shard_shape(a.shape), dtype=np.int64)) * a.dtype.itemsize
  return total


def memory(config) -> dict:
  make_model = lambda: build_model(config.model, seed=0)
  tx = make_optimizer(config.train, nnx.eval_shape(make_model))
  abstract = jax.eval_shape(lambda: init_train_state(make_model(), tx, 0)[1])
  results = {}
  for label, data, fsdp, expert in MEMORY_MESHES:
    mesh = AbstractMesh((data, fsdp, expert, 1), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    shardings = sharding.state_shardings(abstract, mesh)
    results[label] = {
        "mesh": sharding.describe(mesh),
        "params_bytes": bytes_per_device(abstract["params"], shardings["params"]),
        "train_state_bytes": bytes_per_device(abstract, shardings),
    }
  return results


def step_times(config) -> dict:
  m, t = config.model, config.train
  make_model = lambda: build_model(m, seed=0)
  tx = make_optimizer(t, nnx.eval_shape(make_model))
  seq = config.data.max_length
  tokens = np.random.default_rng(0).integers(0, m.vocab_size, size=(1, _BATCH.value, seq + 1)).astype(np.int32)
  batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}
  n = jax.device_count()
  meshes = [("1 device", 1, 1, 1), (f"{n} data", n, 1, 1), (f"{n // 4} data x 4 fsdp", n // 4, 4, 1)]
  if m.n_routed_experts and m.n_routed_experts % 4 == 0:
    meshes.append((f"{n // 4} data x 4 expert", n // 4, 1, 4))
  runs = {}
  for label, data, fsdp, expert in meshes:
    mesh = mesh_of(data, fsdp, expert, jax.devices()[:data * fsdp * expert])
    graphdef, state, shardings = create_train_state(make_model, tx, 0, mesh)
    step = make_train_step(graphdef, tx, moe=MoEBalancing.from_config(t), mesh=mesh, state_shardings=shardings)
    placed = sharding.put_batch(batch, sharding.batch_sharding(mesh, ndim=3, batch_dim=1))
    state, out = step(state, placed)  # compile + warm-up
    jax.block_until_ready(out)
    runs[label] = {"mesh": mesh, "step": step, "state": state, "batch": placed, "times": [],
                   "loss": float(out["loss"])}
  # Round-robin over the meshes, so that a change in background load hits them all alike.
  for _ in range(_STEPS.value):
    for run in runs.values():
      start = time.perf_counter()
      run["state"], out = run["step"](run["state"], run["batch"])
      jax.block_until_ready(out)
      run["times"].append(time.perf_counter() - start)
  return {label: {"mesh": sharding.describe(run["mesh"]), "step_time_s": statistics.median(run["times"]),
                  "first_step_loss": run["loss"]} for label, run in runs.items()}


def main(argv):
  del argv
  mem_cfg, step_cfg = _MEMORY_CONFIG.value, _STEP_CONFIG.value
  print(f"machine: {machine.describe()}")
  params = accounting.parameter_count(mem_cfg.model)["total"]
  mem = memory(mem_cfg)
  print(f"\nPer-device memory, {mem_cfg.name} ({params:,} parameters, float32; train state = params + AdamW moments):")
  print(f"  {'mesh':<22} {'params MB':>10} {'train state MB':>15}")
  for label, r in mem.items():
    print(f"  {label:<22} {r['params_bytes'] / 1e6:>10,.1f} {r['train_state_bytes'] / 1e6:>15,.1f}")

  steps = step_times(step_cfg)
  print(f"\nTrain step, {step_cfg.name} ({accounting.parameter_count(step_cfg.model)['total']:,} parameters), "
        f"batch {_BATCH.value} x {step_cfg.data.max_length}, median of {_STEPS.value} (fake CPU devices share "
        f"{os.cpu_count()} cores):")
  base = steps["1 device"]["step_time_s"]
  for label, r in steps.items():
    print(f"  {label:<22} {r['step_time_s'] * 1e3:>8.1f} ms/step  ({r['step_time_s'] / base:.2f}x one device; "
          f"first-step loss {r['first_step_loss']:.4f})")
  if _JSON.value:
    Path(_JSON.value).write_text(json.dumps({"machine": machine.describe(), "memory_config": mem_cfg.name,
                                             "memory": mem, "step_config": step_cfg.name,
                                             "batch_size": _BATCH.value, "step": steps}, indent=2) + "\n")


if __name__ == "__main__":
  run_main(main)
