"""Seeing and rewriting an MLP's down projection without any hook in the model's own layers.

A `DownProjProbe` that wraps an MLP is put in the MLP's slot of a copy of the model (the way penzai's
intermediate-value tools swap a wrapper layer into a model, instead of the model carrying hooks): the probe runs
the MLP's two halves itself, sows the down projection's input and output as `nnx.Intermediate` values, and may
write chosen output channels over. The model every other tool runs stays exactly as built.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from superlm_jax.analysis.sites import ModulePath, module_at
from superlm_jax.layers.mlp import MLP

# Values written over down-projection output channels: (channels int[n], mask bool[..., n], values [..., n]);
# output channel channels[i] takes values[..., i] wherever mask[..., i] is set.
Override = tuple[jax.Array, jax.Array, jax.Array]


class DownProjProbe(nnx.Module):
  """An MLP's stand-in that sees and can rewrite its down projection (Yu et al. 2024, sec. 3).

  `capture`: sows the down projection's input, the hidden activation where the super weight's input channel
  spikes, as "down_proj_input", and its output, where the super activation is (sec. 3.1), as "down_proj_output".
  `override` (an `Override`): writes chosen output channels back, which restores a super activation after its
  super weight was pruned (sec. 3.2). The output is sown after the override.
  """

  def __init__(self, mlp: MLP, *, capture: bool = False, override: Override | None = None):
    self.mlp = mlp
    self.capture = capture
    self.override = nnx.data(override)  # Arrays (traced under jit), not static structure.

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.mlp.hidden(x)
    y = self.mlp.down_proj(h)
    if self.override is not None:
      channels, mask, values = self.override
      y = y.at[..., channels].set(jnp.where(mask, values.astype(y.dtype), y[..., channels]))
    if self.capture:
      self.sow(nnx.Intermediate, "down_proj_input", h)
      self.sow(nnx.Intermediate, "down_proj_output", y)
    return y


def with_probes(model: nnx.Module, *, capture: Sequence[ModulePath] = (),
                overrides: Mapping[ModulePath, Override] | None = None) -> nnx.Module:
  """A copy of `model` (new modules over the same arrays: `model` is left as it is) with a `DownProjProbe` in
  place of the MLP at each path of `capture` (sowing) and of `overrides` (writing its override)."""
  overrides = overrides or {}
  if not capture and not overrides:
    return model
  copy = nnx.merge(*nnx.split(model))
  for path in dict.fromkeys((*capture, *overrides)):
    mlp = module_at(copy, path)
    if not isinstance(mlp, MLP):
      raise ValueError(f"{'.'.join(map(str, path))} is a {type(mlp).__name__}, not an MLP")
    probe = DownProjProbe(mlp, capture=path in capture, override=overrides.get(path))
    parent, key = module_at(copy, path[:-1]), path[-1]
    if isinstance(key, int):
      parent[key] = probe
    else:
      setattr(parent, key, probe)
  return copy


def down_proj_activations(model: nnx.Module, paths: Sequence[ModulePath], tokens: jax.Array
                          ) -> dict[ModulePath, tuple[jax.Array, jax.Array]]:
  """{path: (down-projection input [batch, seq, hidden], output [batch, seq, dim])} of the MLPs at `paths`, from
  one forward pass of `model` on `tokens` [batch, seq]."""
  _, captured = nnx.capture(with_probes(model, capture=paths), nnx.Intermediate)(tokens)
  return {path: (module_at(captured, path)["down_proj_input"].get_value()[0],
                 module_at(captured, path)["down_proj_output"].get_value()[0]) for path in paths}


def merge_with_overrides(graphdef, params, state_and_overrides: tuple[nnx.State, Mapping[ModulePath, Override]]
                         ) -> nnx.Module:
  """The `merge` of `training.evaluate.make_token_nll` for scoring with overrides: its model state is the pair
  (model state, {site path: Override}) and the model it builds has those overrides probed in ({} for none)."""
  rest, overrides = state_and_overrides
  return with_probes(nnx.merge(graphdef, params, rest), overrides=overrides)
