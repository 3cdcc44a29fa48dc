"""The two layouts of a model's blocks (`model.scan_layers`, see models/transformer.py), and conversions between
them on plain parameter trees.

  loop  {"blocks": {0: block, 1: block, ...}}: one subtree per layer.
  scan  {"layer_stacks": {0: stack, ...}}: one subtree per run of layers of the same structure
        (`ModelSpec.layer_groups`), every array with a leading layers axis.

The conversions work on the nested dicts of `nnx.State.to_pure_dict()` (parameters, MoE balance biases, and the
Adam moments, which mirror the parameters), so checkpoints, Hugging Face interop and the tests share them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from superlm_jax.models.spec import model_spec


def loop_to_scan(tree: dict, cfg: ml_collections.ConfigDict) -> dict:
  """A loop-layout tree -> the scan layout: the blocks of each layer group stacked on a new leading axis."""
  tree = dict(tree)
  if "blocks" not in tree:
    return tree
  blocks = tree.pop("blocks")
  tree["layer_stacks"] = {
      s: jax.tree.map(lambda *layers: jnp.stack(layers), *[blocks[i] for i in range(start, stop)])
      for s, (start, stop) in enumerate(model_spec(cfg).layer_groups) if any(i in blocks for i in range(start, stop))}
  return tree


def scan_to_loop(tree: dict, cfg: ml_collections.ConfigDict) -> dict:
  """A scan-layout tree -> the loop layout: every stack cut into its layers."""
  tree = dict(tree)
  if "layer_stacks" not in tree:
    return tree
  stacks = tree.pop("layer_stacks")
  tree["blocks"] = {}
  for s, (start, stop) in enumerate(model_spec(cfg).layer_groups):
    if s in stacks:
      for i in range(start, stop):
        tree["blocks"][i] = jax.tree.map(lambda a, i=i: a[i - start], stacks[s])
  return tree


def convert_state(source: Any, target_template: Any, cfg: ml_collections.ConfigDict, to_scan: bool) -> Any:
  """Converts every nnx.State inside `source` (a train state: params, model_state, the optimizer's moments) into
  the layout of the matching nnx.State of `target_template` (same structure around the States, e.g. from
  jax.eval_shape of the other layout's train state). Non-State leaves (step, rng, counts) are kept."""
  convert = loop_to_scan if to_scan else scan_to_loop
  is_state = lambda x: isinstance(x, nnx.State)

  def one(src, template):
    if not is_state(src):
      return src
    converted = convert(src.to_pure_dict(), cfg)
    out = jax.tree.map(lambda x: x, template)  # a copy whose leaves are replaced below
    nnx.replace_by_pure_dict(out, converted)
    return out

  return jax.tree.map(one, source, target_template, is_leaf=is_state)
