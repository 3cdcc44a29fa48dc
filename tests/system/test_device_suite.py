"""The GPU suite (benchmarks/device_suite.py) at its smoke sizes on CPU, so that it cannot rot while no GPU is at hand:
every part runs its real code path (the kernel in the Pallas interpreter) and the JSON holds every section. No
figure is judged: CPU timings say nothing about the GPU targets.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.device_suite import PART_BUDGETS_S, TARGETS

REPO = Path(__file__).resolve().parents[2]


def environment() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # one CPU device, as on the GPU machine (conftest asks for 8 fake ones)
  return env


def test_smoke_run_writes_every_section(tmp_path):
  out = tmp_path / "device.json"
  proc = subprocess.run([sys.executable, "benchmarks/device_suite.py", "--smoke", f"--out={out}"], cwd=REPO,
                        env=environment(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert "part " in proc.stdout and f"wrote {out}" in proc.stdout  # the table, then where the JSON went
  report = json.loads(out.read_text())
  assert report["smoke"] and report["targets"] == TARGETS
  machine = report["machine"]
  assert machine["device"]["backend"] == "cpu" and machine["packages"]["jax"] and "nvidia_smi" in machine
  assert machine["copy_bandwidth"]["bytes_per_s"] > 0 and machine["bf16_matmul"]["flops_per_s"] > 0
  assert list(report["parts"]) == list(PART_BUDGETS_S)
  for name, part in report["parts"].items():
    assert part["status"] == "ok", (name, part.get("error"), part.get("log_tail", "")[-2000:])
    assert part["rows"] and part["wall_s"] > 0, name
    assert all(row["met"] is None for row in part["rows"]), name  # targets are judged on a GPU only

  tests = report["parts"]["kernel_tests"]["figures"]
  assert tests["counts"]["passed"] >= 1 and tests["counts"]["failed"] == 0 and not tests["native"]

  kernel = report["parts"]["kernel"]["figures"]
  equality = {v["dtype"]: v for k, v in kernel.items() if k.startswith("equality_")}
  assert set(equality) == {"float32", "bfloat16"} and all(v["passed"] for v in equality.values())
  [bandwidth] = [v for k, v in kernel.items() if k.startswith("bandwidth_")]
  assert bandwidth["plan"]["interpret"] and bandwidth["speedup_vs_xla"] > 0
  for path in ("kernel", "xla"):
    assert bandwidth[path]["bytes_per_s"] > 0 and bandwidth[path]["fraction_of_peak"] > 0

  grouped = report["parts"]["grouped_matmul"]
  ragged = [v for k, v in grouped["figures"].items() if k.startswith("lax_ragged_dot_")]
  assert len(ragged) == 2 and all(v["fraction_of_dense"] > 0 and v["relative_error_sampled_rows"] < 2e-2
                                  for v in ragged)

  decode = report["parts"]["decode"]["figures"]
  assert {k.rsplit("_batch", 1)[0] for k in decode} == {"minideepseek", "deepseek_v3_sixteenth"}
  for row in decode.values():
    assert row["xla"]["tokens_per_s"] > 0 and row["pallas"]["tokens_per_s"] > 0 and row["tokens_match"] == 1.0

  train = report["parts"]["train_step"]["figures"]
  assert train["step"]["tokens_per_s"] > 0 and train["step"]["mfu"] > 0
  assert set(train["options"]) == {"model.attention_impl", "model.scan_layers", "train.remat", "train.loss_chunk_size"}


def test_shell_wrapper_parses_its_arguments(tmp_path):
  """--dry-run prints the install plan and the suite's command (with --out made absolute) and runs nothing."""
  env = dict(environment(), PYTHON=sys.executable)
  script = str(REPO / "benchmarks" / "device_suite.sh")
  proc = subprocess.run(["bash", script, "--dry-run", "--smoke", "--total-s=300", "--out", "sub/device.json"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  [command] = [line for line in proc.stdout.splitlines() if line.startswith("+ timeout")]
  assert f"benchmarks/device_suite.py --out {tmp_path / 'sub' / 'device.json'} --budget_s" in command
  assert command.endswith("--smoke") and not (tmp_path / "sub").exists()
  for bad in (["--out"], ["--bogus", "--out", "x.json"], [], ["--out", "x.json", "--total-s", "soon"]):
    proc = subprocess.run(["bash", script, *bad], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr, bad
