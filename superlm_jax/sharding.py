"""Devices as a mesh, and the one table that says which mesh axes each logical axis is split over.

The mesh has four named axes, sized by the `mesh` section of the config (superlm_jax/config.py):
  data    replicas of the whole model, each seeing different batch rows;
  fsdp    the same, but parameters and optimizer state are split too (ZeRO-3 / FSDP): each device stores 1/fsdp
          of them and XLA all-gathers a layer's weights when it runs and reduce-scatters its gradients;
  expert  MoE routed experts split over devices (expert parallelism); the batch is split here as well, so these
          devices are data-parallel everywhere outside the experts;
  tensor  heads, feed-forward/expert hidden widths and the vocabulary split over devices (Megatron-style); the
          batch is not split here: these devices compute one set of rows together.
Layers never name mesh axes: every parameter carries logical axis names (`layers/initializers.param`), and
`RULES` below maps them. A dimension that a mesh axis does not divide stays whole (e.g. one KV head under tensor
parallelism, a vocabulary of 97 rows), so every config runs on every mesh; the batch is the exception and must
divide (`check_fits`).

On one device the mesh has one device and `mesh_axes` is None: the single-device program, unchanged.

Several processes (hosts of a TPU slice, SLURM tasks, or processes on one machine: `initialize_distributed`) form
one mesh over all their devices. Each process reads only its rows of every batch (data/pipeline.py gives each a
disjoint shard) and `put_batch` assembles the global batch from them; parameters and optimizer state are created
in their shards (training/step.py), and a checkpoint is one directory to which every process writes its own shards
(Orbax's save is a collective: every process must save the same step). A stop signal may reach one process only
(one preempted VM): `training.preemption.agreed_stop` ORs the flags of all processes with one small all-gather
every train.log_every steps, at the same step numbers on every process, so all of them save that same step and
exit together (tests/sharding/test_multiprocess.py: SIGTERM to process 0 of 2).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from superlm_jax.config import MESH_AXES
from superlm_jax.errors import UserError
from superlm_jax.layers.partitioning import MeshAxes
from superlm_jax.models.spec import ModelSpec, model_spec

# Logical axis -> the mesh axes it may be split over, outer first. Every logical name a layer uses must be here
# (an unknown name is a bug: `logical_to_spec` raises), including those that are never split.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Activations: rows of the batch. Not over `tensor`, whose devices share their rows.
    ("batch", ("data", "fsdp", "expert")),
    # Parameters.
    ("embed", ("fsdp",)),  # d_model: the dimension every matrix has, so FSDP splits all of them.
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),  # Dense FFN and expert hidden widths.
    ("experts", ("expert",)),
    # MLA's latent widths: every head reads the whole latent, so never over `tensor`; but FSDP gathers a weight
    # whole before use anyway, so the up-projections [latent, heads, head_dim] split there too.
    ("q_lora", ("fsdp",)),
    ("kv_lora", ("fsdp",)),
    # Never split: per-head width (heads already are) and the learned-position rows (their embed dim is).
    ("head_dim", ()),
    ("position", ()),
    # The leading axis of the scan layout's stacked block parameters (model.scan_layers): each scan iteration
    # reads one layer's slice, so splitting it would move whole layers between devices every step.
    ("layers", ()),
)
_RULES = dict(RULES)


# ------------------------------------------------------------------------------------------------ the mesh


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, device_count: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, expert, tensor) with -1 resolved; a one-line UserError naming the key otherwise."""
  sizes = [int(mesh_cfg[axis]) for axis in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if size != -1 and size < 1:
      raise UserError(f"mesh.{axis}={size} must be a positive size or -1 (the rest of the devices)")
  rest = [i for i, size in enumerate(sizes) if size == -1]
  if len(rest) > 1:
    raise UserError("only one mesh axis may be -1 (the rest of the devices), got "
                    + " and ".join(f"mesh.{MESH_AXES[i]}" for i in rest))
  fixed = math.prod(size for size in sizes if size != -1)
  if rest:
    if device_count % fixed:
      raise UserError(f"mesh.{MESH_AXES[rest[0]]}=-1: the other mesh axes take {fixed} devices, which does not "
                      f"divide the {device_count} devices")
    sizes[rest[0]] = device_count // fixed
  if math.prod(sizes) != device_count:
    product = " x ".join(f"mesh.{axis}={size}" for axis, size in zip(MESH_AXES, sizes))
    raise UserError(f"{product} = {math.prod(sizes)} devices, but there are {device_count}: the sizes must "
                    "multiply to the device count (set one of them to -1 for the rest)")
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh over `devices` (default: all devices of all processes) with the configured axis sizes.

  jax.make_mesh orders devices by the physical topology, so the innermost axes (tensor, then expert) get the
  best-connected devices: tensor parallelism talks every layer, data parallelism once per step. Axes are
  Auto: XLA propagates shardings from the annotated inputs, outputs and constraints.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def describe(mesh: Mesh | jax.sharding.AbstractMesh) -> str:
  """'8 devices: data=2 x expert=4' (axes of size 1 left out)."""
  split = [f"{axis}={size}" for axis, size in mesh.shape.items() if size > 1]
  return f"{mesh.size} device{'s' if mesh.size > 1 else ''}" + (f": {' x '.join(split)}" if split else "")


# ------------------------------------------------------------------------------------------------ the rules


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
  """The PartitionSpec of an array whose dimensions have logical `names`, under `RULES`.

  Mesh axes of size 1 are left out (they split nothing); so is a mesh axis already used by an earlier
  dimension, or one that does not divide the dimension (it stays whole there: e.g. 1 KV head on 4 tensor devices).
  """
  if len(names) != len(shape):
    raise ValueError(f"axis names {tuple(names)} and shape {tuple(shape)} differ in rank")
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in _RULES:
      raise ValueError(f"logical axis {name!r} has no rule in superlm_jax.sharding.RULES")
    axes: list[str] = []
    for axis in _RULES[name]:
      n = mesh.shape[axis]
      if n > 1 and axis not in used and size % (math.prod(mesh.shape[a] for a in axes) * n) == 0:
        axes.append(axis)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*spec)


def _logical_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  names = variable.get_metadata().get("out_sharding")
  return None if names is None else tuple(getattr(names, "spec", names))


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """A NamedSharding for every array of a (train) state: Variables (parameters, their optimizer moments, which
  inherit the parameter's metadata, and MoE biases) by their logical axis names, everything else (step counts,
  the RNG key) replicated. Same tree structure as the state, so it serves as jit in/out shardings."""
  def leaf(x):
    if isinstance(x, nnx.Variable):
      names = _logical_names(x)
      spec = P() if names is None else logical_to_spec(names, x.shape, mesh)
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())
  return jax.tree.map(leaf, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract` placed on `shardings` (same structure): a restore target for Orbax."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes (of size > 1) that split batch rows."""
  return tuple(axis for axis in _RULES["batch"] if mesh.shape[axis] > 1)


def batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in batch_axes(mesh))


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
  """Rows (dimension `batch_dim`) split over the batch axes, the rest whole."""
  spec = [None] * ndim
  spec[batch_dim] = batch_axes(mesh) or None
  return NamedSharding(mesh, P(*spec))


def mesh_axes(mesh: Mesh, spec: ModelSpec | ml_collections.ConfigDict) -> MeshAxes | None:
  """What the model needs to know to run across `mesh` (see layers/partitioning.py); None on one device.
  The expert axes come from the same rules as the expert weights' shardings, so the two always agree."""
  if mesh.size == 1:
    return None
  spec = model_spec(spec)
  experts = expert_hidden = None
  if spec.n_routed_experts:
    expert_spec = logical_to_spec(("experts", "embed", "mlp"),
                                  (spec.n_routed_experts, spec.d_model, spec.expert_hidden), mesh)
    experts, expert_hidden = expert_spec[0], expert_spec[2]
  return MeshAxes(mesh=mesh, batch=batch_axes(mesh), experts=experts, expert_hidden=expert_hidden)


def check_fits(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """One-line UserErrors for a config that cannot run on `mesh` (the parameters always can: see the rules)."""
  shards = batch_shards(mesh)
  if config.train.batch_size % shards:
    split = " x ".join(f"mesh.{axis}={mesh.shape[axis]}" for axis in batch_axes(mesh))
    raise UserError(f"train.batch_size={config.train.batch_size} does not split over the {shards} batch shards "
                    f"({split}): make it a multiple of {shards}")
  experts, n = config.model.n_routed_experts, mesh.shape["expert"]
  if experts and experts % n:
    raise UserError(f"mesh.expert={n} does not divide model.n_routed_experts={experts}: every device must hold "
                    "the same number of experts")


# ------------------------------------------------------------------------------------------------ data


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays split as `sharding` says.

  Each process passes only the rows its data pipeline read (superlm_jax/data/pipeline.py gives every process a
  disjoint shard); they land on this process's devices. The global batch has process_count times the rows.
  Mesh axes that do not split the batch (tensor) must not span processes, which jax.make_mesh's topology order
  gives whenever tensor <= devices per host.
  """
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in batch.items()}


def put_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A batch that every process holds whole (e.g. the validation batches) -> global arrays split as `sharding`
  says: each device takes its slice of the same data."""
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value), np.shape(value))
          for key, value in batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ------------------------------------------------------------------------------------------------ multi-host


def distributed_requested(environ: Mapping[str, str], flag: bool | None = None) -> bool:
  """Whether this process is one of several that must form one JAX system (jax.distributed.initialize).

  `flag` (train's --distributed / --nodistributed) decides when given. Otherwise the environment does, and only
  a multi-process launch counts, so a plain single-host run never waits for a coordinator:
    JAX_COORDINATOR_ADDRESS              set by the user or a launcher (launch/gpu_slurm.sbatch does);
    SLURM_STEP_NUM_TASKS > 1             inside `srun` with several tasks (the batch script itself is one task);
    OMPI_COMM_WORLD_SIZE > 1             mpirun;
    TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES listing several hosts, or MEGASCALE_NUM_SLICES > 1 (GKE TPU
                                         pods, multislice). Cloud TPU VMs started with gcloud publish the
                                         workers only in instance metadata: launch/tpu_vm.sh passes --distributed.
  """
  if flag is not None:
    return bool(flag)

  def count(key: str) -> int:
    try:
      return int(environ.get(key, "1") or 1)
    except ValueError:
      return 1

  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  return bool(environ.get("JAX_COORDINATOR_ADDRESS") or count("SLURM_STEP_NUM_TASKS") > 1
              or count("OMPI_COMM_WORLD_SIZE") > 1 or len([h for h in hosts.split(",") if h]) > 1
              or count("MEGASCALE_NUM_SLICES") > 1)


def _env_int(environ: Mapping[str, str], key: str) -> int | None:
  """The integer environment variable `key`, None when unset; a one-line UserError when it is not an integer."""
  value = environ.get(key, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"{key}={value!r} must be an integer") from None


def initialize_distributed(flag: bool | None = None, environ: Mapping[str, str] | None = None) -> bool:
  """Calls jax.distributed.initialize() when `distributed_requested`. Must run before anything touches a device.
  Returns whether it did.

  JAX finds the coordinator, process count and id itself on Cloud TPU (metadata), under SLURM and Open MPI, and
  reads JAX_COORDINATOR_ADDRESS. Anywhere else (several processes on one machine, a launcher of one's own) set
  JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID, which JAX does not read: they are
  passed on here, and override what a cluster would report.
  """
  environ = os.environ if environ is None else environ
  if not distributed_requested(environ, flag):
    return False
  num_processes, process_id = _env_int(environ, "JAX_NUM_PROCESSES"), _env_int(environ, "JAX_PROCESS_ID")
  if (num_processes is None) != (process_id is None):
    raise UserError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither (then the cluster tells JAX)")
  if process_id is not None and not 0 <= process_id < num_processes:
    raise UserError(f"JAX_PROCESS_ID={process_id} must be in [0, JAX_NUM_PROCESSES={num_processes})")
  # Collectives between CPU processes (a CPU-only test of the multi-host path) need an implementation; gloo, over
  # TCP through the coordinator, is JAX's default since 0.10 but may have been unset. It only affects the CPU client.
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=environ.get("JAX_COORDINATOR_ADDRESS") or None,
                             num_processes=num_processes, process_id=process_id)
  print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local of "
        f"{jax.device_count()} devices")
  return True


def process_zero_first(fn: Callable[[], Any], name: str) -> Any:
  """Runs `fn` on process 0, then on the others once it has finished (e.g. preparing data in a directory that
  all hosts share: the others then find it done; on hosts with their own disks each prepares its copy)."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # Multi-process runs only.

  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"superlm_jax:{name}")
  return result if jax.process_index() == 0 else fn()
