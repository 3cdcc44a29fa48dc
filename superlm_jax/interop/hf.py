"""Hugging Face checkpoints in and out: `gpt2`, `llama` (SmolLM2 is one), `deepseek_v2` and `deepseek_v3`.

    model, config = from_pretrained("path/to/hf_dir")      # config.json + *.safetensors (sharded or not)
    to_pretrained(model, config, "path/to/out_dir")        # the reverse; transformers loads it

Three stages, each one table read in both directions, so a field or tensor is mapped once:
  hf_config.py       config.json <-> config.model (every field that changes the logits is mapped or refused)
  safetensors_io.py  safetensors files <-> {name: array} (one file, or shards with an index)
  hf_weights.py      {name: array} <-> our params (exact transposes, reshapes, splits and permutations)
The parity tests (tests/interop) check the mapping against `transformers` itself: same logits to 1e-4 and the same
greedy tokens. transformers and torch are never imported here.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from superlm_jax.interop import HFConversionError
from superlm_jax.interop.hf_config import (SUPPORTED_MODEL_TYPES, config_from_hf, hf_config_from, infer_model_type,
                                           read_hf_config, rope_interleaved)
from superlm_jax.interop.hf_weights import hf_from_params, params_from_hf
from superlm_jax.interop.safetensors_io import SAFETENSORS_FILE, SAFETENSORS_INDEX, read_safetensors, write_safetensors
from superlm_jax.layers.moe import RouterBias
from superlm_jax.models import layout
from superlm_jax.models.spec import parse_dtype
from superlm_jax.models.transformer import abstract_model

__all__ = ["HFConversionError", "SUPPORTED_MODEL_TYPES", "SAFETENSORS_FILE", "SAFETENSORS_INDEX", "config_from_hf",
           "from_pretrained", "hf_config_from", "hf_from_params", "infer_model_type", "params_from_hf",
           "read_hf_config", "read_safetensors", "rope_interleaved", "to_pretrained", "write_safetensors"]


def _fill(abstract_state: nnx.State, values: dict, what: str) -> nnx.State:
  """Replaces the abstract leaves with `values` (same nesting), checking every shape."""
  expected = abstract_state.to_pure_dict()
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  try:
    flat_values = dict(jax.tree_util.tree_flatten_with_path(values)[0])
  except Exception as e:  # noqa: BLE001
    raise HFConversionError(f"cannot map the {what}: {e}") from e
  missing = set(flat_expected) - set(flat_values)
  extra = set(flat_values) - set(flat_expected)
  if missing or extra:
    name = jax.tree_util.keystr(sorted(missing or extra, key=str)[0])
    raise HFConversionError(f"converted {what} do not match the model ({'missing' if missing else 'unexpected'} "
                            f"{name})")
  for path, leaf in flat_expected.items():
    if tuple(flat_values[path].shape) != tuple(leaf.shape):
      raise HFConversionError(f"converted {what} {jax.tree_util.keystr(path)} has shape "
                              f"{tuple(flat_values[path].shape)}, the model expects {tuple(leaf.shape)}")
  state = jax.tree.map(lambda leaf, v: jnp.asarray(v, leaf.dtype), expected, values)
  nnx.replace_by_pure_dict(abstract_state, state)
  return abstract_state


def from_pretrained(path: str | pathlib.Path, *, scan_layers: bool = False):
  """(model, config) from a local Hugging Face directory: config.json + model.safetensors (or shards), in the
  loop layout of the blocks or, with `scan_layers`, the scan layout (models/layout.py)."""
  hf = read_hf_config(path)
  config = config_from_hf(hf)
  tensors = read_safetensors(path)
  params, model_state = params_from_hf(tensors, hf, config)
  if scan_layers:
    config.model.scan_layers = True
    params, model_state = layout.loop_to_scan(params, config.model), layout.loop_to_scan(model_state, config.model)
  graphdef, abstract_params, abstract_rest = nnx.split(abstract_model(config.model), nnx.Param, ...)
  params_state = _fill(abstract_params, params, "parameters")
  rest_state = _fill(abstract_rest, model_state, "model state")
  return nnx.merge(graphdef, params_state, rest_state), config


def to_pretrained(model: nnx.Module, config: ml_collections.ConfigDict, path: str | pathlib.Path, *,
                  model_type: str | None = None, dtype: str = "float32", rope_interleave: bool = True,
                  max_shard_bytes: int = 5 * 2**30) -> str:
  """Writes `model` as a Hugging Face directory (config.json + safetensors) that transformers loads; returns the
  model type written (default: inferred, see `infer_model_type`). `dtype` "float32" (exact) or "bfloat16";
  `rope_interleave` (DeepSeek-V3) writes the rotary rows interleaved, DeepSeek's own layout."""
  hf = hf_config_from(config, model_type, rope_interleave)
  if dtype not in ("float32", "bfloat16"):
    raise HFConversionError(f"dtype={dtype!r} is not float32 or bfloat16")
  hf["dtype"] = dtype
  # The Hugging Face side is one tensor per layer: a scan-layout model is cut into its layers first.
  params = layout.scan_to_loop(nnx.state(model, nnx.Param).to_pure_dict(), config.model)
  biases = layout.scan_to_loop(nnx.state(model, RouterBias).to_pure_dict(), config.model)
  tensors = hf_from_params(params, biases, hf, config)
  path = pathlib.Path(path)
  write_safetensors(tensors, path, dtype=parse_dtype(dtype),
                    max_shard_bytes=max_shard_bytes)
  (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
  return hf["model_type"]
