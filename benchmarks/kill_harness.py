"""Kill harness: SIGKILL a tiny training run at random moments, mid-save included, restart it each time, and check
that it ends exactly where an uninterrupted run does.

  python benchmarks/kill_harness.py [--kills=20] [--seed=0] [--out=/tmp/kill_harness]

Checked after every kill and at the end (any failure is printed and the exit status is 1):
  - the latest committed checkpoint restores (a restart always finds a valid checkpoint; Orbax's tmp directories of
    a save cut short are left for the next run to remove);
  - every restart either resumes (or starts over, before the first checkpoint) or is killed again, never fails;
  - the final parameters, optimizer state and step are bit-identical to an uninterrupted run's, and so is every
    logged training loss;
  - metrics.jsonl records each step exactly once (1..steps, in order).

Kill moments cycle through: before the first checkpoint (step 2 logged, first checkpoint at 4), mid-save (during a
random one of the saves left: an Orbax `*.orbax-checkpoint-tmp*` directory exists) and a random moment of the
training phase. A run completed before its kill counts as finished; one killed KILLS_PER_RUN times is finished
without a kill; new runs start until `--kills` kills have landed. Every training step sleeps STEP_DELAY_S in the
data iterator (a wrapper around `python -m superlm_jax.train`, nothing in the library), so that the moments spread
over a second or two of training rather than a few milliseconds.

tests/training/test_kill_harness.py runs a 3-kill version of this in the default suite; tests/training/
test_preemption.py reuses the run helpers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS, CKPT_EVERY = 40, 4
STEP_DELAY_S = 0.02
# A ~26k-parameter GPT-2 on the bundled corpus, one CPU device, a record every step, the end-of-run evaluation only.
TINY_ARGS = (
    "--config=configs/gpt2_small.py:tiny", "--config.model.vocab_size=512", "--config.model.d_model=32",
    "--config.model.num_layers=1", "--config.model.d_ff=64", "--config.model.max_seq_len=32",
    "--config.data.max_length=32", "--config.train.batch_size=2", "--config.train.eval_batches=1",
    "--config.train.sample_every=0", "--config.train.log_every=1", "--config.train.eval_every=0",
    f"--config.train.steps={STEPS}", f"--config.train.ckpt_every={CKPT_EVERY}", "--config.train.keep_checkpoints=2",
    "--config.train.warmup_steps=4", "--config.train.peak_flops=1e12", "--quiet")

# `python -m superlm_jax.train` with a sleep before each training batch.
_SLOW_TRAIN = """
import time
from superlm_jax.data import pipeline
make_iterator = pipeline.make_train_iterator
class Slow:
  def __init__(self, it): self.it = it
  def __iter__(self): return self
  def __next__(self):
    time.sleep({delay})
    return next(self.it)
  def get_state(self): return self.it.get_state()
  def set_state(self, state): self.it.set_state(state)
pipeline.make_train_iterator = lambda *args, **kwargs: Slow(make_iterator(*args, **kwargs))
from superlm_jax.train import cli
cli()
"""


@functools.cache
def _compile_cache() -> str:
  # Shared by every process this harness starts: only the first compiles the step, the init and the evaluation.
  path = tempfile.mkdtemp(prefix="superlm_kill_harness_xla_")
  import atexit
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


def child_env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=_compile_cache(),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("XLA_FLAGS", None)  # One CPU device, as a user runs it.
  return env


def train_args(workdir: Path, data_dir: Path, *extra: str) -> list[str]:
  return [*TINY_ARGS, f"--config.data.dir={data_dir}", f"--config.train.workdir={workdir}", *extra]


def start(workdir: Path, data_dir: Path, *extra: str, delay: float = STEP_DELAY_S) -> subprocess.Popen:
  """Starts a slowed-down `superlm_jax.train` of the tiny run; stdout/stderr go to workdir/attempt-N.{out,err}."""
  workdir.mkdir(parents=True, exist_ok=True)
  attempt = len(list(workdir.glob("attempt-*.err")))
  out = open(workdir / f"attempt-{attempt}.out", "w")
  err = open(workdir / f"attempt-{attempt}.err", "w")
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_TRAIN.format(delay=delay), *train_args(workdir, data_dir,
                                                                                                *extra)],
                          cwd=REPO, env=child_env(), stdout=out, stderr=err)
  proc.out_path, proc.err_path = Path(out.name), Path(err.name)
  out.close(), err.close()
  return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
  """(return code, stdout, stderr) once `proc` has ended."""
  rc = proc.wait(timeout=timeout)
  return rc, proc.out_path.read_text(), proc.err_path.read_text()


def run(workdir: Path, data_dir: Path, *extra: str, delay: float = 0.0) -> tuple[int, str, str]:
  return finish(start(workdir, data_dir, *extra, delay=delay))


def train_steps(workdir: Path) -> list[int]:
  """The steps of the training records in metrics.jsonl, in file order (whole lines only)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  steps = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue  # A line being written.
    if record.get("split") == "train":
      steps.append(record["step"])
  return steps


def train_losses(workdir: Path) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
          if r["split"] == "train"}


def committed_steps(workdir: Path) -> list[int]:
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def saving(workdir: Path) -> bool:
  """Whether an Orbax save is under way (its temporary step directory exists)."""
  directory = workdir / "checkpoints"
  return directory.is_dir() and any(".orbax-checkpoint-tmp" in p.name for p in directory.iterdir())


def restore_all(workdir: Path, step: int | None = None) -> dict:
  """Everything a checkpoint holds (params, model_state, opt_state, step, rng) as numpy arrays, read without
  touching the directory (no tmp-directory clean-up: that is the next run's job)."""
  import jax
  import numpy as np

  from superlm_jax import checkpoint as ckpt_lib
  state, _ = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=100, create=False).restore(step)
  return jax.tree.map(np.asarray, state)


def bit_differences(a: dict, b: dict) -> list[str]:
  """Paths of the leaves where two restored states differ in structure, dtype or any bit ([] = identical)."""
  import jax
  import numpy as np

  flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  if flat_a.keys() != flat_b.keys():
    return ["structure"]
  return [jax.tree_util.keystr(path) for path, x in flat_a.items()
          if x.dtype != flat_b[path].dtype or x.tobytes() != flat_b[path].tobytes()]


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.005) -> bool:
  """Polls `condition()` until it holds (True) or `proc` ends or the timeout passes (False)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll)
  return False


@functools.cache
def reference(root: Path, data_dir: Path) -> tuple[Path, float]:
  """An uninterrupted run (it prepares the data the first time): its workdir and the seconds from its first record
  to its last (the training phase). Cached per process: the tests of several modules share it."""
  workdir = root / "reference"
  proc = start(workdir, data_dir)
  _wait_for(lambda: bool(train_steps(workdir)), proc, timeout=300)
  began = time.monotonic()
  _wait_for(lambda: STEPS in train_steps(workdir), proc, timeout=300)
  seconds = time.monotonic() - began
  rc, _, err = finish(proc)
  if rc != 0:
    raise RuntimeError(f"the uninterrupted run failed ({rc}):\n{err[-3000:]}")
  return workdir, seconds


@functools.cache
def shared_reference() -> tuple[Path, Path, float]:
  """(data dir, reference workdir, its training seconds) in a temporary root removed at exit: what the test modules
  of one pytest process share."""
  root = Path(tempfile.mkdtemp(prefix="superlm_kill_harness_"))
  import atexit
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  reference_dir, seconds = reference(root, root / "data")
  return root / "data", reference_dir, seconds


KILL_MODES = ("before-first-checkpoint", "mid-save", "random")
# Then the run is finished and a fresh one takes the next kills, so that they spread over whole runs (a run killed
# again and again ends up killed near its end, where little is left to train between restarts).
KILLS_PER_RUN = 5


def kill_once(workdir: Path, data_dir: Path, mode: str, rng: random.Random, train_seconds: float) -> dict:
  """Starts the run (resuming it), SIGKILLs it at a moment of `mode`; returns what happened."""
  resumed_from = (committed_steps(workdir) or [0])[-1]
  metrics_file = workdir / "metrics.jsonl"
  stale = metrics_file.stat().st_ino if metrics_file.exists() else None
  proc = start(workdir, data_dir)

  def logged_since_start(at_least: int) -> bool:
    # The restart rewrites metrics.jsonl (a new inode) before it trains: until then its records are the old ones.
    if not metrics_file.exists() or metrics_file.stat().st_ino == stale:
      return False
    return max(train_steps(workdir), default=0) >= at_least

  # Training has started once this attempt logs a step after the checkpoint it resumed from; until then the
  # directory may still hold the tmp directory of a save the previous kill cut short.
  started = _wait_for(lambda: logged_since_start(resumed_from + 1), proc)
  landed = False
  if mode == "before-first-checkpoint":
    landed = started and _wait_for(lambda: logged_since_start(2), proc)
  elif mode == "mid-save" and started:  # During one of the saves left, chosen at random.
    nth, seen = rng.randint(1, max(1, (STEPS - resumed_from) // CKPT_EVERY)), [0, False]

    def in_nth_save() -> bool:
      now = saving(workdir)
      seen[0] += now and not seen[1]  # A save starting.
      seen[1] = now
      return now and seen[0] >= nth
    landed = _wait_for(in_nth_save, proc)
  elif started:
    deadline = time.monotonic() + rng.uniform(0, (STEPS - resumed_from) / STEPS * train_seconds)
    landed = _wait_for(lambda: time.monotonic() >= deadline, proc)
  mid_save = saving(workdir)
  if landed:
    proc.send_signal(signal.SIGKILL)
  rc, out, err = finish(proc)
  return {"mode": mode, "killed": rc == -signal.SIGKILL, "rc": rc, "mid_save": landed and mid_save,
          "resumed_from": resumed_from, "last_logged": max(train_steps(workdir), default=0),
          "committed": committed_steps(workdir), "stderr_tail": err[-2000:]}


def check_restartable(workdir: Path, event: dict) -> list[str]:
  """Problems with the directory a kill left (a restart must find a valid checkpoint, if any was committed)."""
  problems = []
  if not event["killed"] and event["rc"] != 0:
    problems.append(f"a restart failed (exit {event['rc']}): {event['stderr_tail']}")
  steps = committed_steps(workdir)
  if steps:
    try:
      restore_all(workdir, steps[-1])
    except Exception as e:  # noqa: BLE001 (any failure to restore is the finding)
      problems.append(f"the latest checkpoint {steps[-1]} does not restore: {type(e).__name__}: {e}")
  return problems


def check_final(workdir: Path, reference_dir: Path) -> list[str]:
  problems = []
  steps = train_steps(workdir)
  if steps != list(range(1, STEPS + 1)):
    problems.append(f"metrics.jsonl train steps are not 1..{STEPS} once each: {steps}")
  if train_losses(workdir) != train_losses(reference_dir):
    problems.append("logged training losses differ from the uninterrupted run's")
  differences = bit_differences(restore_all(workdir, STEPS), restore_all(reference_dir, STEPS))
  if differences:
    problems.append(f"final state differs from the uninterrupted run's in {differences[:5]}")
  return problems


def harness(root: Path, data_dir: Path, kills: int, seed: int = 0,
            reference_run: tuple[Path, float] | None = None) -> dict:
  """Kills runs in `root` until `kills` kills have landed, finishing each run afterwards; returns the summary.
  `reference_run`: (workdir, training seconds) of an uninterrupted run on `data_dir` (default: made in `root`)."""
  rng = random.Random(seed)
  reference_dir, train_seconds = reference_run or reference(root, data_dir)
  events, problems, runs = [], [], 0
  landed = lambda: sum(e["killed"] for e in events)
  while landed() < kills:
    runs += 1
    workdir = root / f"run-{runs}"
    mode, first = KILL_MODES[0], len(events)  # A fresh run: the first kill comes before its first checkpoint.
    while landed() < kills and STEPS not in committed_steps(workdir) and len(events) - first < KILLS_PER_RUN:
      event = kill_once(workdir, data_dir, mode, rng, train_seconds)
      events.append(event)
      problems += check_restartable(workdir, event)
      mode = KILL_MODES[1 + (len(events) - first - 1) % 2]  # Then mid-save and random moments in turn.
    if STEPS not in committed_steps(workdir):
      rc, _, err = run(workdir, data_dir)
      if rc != 0:
        problems.append(f"the final restart failed (exit {rc}): {err[-2000:]}")
    problems += check_final(workdir, reference_dir)
  return {"kills": landed(), "mid_save_kills": sum(e["mid_save"] for e in events), "runs": runs, "events": events,
          "problems": problems}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to land (default 20).")
  parser.add_argument("--seed", type=int, default=0, help="Seed of the random kill moments.")
  parser.add_argument("--out", type=Path, default=None, help="Where the runs go (default: a temporary directory, "
                      "removed afterwards).")
  args = parser.parse_args(argv)
  root = args.out or Path(tempfile.mkdtemp(prefix="superlm_kill_harness_"))
  data_dir = root / "data"
  began = time.monotonic()
  summary = harness(root, data_dir, args.kills, args.seed)
  for i, e in enumerate(summary["events"]):
    print(f"attempt {i + 1:3d}: {e['mode']:<24} {'killed' if e['killed'] else 'exit ' + str(e['rc']):<8}"
          f"{' mid-save' if e['mid_save'] else '         '} resumed from {e['resumed_from']:3d}, logged up to "
          f"{e['last_logged']:3d}, committed {e['committed']}")
  print(f"{summary['kills']} kills ({summary['mid_save_kills']} mid-save) over {summary['runs']} run(s) in "
        f"{time.monotonic() - began:.0f} s: "
        + ("every restart resumed and every run ended bit-identical to the uninterrupted one, each step logged once."
           if not summary["problems"] else f"{len(summary['problems'])} PROBLEM(S):"))
  for problem in summary["problems"]:
    print(f"  - {problem}")
  if args.out is None:
    shutil.rmtree(root, ignore_errors=True)
  return 1 if summary["problems"] else 0


if __name__ == "__main__":
  sys.exit(main())
