"""benchmarks/memory.py compiles the real train step and prefill from abstract shapes and writes every figure.

A smoke test: no figure is compared with a target, only checked present and positive (generated-code and aliased
bytes may be zero: XLA:CPU reports no generated code).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_memory_benchmark_writes_json(tmp_path):
  out = tmp_path / "m.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # One CPU device, as a user runs the benchmarks.
  proc = subprocess.run(
      [sys.executable, "benchmarks/memory.py", "--config=configs/gpt2_small.py:tiny", "--config.model.num_layers=1",
       "--config.train.grad_accum_steps=2", "--batch=2", "--seq=16", "--cache_len=32", f"--json={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "machine:" in proc.stdout and "train step" in proc.stdout and "prefill" in proc.stdout
  result = json.loads(out.read_text())
  assert result["batch"] == [2, 2, 16] and result["compute_dtype"] == "float32" and result["parameters"] > 0
  assert isinstance(result["memory_keys"], dict) and result["machine"]
  for program in ("train_step", "prefill"):
    r = result[program]
    for key in ("trace_lower_s", "compile_s", "temp_bytes", "argument_bytes", "output_bytes", "peak_estimate_bytes"):
      assert r[key] > 0, (program, key)
    for key in ("alias_bytes", "generated_code_bytes"):
      assert r[key] >= 0, (program, key)
  step = result["train_step"]
  # The donated state comes back in place, and the arguments hold at least the parameters and both AdamW moments.
  assert step["alias_bytes"] > 0 and step["argument_bytes"] >= step["state_bytes"] >= 3 * step["params_bytes"]
  assert result["prefill"]["cache_len"] == 32 and result["prefill"]["cache_bytes"] > 0
  assert result["host_peak_rss_bytes"] > 0
