"""The benchmark scripts run end to end on tiny configs and write what they promise.

Smoke tests only: timings on a shared CI machine say nothing, so no timing or speed-up is ever asserted, only that
every figure is there and positive.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # One CPU device, as a user runs the benchmarks.
  return subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)


def test_decode_benchmark_writes_json_and_figure(tmp_path):
  proc = run_script("benchmarks/decode.py", "--config=configs/minideepseek.py:tiny", "--prompt_lengths=8,16",
                    "--new_tokens=4", "--repeats=1", f"--out_dir={tmp_path}")
  assert proc.returncode == 0, proc.stderr
  assert "machine:" in proc.stdout and "weight-bandwidth floor" in proc.stdout
  report = json.loads((tmp_path / "decode.json").read_text())
  assert set(report["results"]) == {"no_cache", "cache_expanded", "cache_absorbed"}
  for method, by_length in report["results"].items():
    assert set(by_length) == {"8", "16"}, method
    for length, r in by_length.items():
      for key in ("total_s", "first_token_s", "per_token_s"):
        assert r[key] > 0, (method, length, key)
      assert len(r["step_times_s"]) == 4 and all(t > 0 for t in r["step_times_s"]), (method, length)
      assert len(r["runs"]) == 1
  assert set(report["ratios"]["16"]) == {"cache_expanded/no_cache", "cache_absorbed/no_cache",
                                         "cache_absorbed/cache_expanded"}
  assert report["memory_bandwidth"]["bytes_per_s"] > 0 and report["weight_floor_s"] > 0
  assert report["kv_cache_bytes_per_token"]["mla"] < report["kv_cache_bytes_per_token"]["mha"]
  assert (tmp_path / "decode.png").stat().st_size > 0


def test_train_throughput_benchmark_writes_json(tmp_path):
  out = tmp_path / "t.json"
  proc = run_script("benchmarks/train_throughput.py", "--config=configs/gpt2_small.py:tiny", "--steps=1",
                    "--repeats=1", "--config.model.num_layers=1", f"--json={out}")
  assert proc.returncode == 0, proc.stderr
  assert "machine:" in proc.stdout
  result = json.loads(out.read_text())
  assert result["tokens_per_s"] > 0 and result["step_time_s"] > 0


def test_mla_decode_kernel_benchmark_writes_json(tmp_path):
  out = tmp_path / "k.json"
  proc = run_script("benchmarks/mla_decode_kernel.py", "--batch=2", "--cache_lengths=100", "--heads=2",
                    "--repeats=1", f"--out={out}")
  assert proc.returncode == 0, proc.stderr
  assert "machine:" in proc.stdout and "INTERPRETER" in proc.stdout
  report = json.loads(out.read_text())
  assert report["kernel_mode"] == "interpret" and report["peak_bytes_per_s"] > 0
  [row] = report["results"]
  assert (row["batch"], row["cache_len"], row["heads"]) == (2, 100, 2) and row["bytes"] > 0
  assert row["max_abs_diff"] < 0.05  # bf16 kernel vs the XLA einsums
  for name in ("kernel", "xla"):
    assert row[name]["median_s"] > 0 and row[name]["bytes_per_s"] > 0 and row[name]["fraction_of_peak"] > 0


def test_sharding_benchmark_writes_json(tmp_path):
  out = tmp_path / "s.json"
  proc = run_script("benchmarks/sharding.py", "--devices=4", "--step_config=configs/gpt2_small.py:tiny",
                    "--step_config.model.num_layers=1", "--step_config.data.max_length=16", "--batch_size=4",
                    "--steps=1", f"--json={out}")
  assert proc.returncode == 0, proc.stderr
  assert "machine:" in proc.stdout
  result = json.loads(out.read_text())
  memory = result["memory"]
  assert memory["1 device"]["params_bytes"] > memory["2 data x 4 expert"]["params_bytes"] > \
      memory["8 fsdp"]["params_bytes"] > 0
  assert set(result["step"]) == {"1 device", "4 data", "1 data x 4 fsdp"}
  assert all(r["step_time_s"] > 0 for r in result["step"].values())
