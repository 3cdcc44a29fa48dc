"""Helper processes for tests/sharding/test_multiprocess.py (the training itself runs through the real CLI).

  python tests/sharding/multiprocess_worker.py weights OUT.npz RUN_DIR:STEP [RUN_DIR:STEP ...]
      Restores the weights of each checkpoint in this one process, whatever mesh and process count saved it (the
      path `python -m superlm_jax.sample` takes), and writes them to OUT.npz as "<i>/<path>" -> array.
  python tests/sharding/multiprocess_worker.py probe ADDRESS NUM_PROCESSES PROCESS_ID
      The smallest multi-process JAX program, on JAX's API alone: when the training fails, the test runs this to
      tell an environment that cannot run several JAX processes (skip, with this error) from a bug (fail).
"""

from __future__ import annotations

import sys

import numpy as np


def weights(out: str, checkpoints: list[str]) -> None:
  import jax
  from flax import nnx

  from superlm_jax.generate.restore import load_model

  arrays = {}
  for i, checkpoint in enumerate(checkpoints):
    run_dir, _, step = checkpoint.rpartition(":")
    model, _, restored_step = load_model(run_dir, step=int(step))
    assert restored_step == int(step), (restored_step, step)
    for path, value in jax.tree_util.tree_flatten_with_path(nnx.state(model).to_pure_dict())[0]:
      arrays[f"{i}/{jax.tree_util.keystr(path)}"] = np.asarray(value)
  np.savez(out, **arrays)
  print(f"{len(checkpoints)} checkpoints restored on {jax.process_count()} process, {jax.device_count()} device(s)")


def probe(address: str, num_processes: int, process_id: int) -> None:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id)
  mesh = jax.make_mesh((jax.device_count(),), ("x",))
  rows = np.full((jax.local_device_count(),), process_id + 1, np.float32)
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(
      jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), rows))
  expected = jax.local_device_count() * num_processes * (num_processes + 1) / 2
  assert float(total) == expected, (float(total), expected)
  print(f"probe ok: process {process_id} of {num_processes}")


if __name__ == "__main__":
  command, *args = sys.argv[1:]
  if command == "weights":
    weights(args[0], args[1:])
  elif command == "probe":
    probe(args[0], int(args[1]), int(args[2]))
  else:
    raise SystemExit(f"unknown command {command!r}: weights | probe")
