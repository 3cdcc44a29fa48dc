"""Train-state checkpoints with Orbax, plus the tokenizer and config copy that make a run directory self-contained.

A checkpoint holds a train-state dict, saved with StandardSave (arrays, sharding-aware), and one JSON `meta`
dict. Train code puts in `state`:
  params       nnx.state(model, nnx.Param)
  opt_state    the optimizer state (e.g. nnx.state(optimizer) or the optax state)
  model_state  other non-param nnx variables (may be empty)
  step         the optimizer step
  rng          jax.random.key_data(key): raw uint32 key data. Typed keys round-trip in orbax 0.12.8, but raw
               data is portable across versions; rebuild with jax.random.wrap_key_data.
and in `meta` the data-iterator state, the config as a dict, and anything else small and JSON-able.

On disk the state is split into Orbax items: `params`, `model_state` (only when it has arrays) and `train`
(opt_state, step, rng). Inference and warm starts read `params`/`model_state` alone (`restore_weights`), and a
checkpoint converted from other weights (Hugging Face) may have no `train` item at all.

Retention: the latest `keep` checkpoints AND the one with the lowest validation loss are kept. Orbax's
`max_to_keep` + `best_fn` keeps the `max_to_keep` best by the metric instead (recent ones would be deleted
whenever they score worse), so we give the manager an explicit preservation policy, "LatestN or BestN(1)".

Crash safety: Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only when
complete (commit); older steps are deleted after that commit, in the same finalize step. A crash mid-save
thus leaves the previous checkpoints intact plus a tmp directory, which the next Checkpointer removes.
Saving is asynchronous: `save` returns once arrays are copied off the device; call `wait()` before exiting.

Faults: a save that fails (full disk, read-only or vanished directory), in its blocking part or in the background
commit, is a one-line UserError naming the step, the directory and the free space there, raised by `save`, `wait` or
`check` (non-blocking, for a training loop to call every step); its tmp directory is removed and the previous
checkpoints are untouched (Orbax deletes old steps only after a successful commit). A checkpoint that cannot be read
back makes `first_readable` warn one line and fall back to the next older one.

Orbax logs a lot at INFO through absl logging; `absl.logging.set_verbosity(absl.logging.WARNING)` quiets it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from superlm_jax import checkpoint_noise
from superlm_jax import config as config_lib
from superlm_jax.data.tokenizer import HF_TOKENIZER_FILE, SENTENCEPIECE_FILE, TOKENIZER_FILES
from superlm_jax.errors import UserError, free_space
from superlm_jax.fileio import write_atomically

T = TypeVar("T")

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"


def _one_line(error: BaseException, limit: int = 300) -> str:
  text = " ".join(str(error).split()) or "no details"
  return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


@contextlib.contextmanager
def _stderr_dropped_on_failure(settle_s: float = 0.2, limit_s: float = 3.0):
  """Holds back what is written to file descriptor 2 inside the block; replays it unless the block raised.

  When an Orbax restore fails (a corrupt chunk), Orbax closes its asyncio loop while TensorStore reads of the
  other arrays are still running; as they finish, TensorStore's threads print "RuntimeError: Event loop is
  closed" tracebacks, before and after the caller's one-line error. On failure this waits until stderr has been
  quiet for `settle_s` (at most `limit_s`) and drops the noise: the exception says what went wrong.
  """
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError, AttributeError):  # no real stderr: nothing to hold back
    yield
    return
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    failed = False
    try:
      yield
    except BaseException:
      failed = True
      deadline, size, quiet_since = time.monotonic() + limit_s, -1, time.monotonic()
      while time.monotonic() < deadline:
        now_size = os.fstat(held.fileno()).st_size
        if now_size != size:
          size, quiet_since = now_size, time.monotonic()
        elif time.monotonic() - quiet_since >= settle_s:
          break
        time.sleep(0.02)
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if not failed:
        held.seek(0)
        text = held.read()
        if text:
          os.write(2, text)


class Checkpointer:
  """Saves and restores train states under `directory`, keeping the latest `keep` and the best one.

  Args:
    directory: where the step directories go (created on the first save unless `create` is False).
    keep: how many of the latest checkpoints to keep (>= 1).
    best_metric: the `metrics` entry that ranks checkpoints, lower is better; a save without it (or with a
      NaN/inf value) never counts as the best.
    create: False for read-only use (sampling, warm starts): a missing directory is then a UserError.
  """

  def __init__(self, directory: str | pathlib.Path, keep: int, best_metric: str = "val_loss",
               create: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    if not create and not self.directory.is_dir():
      raise UserError(f"checkpoint directory {self.directory} does not exist")
    self.best_metric = best_metric

    def metric(metrics: Mapping[str, Any]) -> float:
      # Saves without the metric are stored with metrics {} (see `save`) and rank as the worst.
      return float(metrics.get(best_metric, math.inf))

    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=max(int(keep), 1)),
        # reverse=True sorts descending and keeps the last n: the lowest metric.
        checkpoint_managers.BestN(get_metric_fn=metric, reverse=True, n=1),
    ])
    options = ocp.CheckpointManagerOptions(
        # best_fn / best_mode only make the manager write and track metrics (for best_step); retention is
        # decided by the policy alone.
        best_fn=metric, best_mode="min", preservation_policy=policy,
        create=create, cleanup_tmp_directories=create)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except Exception as e:  # noqa: BLE001 (it reads every step's metadata and metrics: garbage there is user data)
      raise UserError(f"cannot read the checkpoints in {self.directory}: {_one_line(e)}") from e
    self._pending: int | None = None  # The step whose background commit may still be running.
    checkpoint_noise.install()

  def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any],
           metrics: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts saving `state` (the train-state dict; `opt_state`/`step`/`rng` may be absent for weights-only
    checkpoints) and `meta` (JSON-able) as `step`; returns whether it did.

    A step that is already saved is skipped (e.g. the final save landing on a periodic one). `force` saves
    even if the manager's save-decision policy would not (it saves every step it is given by default).
    """
    if step in self._manager.all_steps():
      return False
    value = None if metrics is None else metrics.get(self.best_metric)
    # Only a finite ranking metric is recorded: a NaN validation loss must never become the "best". {}
    # rather than None: orbax warns on every save without metrics once best_fn is set.
    tracked = {}
    if value is not None and math.isfinite(float(value)):
      tracked = {self.best_metric: float(value)}
    items = {name: ocp.args.StandardSave(tree) for name, tree in _to_items(state).items()}
    args = ocp.args.Composite(meta=ocp.args.JsonSave(dict(meta)), **items)
    # Orbax waits for the previous save inside its own; waiting here first blames a failed commit on its own step.
    self.wait()
    try:
      saved = self._manager.save(int(step), args=args, metrics=tracked, force=force)
    except Exception as e:  # noqa: BLE001 (OSError, or tensorstore's and Orbax's wrappers of one)
      raise self._save_failed(int(step), e) from e
    if saved:
      self._pending = int(step)
    return saved

  def wait(self) -> None:
    """Blocks until the asynchronous part of the last save has been committed to disk; a one-line UserError if the
    commit failed (raised once: a later `wait`, e.g. in a `finally`, does not raise it over itself)."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_failed(step, e) from e

  def check(self) -> None:
    """Without blocking: the one-line UserError of a background save that has failed, if any."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self.wait()  # The commit is over (or just ending): no real wait.

  def _save_failed(self, step: int | None, error: BaseException) -> UserError:
    """The UserError of a failed save, after removing what that save left (its tmp directory); the committed
    checkpoints stay as they are."""
    with contextlib.suppress(Exception):  # The failed save's other writes end before its folder goes.
      self._manager.wait_until_finished()
    if step is not None:
      _remove_settled(lambda: list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*")))
    with contextlib.suppress(Exception):  # Orbax may still list the failed step; the directory may be gone.
      self._manager.reload()
    free = free_space(self.directory) or f"free space on {self.directory} unknown"
    checkpoint_noise.after_failure()
    reason = checkpoint_noise.os_error_summary(error) or _one_line(error)
    return UserError(f"cannot save checkpoint step {'?' if step is None else step} in {self.directory} "
                     f"({reason}); {free}; the earlier checkpoints are kept")

  def close(self) -> None:
    self._manager.close()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the lowest `best_metric`, or None if no save recorded one."""
    step = self._manager.best_step()
    if step is None or not math.isfinite(self._metric_of(step)):
      return None
    return step

  def _metric_of(self, step: int) -> float:
    metrics = self._manager.metrics(step) or {}
    return float(metrics.get(self.best_metric, math.inf))

  def resolve_step(self, step: int | None) -> int:
    """`step` if it exists, the latest when None; a one-line UserError otherwise."""
    steps = self.all_steps()
    if not steps:
      raise UserError(f"no checkpoint in {self.directory}")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise UserError(f"no checkpoint for step {step} in {self.directory} (available: "
                      f"{', '.join(map(str, steps))})")
    return step

  def restore(self, step: int | None = None, abstract_state: Any = None,
              shardings: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Returns (state, meta) of `step` (default: the latest).

    `abstract_state` gives the structure, dtypes and shardings to restore into: the train-state dict with
    leaves as jax.ShapeDtypeStruct (with `.sharding`), e.g. from jax.eval_shape. Arrays are placed on those
    shardings, whatever the sharding at save time. Only the keys present in `abstract_state` are read, so
    `{"params": ..., "model_state": ...}` restores weights without the optimizer state.

    `shardings` (a train-state dict of jax.sharding.Sharding, e.g. `training.step.create_train_state`'s) places
    the arrays instead of the abstract leaves' own `.sharding`: a checkpoint saved on one mesh restores onto
    any other, each process reading only the shards its devices hold.
    """
    if shardings is not None:
      if abstract_state is None:
        raise ValueError("restoring onto `shardings` needs the `abstract_state` they belong to")
      place = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) if hasattr(a, "shape") else a
      abstract_state = {key: jax.tree.map(place, tree, shardings[key]) for key, tree in abstract_state.items()}
    elif abstract_state is not None:
      # A leaf without a sharding lands on this process's first device, whatever mesh saved it: Orbax would
      # otherwise insist on the saving topology, and a model trained on 8 devices could not be sampled on one.
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract_state = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device)
          if isinstance(a, jax.ShapeDtypeStruct) and a.sharding is None else a, abstract_state)
    step = self.resolve_step(step)
    if abstract_state is None:  # Everything saved, as nested dicts.
      wanted = {name: None for name in ("params", "model_state", "train")
                if (self.directory / str(step) / name).is_dir()}
      abstract_state = {"params": None, "model_state": {}}
    else:
      wanted = _to_items(abstract_state)
    try:
      with _stderr_dropped_on_failure():
        restored = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore(), **{name: ocp.args.StandardRestore(tree) for name, tree in wanted.items()}))
      restored = {name: restored[name] for name in ("meta", *wanted)}
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001 (a corrupt or mismatched checkpoint surfaces as many types)
      checkpoint_noise.after_failure()
      raise UserError(f"cannot restore checkpoint step {step} in {self.directory}: {_one_line(e)}") from e
    state = _from_items({name: restored[name] for name in wanted}, abstract_state)
    return state, restored["meta"]

  def first_readable(self, read: Callable[[int], T]) -> tuple[int, T]:
    """(step, read(step)) for the newest step that `read` (a restore) reads without a UserError: a corrupt latest
    checkpoint costs one warning line on stderr naming it, not the run; a one-line UserError if none is readable."""
    steps = self.all_steps()
    if not steps:
      raise UserError(f"no checkpoint in {self.directory}")
    failures = []
    for step in reversed(steps):
      try:
        result = read(step)
      except UserError as e:
        failures.append((step, _reason(e)))
        continue
      for bad, reason in failures:
        print(f"warning: checkpoint step {bad} in {self.directory} is unreadable ({reason}); using step {step}",
              file=sys.stderr)
      return step, result
    raise UserError(f"no readable checkpoint in {self.directory} (tried {', '.join(str(s) for s, _ in failures)}: "
                    f"{failures[0][1]})")

  def restore_weights(self, abstract_params: Any, abstract_model_state: Any, step: int | None = None,
                      shardings: Mapping[str, Any] | None = None):
    """(params, model_state) of `step` without reading the optimizer state; `shardings` as in `restore`."""
    state, _ = self.restore(step, {"params": abstract_params, "model_state": abstract_model_state}, shardings)
    return state["params"], state["model_state"]

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """Only the JSON `meta` of `step` (default: the latest), without reading any array."""
    step = self.resolve_step(step)
    try:
      return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001
      raise UserError(f"cannot read the metadata of checkpoint step {step} in {self.directory}: "
                      f"{_one_line(e)}") from e


def _remove_settled(find: Callable[[], list[pathlib.Path]], quiet_s: float = 0.3, limit_s: float = 10.0) -> None:
  """Removes the folders `find()` lists until none has reappeared for `quiet_s`: a failed save's other writes
  (TensorStore's, per item) may still be landing in its tmp folder when the first failure is reported."""
  deadline, quiet_since = time.monotonic() + limit_s, time.monotonic()
  while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet_s:
    found = find()
    for leftover in found:
      shutil.rmtree(leftover, ignore_errors=True)
    if found:
      quiet_since = time.monotonic()
    time.sleep(0.05)


def _reason(error: UserError) -> str:
  """What went wrong in a restore's UserError, without its "cannot restore checkpoint step N in DIR" preamble."""
  cause = error.__cause__
  return _one_line(cause, limit=200) if cause is not None else str(error)


_TRAIN_KEYS = ("opt_state", "step", "rng")


def _has_arrays(tree: Any) -> bool:
  return bool(jax.tree.leaves(tree))


def _to_items(state: Mapping[str, Any]) -> dict[str, Any]:
  """Train-state dict -> Orbax items (StandardSave takes neither bare scalars nor empty trees)."""
  unknown = set(state) - {"params", "model_state", *_TRAIN_KEYS}
  if unknown:
    raise ValueError(f"unknown train-state keys {sorted(unknown)}")
  items = {"params": state["params"]}
  if _has_arrays(state.get("model_state", {})):
    items["model_state"] = state["model_state"]
  train = {k: state[k] for k in _TRAIN_KEYS if k in state}
  if train:
    items["train"] = train
  return items


def _from_items(items: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
  """Orbax items -> train-state dict with the keys of `template` (empty model_state comes back as given)."""
  state = {"params": items["params"]}
  if "model_state" in template:
    state["model_state"] = items.get("model_state", template["model_state"])
  state.update(items.get("train", {}))
  return state


# The settings that fix which tokens the saved data-iterator position points at (the document split, the windows,
# the rows per step): resuming with one of them changed would silently continue on other data, so training/loop.py
# refuses it unless train.allow_data_change. The tokenizer is compared by content (`data_identity_changes`), not by
# the data.tokenizer path, which also covers data.tokenizer_sample_bytes. model.vocab_size is the model's: a changed
# architecture is refused whatever train.allow_data_change says.
DATA_IDENTITY_KEYS = ("data.corpus", "data.text_field", "data.val_fraction", "data.seed", "data.max_length",
                      "data.stride", "data.packing", "train.batch_size", "train.grad_accum_steps")


def tokenizer_files(source: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """The tokenizer files of `source` (a directory, or a tokenizer file) by name: those `copy_tokenizer` copies."""
  source = pathlib.Path(source)
  directory = source.parent if source.is_file() else source
  names = [source.name] if source.is_file() and source.name == SENTENCEPIECE_FILE else TOKENIZER_FILES
  return {name: directory / name for name in names if (directory / name).is_file()}


def data_identity_changes(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                          run_dir: str | pathlib.Path, tokenizer_source: str | pathlib.Path) -> list[str]:
  """"key old -> new" for every DATA_IDENTITY_KEYS setting of `config` that differs from the `saved` run config, and
  one entry when the tokenizer files of `tokenizer_source` differ from those saved in `run_dir` (a run without any,
  e.g. one written before tokenizers were copied, has nothing to compare)."""
  changes = []
  for dotted in DATA_IDENTITY_KEYS:
    section, _, key = dotted.partition(".")
    if saved[section][key] != config[section][key]:
      changes.append(f"{dotted} {saved[section][key]!r} -> {config[section][key]!r}")
  saved_files, new_files = tokenizer_files(run_dir), tokenizer_files(tokenizer_source)
  if saved_files:
    differ = sorted(name for name in saved_files.keys() | new_files.keys()
                    if name not in saved_files or name not in new_files
                    or saved_files[name].read_bytes() != new_files[name].read_bytes())
    if differ:
      changes.append(f"the tokenizer ({', '.join(differ)} of {pathlib.Path(tokenizer_source)} differ from the run's)")
  return changes


def _write_if_changed(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to `path` only when the file does not hold it already, and then atomically."""
  write_atomically(path, data, if_changed=True)


def save_tokenizer_and_config(directory: str | pathlib.Path, tokenizer_path: str | pathlib.Path,
                              config: ml_collections.ConfigDict) -> None:
  """Copies the tokenizer (a tokenizer.model file, or a directory holding tokenizer.model or a Hugging Face
  tokenizer.json) and writes config.json into `directory`, so a run directory is all that sampling needs.

  Each file is written only if its content changes, atomically (`_write_if_changed`). A tokenizer file the new
  tokenizer does not have is removed (a tokenizer.model left next to a new tokenizer.json would be loaded instead)."""
  directory = pathlib.Path(directory)
  files = tokenizer_files(tokenizer_path)
  if not files:
    raise UserError(f"no tokenizer ({SENTENCEPIECE_FILE} or {HF_TOKENIZER_FILE}) in {tokenizer_path}")
  directory.mkdir(parents=True, exist_ok=True)
  same_directory = next(iter(files.values())).parent.resolve() == directory.resolve()
  if not same_directory:
    for name, path in files.items():
      _write_if_changed(directory / name, path.read_bytes())
    for name in TOKENIZER_FILES:
      if name not in files:
        (directory / name).unlink(missing_ok=True)
  _write_if_changed(directory / CONFIG_FILE, (config.to_json_best_effort(indent=2, sort_keys=True) + "\n").encode())


def load_run_config(directory: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The config saved by `save_tokenizer_and_config`, laid over today's defaults (keys added since keep
  their defaults; a key that no longer exists is an error)."""
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise UserError(f"no {CONFIG_FILE} in {pathlib.Path(directory)}: not a training run directory")
  try:
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict):
      raise TypeError(f"expected a JSON object of config sections, not a {type(saved).__name__}")
    config = config_lib.base_config()
    config_lib._update_strict(config, saved, prefix="")  # pylint: disable=protected-access
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"cannot read {path}: {_one_line(e)}") from e
  return config
