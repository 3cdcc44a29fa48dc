"""safetensors files in and out: one `model.safetensors`, or numbered shards listed by
`model.safetensors.index.json` (transformers' layout above `max_shard_bytes`).

transformers and torch are never imported: files are read and written with the `flax` backend of `safetensors`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from superlm_jax.interop import HFConversionError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of `path`/model.safetensors, or of the shards listed in model.safetensors.index.json."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  index = path / SAFETENSORS_INDEX
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (path / SAFETENSORS_FILE).is_file():
    files = [SAFETENSORS_FILE]
  else:
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    raise HFConversionError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {path}"
                            + (f" (found {', '.join(found)}; only safetensors are read)" if found else ""))
  tensors = {}
  for name in files:
    file = path / name
    if not file.is_file():
      raise HFConversionError(f"{SAFETENSORS_INDEX} in {path} lists {name}, which does not exist")
    try:
      with safe_open(str(file), framework="flax") as f:
        for key in f.keys():
          tensors[key] = np.asarray(f.get_tensor(key))
    except Exception as e:  # noqa: BLE001 (a corrupt file surfaces as several error types)
      raise HFConversionError(f"cannot read {file}: {' '.join(str(e).split())[:200]}") from e
  return tensors


def write_safetensors(tensors: dict[str, np.ndarray], path: str | pathlib.Path, dtype=jnp.float32,
                      max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `tensors` as model.safetensors, or as numbered shards plus an index when over `max_shard_bytes`."""
  from safetensors.flax import save_file  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  shards: list[dict[str, Any]] = [{}]
  size = 0
  for key in sorted(tensors):
    value = jnp.asarray(tensors[key], dtype=dtype)
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = value
    size += value.nbytes
  metadata = {"format": "pt"}  # transformers checks this tag
  if len(shards) == 1:
    save_file(shards[0], str(path / SAFETENSORS_FILE), metadata=metadata)
    (path / SAFETENSORS_INDEX).unlink(missing_ok=True)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(path / name), metadata=metadata)
    weight_map.update({key: name for key in shard})
  total = sum(v.nbytes for shard in shards for v in shard.values())
  (path / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2) + "\n")
