"""Training windows, the grain iterator (resume, epochs, process shards) and the fixed validation batches."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from superlm_jax.data.pipeline import TokenWindows, eval_batches, load_meta, make_train_iterator
from superlm_jax.errors import UserError


def _naive_windows(tokens: list[int], max_length: int, stride: int) -> list[list[int]]:
  out, start = [], 0
  while start + max_length + 1 <= len(tokens):
    out.append(tokens[start:start + max_length + 1])
    start += stride
  return out


@pytest.mark.parametrize("num_tokens,max_length,stride", [
    (100, 8, 8), (100, 8, 4), (100, 8, 3), (100, 8, 13),  # stride > max_length skips tokens
    (9, 8, 1), (8, 8, 1), (0, 8, 4), (5, 8, 2),  # exactly one window; N < max_length + 1
    (17, 8, 8), (18, 8, 8), (1000, 1, 1), (33, 16, 17),
])
def test_windows_match_naive_reference(tmp_path: Path, num_tokens: int, max_length: int, stride: int):
  tokens = (np.arange(num_tokens) * 7 % 65521).astype(np.uint16)
  tokens.tofile(tmp_path / "t.bin")
  source = TokenWindows(tmp_path / "t.bin", max_length, stride, "uint16")
  expected = _naive_windows(tokens.tolist(), max_length, stride)
  assert len(source) == len(expected) == max(0, (num_tokens - max_length - 1) // stride + 1)
  for i, window in enumerate(expected):
    item = source[i]
    assert item["inputs"].dtype == np.int32 and item["inputs"].shape == (max_length,)
    assert item["inputs"].tolist() == window[:-1]
    assert item["targets"].tolist() == window[1:]  # Targets are the inputs shifted by one.
  with pytest.raises(IndexError):
    source[len(expected)]


def test_uint32_tokens_and_pickling(tmp_path: Path):
  tokens = np.arange(70_000, 70_050, dtype=np.uint32)
  tokens.tofile(tmp_path / "t.bin")
  source = TokenWindows(tmp_path / "t.bin", 4, 4, "uint32")
  assert source[0]["inputs"].tolist() == [70_000, 70_001, 70_002, 70_003]
  clone = pickle.loads(pickle.dumps(source))  # What grain does to send the source to worker processes.
  assert clone._tokens is None
  assert clone[3]["targets"].tolist() == source[3]["targets"].tolist()


def _ids(batch: dict) -> list[int]:
  """Window indices of a batch over an arange token file with stride 1: the first input token."""
  return batch["inputs"][:, 0].tolist()


@pytest.fixture
def arange_dir(tmp_path: Path, make_token_dir) -> Path:
  # 25 + max_length tokens at stride 1 -> 25 windows; window i starts with token i.
  return make_token_dir(tmp_path / "d", np.arange(25 + 4), np.arange(100))


def test_resume_continues_with_the_next_unseen_batch(arange_dir: Path):
  args = dict(data_dir=arange_dir, max_length=4, stride=1, batch_size=4, seed=3, process_index=0, process_count=1)
  it = make_train_iterator(**args)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # Must survive a JSON checkpoint.
  expected = [next(it) for _ in range(9)]  # Crosses an epoch boundary (25 windows / 4 per batch).
  resumed = make_train_iterator(**args)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    np.testing.assert_array_equal(got["targets"], want["targets"])


def test_each_epoch_is_a_fresh_permutation(tmp_path: Path, make_token_dir):
  data = make_token_dir(tmp_path / "d", np.arange(20 + 4), np.arange(100))  # 20 windows, 5 batches per epoch
  it = make_train_iterator(data, 4, 1, 4, seed=0, process_index=0, process_count=1)
  epochs = [sum((_ids(next(it)) for _ in range(5)), []) for _ in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(20))
  assert epochs[0] != epochs[1] != epochs[2]
  other_seed = make_train_iterator(data, 4, 1, 4, seed=1, process_index=0, process_count=1)
  assert sum((_ids(next(other_seed)) for _ in range(5)), []) != epochs[0]


@pytest.mark.parametrize("num_windows,process_count", [(24, 2), (25, 2), (27, 3)])
def test_process_shards_are_disjoint_and_cover_the_data(tmp_path: Path, make_token_dir, num_windows: int,
                                                        process_count: int):
  data = make_token_dir(tmp_path / "d", np.arange(num_windows + 4), np.arange(100))
  per_process = num_windows // process_count
  batch = 2 * process_count  # global batch; 2 rows per process
  steps = per_process // 2 * 2  # whole batches within one epoch
  shards = []
  for index in range(process_count):
    it = make_train_iterator(data, 4, 1, batch, seed=5, process_index=index, process_count=process_count)
    first_epoch = sum((_ids(next(it)) for _ in range(per_process // 2)), [])
    assert len(first_epoch) == steps
    shards.append(set(first_epoch))
  union = set().union(*shards)
  assert sum(len(s) for s in shards) == len(union)  # disjoint
  if per_process % 2 == 0:
    # Whole epochs consumed: together the shards cover all windows except the < process_count left over.
    assert len(union) == num_windows // process_count * process_count


def test_batch_size_must_divide_across_processes(arange_dir: Path):
  with pytest.raises(UserError, match="not divisible"):
    make_train_iterator(arange_dir, 4, 1, 5, seed=0, process_index=0, process_count=2)


def test_too_little_training_data(tmp_path: Path, make_token_dir):
  data = make_token_dir(tmp_path / "d", np.arange(5), np.arange(100))
  with pytest.raises(UserError, match="not one window"):
    make_train_iterator(data, 8, 8, 2, seed=0, process_index=0, process_count=1)


def test_eval_batches_are_fixed_disjoint_and_spread(tmp_path: Path, make_token_dir):
  data = make_token_dir(tmp_path / "d", np.arange(100), np.arange(10 * 8 + 1))  # 10 disjoint windows of 8
  first = eval_batches(data, max_length=8, batch_size=2, num_batches=3)
  again = eval_batches(data, max_length=8, batch_size=2, num_batches=3)
  assert len(first) == 3 and all(b["inputs"].shape == (2, 8) for b in first)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  starts = [int(x) for b in first for x in b["inputs"][:, 0]]
  assert all(s % 8 == 0 for s in starts) and len(set(starts)) == 6  # stride = max_length: disjoint windows
  assert starts[0] == 0 and starts[-1] == 72  # spread over the whole validation set
  np.testing.assert_array_equal(first[0]["targets"][:, :-1], first[0]["inputs"][:, 1:])


def test_eval_batches_with_fewer_windows_than_requested(tmp_path: Path, make_token_dir):
  data = make_token_dir(tmp_path / "d", np.arange(100), np.arange(5 * 8 + 1))  # 5 windows
  batches = eval_batches(data, max_length=8, batch_size=2, num_batches=20)
  assert [b["inputs"].shape[0] for b in batches] == [2, 2]  # full batches only
  batches = eval_batches(data, max_length=8, batch_size=16, num_batches=2)
  assert [b["inputs"].shape[0] for b in batches] == [5]  # less than one batch: one smaller batch
  with pytest.raises(UserError, match="fewer than max_length"):
    eval_batches(data, max_length=64, batch_size=2, num_batches=2)


def test_unprepared_data_dir_names_the_prepare_command(tmp_path: Path):
  with pytest.raises(UserError) as info:
    load_meta(tmp_path / "nothing")
  assert "has not been prepared" in str(info.value) and "superlm_jax.data.prepare" in str(info.value)
  assert "\n" not in str(info.value)
  with pytest.raises(UserError):
    make_train_iterator(tmp_path / "nothing", 8, 8, 2, seed=0, process_index=0, process_count=1)


def test_process_defaults_come_from_jax(arange_dir: Path):
  explicit = make_train_iterator(arange_dir, 4, 1, 4, seed=3, process_index=0, process_count=1)
  default = make_train_iterator(arange_dir, 4, 1, 4, seed=3)  # single-process run: jax says 0 of 1
  np.testing.assert_array_equal(next(default)["inputs"], next(explicit)["inputs"])


def test_worker_processes_give_the_same_batches_and_resume(arange_dir: Path):
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags; the CLI tools parse them in app.run.
  args = dict(data_dir=arange_dir, max_length=4, stride=1, batch_size=4, seed=3, process_index=0, process_count=1)
  inline = make_train_iterator(**args)
  expected = [next(inline)["inputs"] for _ in range(6)]
  workers = make_train_iterator(**args, worker_count=2)
  try:
    for want in expected[:3]:
      np.testing.assert_array_equal(next(workers)["inputs"], want)
    state = json.loads(json.dumps(workers.get_state()))
  finally:
    workers.close()  # Stops the worker processes now rather than at interpreter exit.
    del workers
  resumed = make_train_iterator(**args, worker_count=2)
  try:
    resumed.set_state(state)
    for want in expected[3:]:
      np.testing.assert_array_equal(next(resumed)["inputs"], want)
  finally:
    resumed.close()
    del resumed


def test_document_segments_restart_positions_at_every_eos():
  from superlm_jax.data.pipeline import document_segments
  eos = 2
  inputs = np.array([[5, 6, 2, 7, 8, 9, 2, 2, 4], [2, 3, 3, 3, 3, 3, 3, 3, 3]])
  out = document_segments(inputs, eos)
  np.testing.assert_array_equal(out["segments"], [[0, 0, 1, 1, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(out["positions"], [[0, 1, 0, 1, 2, 3, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
