"""Tests of metrics logging, throughput and MFU (superlm_jax/training/metrics.py)."""

import json
import math
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2  # To read the event files back (tensorboard is not installed).

from superlm_jax.training import metrics as metrics_lib


def read_scalars(tb_dir):
  """{tag: [(step, value)]} from every TensorBoard event file under tb_dir."""
  out = {}
  for path in sorted(tb_dir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):  # TFRecord framing: length (8), crc (4), payload, crc (4).
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        if v.HasField("simple_value"):
          out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
  logger = metrics_lib.MetricsLogger(tmp_path)
  logger.write(10, {"loss": jnp.float32(2.5), "lr": 3e-4, "grad_norm": float("nan")})
  logger.write(20, {"loss": np.float32(2.25), "inf": float("inf")}, prefix="val")
  logger.write_text(20, "sample", "ROMEO. hello")
  logger.close()
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert records == [{"step": 10, "split": "train", "loss": 2.5, "lr": 3e-4, "grad_norm": None},
                     {"step": 20, "split": "val", "loss": 2.25, "inf": None}]
  scalars = read_scalars(tmp_path / "tb")
  assert scalars["train/loss"] == [(10, 2.5)] and scalars["val/loss"] == [(20, 2.25)]
  assert math.isnan(scalars["train/grad_norm"][0][1])


def test_logger_purge_on_resume(tmp_path):
  logger = metrics_lib.MetricsLogger(tmp_path)
  for step in (10, 20, 30):
    logger.write(step, {"loss": 1.0})
  logger.close()
  logger = metrics_lib.MetricsLogger(tmp_path, purge_step=20)  # Resumed from a checkpoint at step 20.
  logger.write(20, {"loss": 0.5})
  logger.close()
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in records] == [(10, 1.0), (20, 0.5)]


def test_disabled_logger_writes_nothing(tmp_path):
  logger = metrics_lib.MetricsLogger(tmp_path / "run", enabled=False)
  logger.write(1, {"loss": 1.0})
  logger.write_text(1, "t", "x")
  logger.close()
  assert not (tmp_path / "run").exists()


def test_peak_flops_on_cpu_is_measured_and_cached():
  flops, source = metrics_lib.peak_flops_per_device()
  assert "measured f32 matmul" in source
  assert 1e8 < flops < 1e14  # Anything from a slow core to a big server.
  assert metrics_lib.peak_flops_per_device() == (flops, source)  # Cached: the same object, no re-measure.


def test_peak_flops_table_order():
  """More specific names must precede their prefixes ('TPU v5 lite' is v5e, plain 'TPU v5' is v5p)."""
  def lookup(kind):
    return next(f for name, f, _ in metrics_lib._PEAK_BF16_FLOPS if name.lower() in kind.lower())
  assert lookup("TPU v5 lite") == 197e12 and lookup("TPU v5") == 459e12 and lookup("TPU v6 lite") == 918e12
  assert lookup("NVIDIA H100 PCIe") == 756e12 and lookup("NVIDIA H100 80GB HBM3") == 989e12
  assert lookup("NVIDIA H200") == 989e12 and lookup("NVIDIA A100-SXM4-40GB") == 312e12


def test_mfu():
  assert metrics_lib.mfu(1000.0, 6e6, 1e10) == pytest.approx(0.6)
  assert math.isnan(metrics_lib.mfu(1000.0, 6e6, 0.0))


def test_throughput_ignores_first_step():
  tp = metrics_lib.Throughput()
  assert math.isnan(tp.rate())
  tp.step(10_000_000)  # Compile step: only starts the clock.
  time.sleep(0.05)
  tp.step(100)
  tp.step(100)
  rate = tp.rate()
  assert 200 / 1.0 < rate < 200 / 0.05 * 1.01
  assert math.isnan(tp.rate())  # A new, empty window.


def test_format_for_console():
  text = metrics_lib.format_for_console(
      {"loss": jnp.float32(2.34567), "lr": 3e-4, "tokens_per_s": 1234.6, "mfu": 0.1234, "grad_norm": 0.98765})
  assert text == "loss=2.346 lr=3.0e-04 tok/s=1235 mfu=12.3% grad_norm=0.9877"
