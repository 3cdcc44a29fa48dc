"""grain input pipeline over the prepared token files: shuffled training windows and fixed validation batches.

The token files are flat arrays (one document after another, each followed by EOS), so a training example is
simply a window of max_length + 1 consecutive tokens; windows may span document boundaries, and the model
learns to predict EOS and to start afresh after it.

Packing (`data.packing="segments"`): the same windows, cut into their documents. `document_segments` gives every
input token a document id ("segments") and a position that restarts at each document ("positions"); attention
never crosses a boundary (kernels/attention.py). An EOS token opens the document it precedes, as its position 0
(the EOS that ends document A is the input from which the model predicts B's first token, the way a BOS would),
while A's last token still learns to predict that EOS as its target.
Why not grain's ConcatThenSplit/FirstFit packing over documents: the bundled corpus is 42 long plays. Shuffling
documents and then cutting them into windows would put consecutive windows of one play into a batch, and
first-fit packing would truncate every play to one window. Shuffled windows with document masks keep the
shuffle, the exact resume and the multi-process sharding unchanged.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import grain
import numpy as np

from superlm_jax.config import PACKINGS
from superlm_jax.errors import UserError

PREPARE_HINT = "python -m superlm_jax.data.prepare --config=<config file>[:preset]"


def load_meta(data_dir: str | os.PathLike) -> dict:
  """meta.json of a prepared data directory; UserError (naming the prepare command) if there is none."""
  path = Path(data_dir) / "meta.json"
  if not path.is_file():
    raise UserError(f"{data_dir} has not been prepared (no meta.json): run `{PREPARE_HINT}` "
                    "or `make data` first")
  return json.loads(path.read_text())


class TokenWindows:
  """Random-access source of (inputs, targets) windows over a memory-mapped token file.

  Window i covers tokens [i * stride, i * stride + max_length + 1): `inputs` are its first max_length tokens and
  `targets` the same shifted by one. Only full windows exist, so the last < stride tokens may go unused.

  The memmap is opened lazily and dropped when pickled: grain worker processes receive the source by pickling
  and each maps the file itself (cheap; the OS shares the page cache).
  """

  def __init__(self, path: str | os.PathLike, max_length: int, stride: int, dtype: str | np.dtype = "uint16"):
    if max_length <= 0 or stride <= 0:
      raise UserError(f"max_length and stride must be positive, got max_length={max_length}, stride={stride}")
    self.path = str(path)
    self.max_length = int(max_length)
    self.stride = int(stride)
    self.dtype = np.dtype(dtype)
    self.num_tokens = os.path.getsize(self.path) // self.dtype.itemsize
    self._tokens = None

  def __len__(self) -> int:
    return max(0, (self.num_tokens - self.max_length - 1) // self.stride + 1)

  def _memmap(self) -> np.ndarray:
    if self._tokens is None:
      self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
    return self._tokens

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    n = len(self)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f"window {index} out of range for {n} windows")
    start = index * self.stride
    window = np.asarray(self._memmap()[start:start + self.max_length + 1], dtype=np.int32)
    return {"inputs": window[:-1], "targets": window[1:]}

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    state["_tokens"] = None
    return state

  def __repr__(self) -> str:  # grain prints sources in its pipeline summaries and errors.
    return f"TokenWindows({self.path!r}, max_length={self.max_length}, stride={self.stride}, windows={len(self)})"


def document_segments(inputs: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
  """{"segments", "positions"} int32 like `inputs` ([..., seq]): a new document starts at every EOS input."""
  starts = inputs == eos_id
  segments = np.cumsum(starts, axis=-1, dtype=np.int32)
  index = np.broadcast_to(np.arange(inputs.shape[-1], dtype=np.int32), inputs.shape)
  first = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)  # index where the current document began
  return {"segments": segments, "positions": (index - first).astype(np.int32)}


def _packer(packing: str, eos_id: int | None):
  """The per-example transform of `packing` (None for "off"); a UserError for what cannot be packed."""
  if packing not in PACKINGS:
    raise UserError(f"data.packing={packing!r} is not one of {PACKINGS}")
  if packing == "off":
    return None
  if eos_id is None:
    raise UserError("data.packing='segments' finds documents by their EOS separators, but this data was prepared "
                    "with a tokenizer that has no EOS id: use data.packing='off'")
  return functools.partial(_with_segments, eos_id=eos_id)  # picklable, for grain's worker processes


def _with_segments(example: dict[str, np.ndarray], eos_id: int) -> dict[str, np.ndarray]:
  return {**example, **document_segments(example["inputs"], eos_id)}


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # Imported here so that `prepare` and the tests of this module do not pay for it.

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  return process_index, process_count


def make_train_iterator(data_dir: str | os.PathLike, max_length: int, stride: int, batch_size: int, seed: int,
                        process_index: int | None = None, process_count: int | None = None,
                        worker_count: int = 0, packing: str = "off") -> grain.DatasetIterator:
  """An endless iterator of this process's training batches {"inputs", "targets"}: int32[batch, max_length]
  (and "segments", "positions" with packing="segments", see `document_segments`).

  `batch_size` is the global batch; each of the `process_count` processes gets batch_size // process_count
  rows. Pipeline: shuffle all windows with `seed` -> keep every process_count-th (this process's disjoint
  shard) -> repeat forever -> batch. grain's MapDataset is index-based: epoch e reads indices
  [e * len, (e + 1) * len) and its shuffle uses seed + e for them, so every epoch is a fresh permutation, and
  the slice maps epoch e of the shard onto epoch e of the shuffle, so shards stay disjoint in every epoch.
  Batches run across epoch boundaries; no window is dropped.

  The iterator's `get_state()` is a small JSON-serialisable dict (e.g. {"next_index": 1234}); pass it to
  `set_state()` on a fresh iterator built with the same arguments to continue with the next unseen batch.
  """
  meta = load_meta(data_dir)
  pack = _packer(packing, meta.get("eos_id"))
  process_index, process_count = _process_info(process_index, process_count)
  if batch_size % process_count:
    raise UserError(f"train.batch_size={batch_size} is not divisible by the {process_count} processes")
  source = TokenWindows(Path(data_dir) / "train.bin", max_length, stride, meta["dtype"])
  # Equal shard sizes keep all processes in the same epoch at the same step.
  usable = len(source) // process_count * process_count
  if usable == 0:
    raise UserError(f"train.bin has {source.num_tokens} tokens: not one window of max_length={max_length} + 1 "
                    f"per process ({process_count}); lower data.max_length or use a larger corpus")
  dataset = (
      grain.MapDataset.source(source)
      .shuffle(seed=seed)[process_index:usable:process_count]
      .repeat(None)
  )
  if pack is not None:
    dataset = dataset.map(pack)
  dataset = dataset.batch(batch_size // process_count, drop_remainder=True)
  # Windows are slices of a memmap in the page cache: no I/O to overlap, so no reader threads (grain's advice
  # for in-memory data) and a small prefetch buffer.
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=4))
  if worker_count > 0:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(iter_dataset)


def eval_batches(data_dir: str | os.PathLike, max_length: int, batch_size: int,
                 num_batches: int, packing: str = "off") -> list[dict[str, np.ndarray]]:
  """Up to `num_batches` fixed validation batches of disjoint windows (stride = max_length) from val.bin.

  The windows are spread evenly over the whole validation set (not its first few documents) and are the same
  on every call, so successive evaluations are comparable. With fewer windows than requested, all of them are
  used in full batches; with fewer than one batch, a single smaller batch is returned. With
  packing="segments" they carry document segments and positions like the training batches.
  """
  meta = load_meta(data_dir)
  pack = _packer(packing, meta.get("eos_id"))
  source = TokenWindows(Path(data_dir) / "val.bin", max_length, max_length, meta["dtype"])
  available = len(source)
  if available == 0:
    raise UserError(f"val.bin has {source.num_tokens} tokens, fewer than max_length + 1 = {max_length + 1}: "
                    "lower data.max_length or raise data.val_fraction")
  wanted = batch_size * num_batches
  if available >= wanted:
    count = wanted
  else:
    count = available // batch_size * batch_size or available
  indices = np.linspace(0, available - 1, count).round().astype(int)  # Distinct: count <= available.
  windows = [source[int(i)] for i in indices]
  if pack is not None:
    windows = [pack(w) for w in windows]
  size = min(batch_size, count)
  return [
      {key: np.stack([w[key] for w in windows[b:b + size]]) for key in windows[0]}
      for b in range(0, count, size)
  ]
