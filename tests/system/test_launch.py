"""The launch scripts in dry-run mode: the commands they would run, with the trainer's arguments passed through
unchanged (a config file, --config.* overrides, and one with a space and a quote that must survive quoting)."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_ARGS = ["--config=configs/deepseek_mini.py", "--config.mesh.data=2", "--config.mesh.fsdp=-1",
              "--config.name=Bob's run"]


def dry_run(script, *args, **env):
  environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  environ.update(DRY_RUN="1", **env)
  proc = subprocess.run(["bash", str(REPO / "launch" / script), *args], cwd=REPO, env=environ, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def trainer_args(argv, marker="superlm_jax.train"):
  """The arguments after `python -m superlm_jax.train`."""
  return argv[argv.index(marker) + 1:]


def test_gpu_local():
  [argv] = dry_run("gpu_local.sh", *TRAIN_ARGS, GPUS="0,1")
  assert argv[:3] == ["env", "CUDA_VISIBLE_DEVICES=0,1", "python3"]
  assert trainer_args(argv) == TRAIN_ARGS  # one process: no --distributed
  # --dry_run as the first argument works the same without DRY_RUN in the environment.
  proc = subprocess.run(["bash", "launch/gpu_local.sh", "--dry_run", "--config=x.py"], cwd=REPO, capture_output=True,
                        text=True, env={k: v for k, v in os.environ.items() if k != "DRY_RUN"}, timeout=60)
  assert shlex.split(proc.stdout)[-2:] == ["superlm_jax.train", "--config=x.py"]


@pytest.mark.parametrize("per,tasks,local_ids", [("gpu", "8", None), ("node", "1", "0,1,2,3,4,5,6,7")])
def test_gpu_slurm(per, tasks, local_ids):
  [argv] = dry_run("gpu_slurm.sbatch", *TRAIN_ARGS, PER=per, SLURM_JOB_NODELIST="gpu[007-008,012],login1",
                   SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="8")
  env = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv[1:argv.index("srun")]}
  assert env["JAX_COORDINATOR_ADDRESS"] == f"gpu007:{61440 + 4242 % 4096}"  # the first node of the allocation
  assert env.get("JAX_LOCAL_DEVICE_IDS") == local_ids
  assert "--nodes=3" in argv and f"--ntasks-per-node={tasks}" in argv
  assert trainer_args(argv) == ["--distributed", *TRAIN_ARGS]


def test_gpu_slurm_outside_a_job_says_so():
  environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  proc = subprocess.run(["bash", "launch/gpu_slurm.sbatch", "--dry_run"], cwd=REPO, env=environ, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode != 0 and "not inside a SLURM job" in proc.stderr


def test_tpu_vm():
  env = dict(TPU_NAME="pod", ZONE="europe-west4-b", ACCELERATOR_TYPE="v5p-64", RUNTIME_VERSION="v2-alpha-tpuv5",
             PROJECT="proj")
  [create] = dry_run("tpu_vm.sh", "create", **env)
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=europe-west4-b", "--project=proj",
                    "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5"]

  [train] = dry_run("tpu_vm.sh", "train", *TRAIN_ARGS, **env)
  assert train[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in train
  [remote] = [a[len("--command="):] for a in train if a.startswith("--command=")]
  remote = shlex.split(remote)  # what each worker's shell runs
  assert remote[:3] == ["cd", "superlm_jax", "&&"]
  assert trainer_args(remote) == ["--distributed", *TRAIN_ARGS]

  archive, scp, install = dry_run("tpu_vm.sh", "setup", **env)
  assert "git ls-files" in " ".join(archive)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert "--worker=all" in install and any("pip install" in a and "jax[tpu]" in a for a in install)

  [ssh] = dry_run("tpu_vm.sh", "ssh", "ls /dev/accel*", **env)
  assert "--command=ls /dev/accel*" in ssh and "--worker=all" in ssh
