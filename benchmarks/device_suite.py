"""One command that proves the GPU path in eight minutes: one table, one JSON.

  bash benchmarks/device_suite.sh --out $OUT/device.json        # on the lent GPU: installs carried wheels, then this
  python benchmarks/device_suite.py --out PATH [--smoke] [--budget_s=440] [--parts=kernel,decode]

Parts, in order (each with its own wall-clock budget, PART_BUDGETS_S):
  machine         the device, JAX and driver versions, measured copy bandwidth and bf16 matmul rate (the ceilings)
  kernel_tests    tests/kernels/test_mla_decode.py, where the GPU plans compile natively instead of interpreting
  kernel          the MLA decode kernel equals the XLA path (f32, bf16); its GB/s at DeepSeek-V3 decode shapes
  grouped_matmul  jax.lax.ragged_dot and tokamax.ragged_dot against a dense matmul of equal FLOPs
  decode          decode tokens/s of minideepseek:small and a 1/16-width DeepSeek-V3, XLA path vs kernel
  train_step      a bf16 train step of the 342M llama_dense:350m at 8 x 2048: tokens/s, MFU, peak memory

Why a process per part: a part that fails, runs out of memory or hangs in a compiler is killed at its budget and
records its error (and what it measured before), and the next part still runs; every part gets the device's memory
to itself, so its peak_bytes_in_use is its own. This process never initialises JAX's backend: on a GPU that would
preallocate most of the memory the parts need. The JSON is rewritten after every part, so even a kill of the whole
suite leaves the parts already done.

--smoke runs the same code paths at tiny sizes (on CPU the kernel runs in the Pallas interpreter) in well under a
minute; tests/system/test_device_suite.py runs it so that the suite cannot rot while no GPU is at hand.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# At most this many seconds per part on the GPU, and never more than the suite has left (the shell wrapper gives it
# 8 minutes less the install): the first five take 295 at most, the train step (compiling 24 layers) what remains.
PART_BUDGETS_S = {"machine": 35, "kernel_tests": 70, "kernel": 60, "grouped_matmul": 50, "decode": 80,
                  "train_step": 200}
SUITE_BUDGET_S = 440  # 8 minutes less the wrapper's install, this process's start and its last write
SMOKE_BUDGETS_S = {"machine": 20, "kernel_tests": 40, "kernel": 40, "grouped_matmul": 20, "decode": 40,
                   "train_step": 30}
TARGETS = {  # the acceptance figures, judged on a GPU only
    "mla_kernel_fraction_of_peak_bandwidth_batch64": 0.85,
    "mla_kernel_speedup_vs_xla_batch64": 1.5,
    "train_mfu": 0.5,
    "grouped_matmul_fraction_of_dense": 0.8,
}
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt", "flax",
            "optax", "numpy", "ml-collections", "grain", "tensorboardX", "tokamax", "qwix", "pydantic", "triton")
LOG_TAIL_CHARS = 6000


def package_versions() -> dict[str, str | None]:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def nvidia_smi() -> dict | None:
  """Driver, CUDA and GPU facts from nvidia-smi (None where there is none): no JAX, no device memory."""
  fields = "name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit,temperature.gpu"
  try:
    query = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
    banner = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.TimeoutExpired) as e:
    return None if isinstance(e, FileNotFoundError) else {"error": repr(e)}
  gpus = [dict(zip(fields.split(","), (v.strip() for v in line.split(","))))
          for line in query.stdout.splitlines() if line.strip()]
  cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner)
  return {"gpus": gpus, "cuda_version": cuda.group(1) if cuda else None, "returncode": query.returncode}


# --smoke: its timings mean nothing, so XLA may skip its slow optimisation passes (a sixth off a CPU smoke run).
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def part_environment(smoke: bool) -> dict[str, str]:
  env = dict(os.environ)
  if smoke:
    env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS"), SMOKE_XLA_FLAGS) if f)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  env["PYTHONUNBUFFERED"] = "1"
  env["PYTHONDONTWRITEBYTECODE"] = "1"  # write nothing into the checkout
  # The 342M train step at 8 x 2048 may want more than JAX's default 75% of the GPU before memory-efficient
  # attention; each part has the device to itself.
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  return env


def run_part_process(name: str, budget_s: float, smoke: bool, workdir: Path) -> dict:
  """Runs `--part name` in a fresh process (its own session, killed as a group at the budget), echoing its output
  line by line; returns the part's record with status ok | error | timeout | crashed."""
  record_path = workdir / f"{name}.json"
  deadline = time.time() + budget_s - 3  # the part stops starting new figures a little before the kill
  command = [sys.executable, str(Path(__file__).resolve()), f"--part={name}", f"--part_out={record_path}",
             f"--deadline={deadline}"] + (["--smoke"] if smoke else [])
  start = time.time()
  process = subprocess.Popen(command, cwd=REPO, env=part_environment(smoke), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
  tail: list[str] = []

  def echo():
    for line in process.stdout:
      print(f"[{name}] {line}", end="", flush=True)
      tail.append(line)
      if len(tail) > 400:
        del tail[:200]
  reader = threading.Thread(target=echo, daemon=True)
  reader.start()
  timed_out = False
  try:
    process.wait(timeout=budget_s)
  except subprocess.TimeoutExpired:
    timed_out = True
    os.killpg(process.pid, signal.SIGKILL)  # the part's own process group: a hung compiler goes with it
    process.wait()
  reader.join(timeout=5)
  try:
    record = json.loads(record_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    record = {"figures": {}, "errors": {}, "rows": [], "error": f"no record from the part: {e!r}"}
  if timed_out:
    record["status"] = "timeout"
    record["error"] = f"killed at its budget of {budget_s:.0f} s" + (f"; {record['error']}" if record.get("error")
                                                                       else "")
  elif process.returncode != 0 and record.get("status") != "error":
    record["status"] = "crashed"
    record["error"] = f"exit code {process.returncode}" + (f"; {record['error']}" if record.get("error") else "")
  record.update(wall_s=time.time() - start, budget_s=budget_s, exit_code=process.returncode,
                log_tail="".join(tail)[-LOG_TAIL_CHARS:])
  return record


def print_table(report: dict) -> None:
  rows = [("part", "figure", "value", "target", "met")]
  for name, part in report["parts"].items():
    if part.get("status") not in ("ok", None):
      first_line = (part.get("error") or "").strip().splitlines()[:1]
      rows.append((name, f"PART {part['status'].upper()}", first_line[0][:110] if first_line else "", "", ""))
    for row in part.get("rows", []):
      met = {True: "yes", False: "NO", None: ""}[row["met"]]
      rows.append((name, row["figure"], row["value"], row["target"], met))
    for key, error in part.get("errors", {}).items():
      rows.append((name, f"{key}: not measured", error.splitlines()[0][:110], "", ""))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  widths[1] = min(widths[1], 80)
  print()
  for i, row in enumerate(rows):
    print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if i == 0:
      print("  ".join("-" * w for w in widths))
  device = report["machine"].get("device") or {}
  print(f"\n{device.get('device_kind', '?')} ({device.get('backend', '?')}), JAX {device.get('jax', '?')}; "
        f"{report['wall_s']:.0f} s in all; wrote {report['out']}")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=False, help="the JSON to write (its folder is created)")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes: the same code paths in under a minute")
  parser.add_argument("--budget_s", type=float, default=None,
                      help=f"wall-clock seconds for all parts together (default: theirs, at most {SUITE_BUDGET_S})")
  parser.add_argument("--parts", default=",".join(PART_BUDGETS_S), help="comma-separated parts to run")
  parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
  parser.add_argument("--part_out", help=argparse.SUPPRESS)
  parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.part:
    from benchmarks.device_parts import run_part
    return run_part(args.part, args.part_out, args.deadline, args.smoke)
  if not args.out:
    parser.error("--out is required")
  names = [p for p in args.parts.split(",") if p]
  unknown = sorted(set(names) - set(PART_BUDGETS_S))
  if unknown:
    parser.error(f"unknown parts {unknown}; choose from {list(PART_BUDGETS_S)}")
  budgets = SMOKE_BUDGETS_S if args.smoke else PART_BUDGETS_S
  total_budget = args.budget_s or min(sum(budgets[n] for n in names), SUITE_BUDGET_S)

  start = time.time()
  out = Path(args.out).resolve()
  out.parent.mkdir(parents=True, exist_ok=True)
  report = {
      "suite": "superlm_jax device suite (benchmarks/device_suite.py)", "smoke": args.smoke,
      "command": sys.argv, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
      "budget_s": total_budget, "targets": TARGETS, "out": str(out),
      "machine": {"hostname": platform.node(), "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                  "packages": package_versions(), "nvidia_smi": nvidia_smi(),
                  "environment": {k: os.environ.get(k) for k in ("JAX_PLATFORMS", "XLA_FLAGS",
                                                                 "XLA_PYTHON_CLIENT_MEM_FRACTION")}},
      "parts": {},
  }

  def save():
    report["wall_s"] = time.time() - start
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")

  save()
  with tempfile.TemporaryDirectory(prefix="device_suite_") as workdir:
    for name in names:
      left = total_budget - (time.time() - start)
      budget = min(budgets[name], left)
      print(f"== {name} (budget {budget:.0f} s, {left:.0f} s left of {total_budget:.0f})", flush=True)
      if budget < 10:
        report["parts"][name] = {"status": "skipped", "error": f"only {left:.0f} s of the suite's budget left",
                                 "rows": [], "errors": {}}
      else:
        report["parts"][name] = run_part_process(name, budget, args.smoke, Path(workdir))
      part = report["parts"][name]
      for key in ("describe", "copy_bandwidth", "bf16_matmul", "datasheet"):  # the machine's own figures
        if name == "machine" and key in part.get("figures", {}):
          report["machine"][key] = part["figures"][key]
      if part.get("device") and "device" not in report["machine"]:
        report["machine"]["device"] = part["device"]
      save()
  print_table(report)
  save()
  return 0 if all(p.get("status") == "ok" for p in report["parts"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
