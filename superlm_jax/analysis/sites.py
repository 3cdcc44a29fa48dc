"""Where the super-weight search looks, and the weight edits there: one site is one `layers.mlp.MLP` of a built
model, its down projection `down` [hidden, dim] (row = input channel, column = output channel).

Sites are the MLPs of the loop layout (`model.blocks`, one module per layer), which is what the command line
restores (`generate.restore.load_model(..., layout="loop")`): in the scan layout (`model.layer_stacks`) one MLP
module holds the weights of many layers and runs under `nnx.scan`, so it is not one site.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from superlm_jax.layers.mlp import MLP
from superlm_jax.layers.moe import MoE

ModulePath = tuple  # A path inside the model, e.g. ("blocks", 2, "ffn") or ("blocks", 3, "ffn", "shared").


# ----------------------------------------------------------------------------------------------- sites


@dataclasses.dataclass(frozen=True)
class Site:
  """One MLP whose down-projection is searched: `path` in the model, its block index and kind."""
  path: ModulePath
  layer: int
  kind: str  # "mlp" (a dense feed-forward block) | "shared_experts" (the shared experts of an MoE block)

  @property
  def name(self) -> str:
    return ".".join(map(str, self.path))

  @property
  def label(self) -> str:
    return f"L{self.layer}" + (" shared" if self.kind == "shared_experts" else "")


def _layer_of(path: ModulePath) -> int:
  return next((p for p in path if isinstance(p, int)), -1)


def _check_loop_layout(model: nnx.Module) -> None:
  if getattr(model, "layer_stacks", None) is not None:
    raise ValueError("the super-weight search needs one module per layer: restore the model in the loop layout "
                     "(generate.restore.load_model(..., layout='loop') or models.layout.scan_to_loop)")


def mlp_sites(model: nnx.Module) -> list[Site]:
  """Every MLP in the model, in layer order."""
  _check_loop_layout(model)
  sites = []
  for path, module in nnx.iter_modules(model):
    if isinstance(module, MLP):
      kind = "shared_experts" if path and path[-1] == "shared" else "mlp"
      sites.append(Site(tuple(path), _layer_of(tuple(path)), kind))
  return sorted(sites, key=lambda s: (s.layer, s.name))


def routed_expert_layers(model: nnx.Module) -> list[int]:
  """Blocks whose routed experts are skipped by the search (their weights are stacked inside `MoE`, no site)."""
  return sorted(_layer_of(tuple(path)) for path, module in nnx.iter_modules(model) if isinstance(module, MoE))


def sites_by_name(sites: Sequence[Site]) -> dict[str, Site]:
  return {site.name: site for site in sites}


def module_at(root: Any, path: ModulePath) -> Any:
  """The module (or State node) at `path`: attribute names and list indices."""
  node = root
  for key in path:
    node = node[key] if isinstance(key, int) or isinstance(root, nnx.State) else getattr(node, key)
  return node


# ----------------------------------------------------------------------------------------------- weight edits


def set_down_weights(params: nnx.State, edits: dict[ModulePath, list[tuple[int, int, float]]]) -> nnx.State:
  """A copy of `params` with down[row, col] = value at each site path (the input is left untouched)."""
  new = jax.tree.map(lambda a: a, params)  # new Variables, same (immutable) arrays
  for path, entries in edits.items():
    if not entries:
      continue
    var = module_at(new, path)["down"]
    rows, cols, values = (np.asarray(v) for v in zip(*entries))
    var.set_value(var[...].at[rows, cols].set(jnp.asarray(values, var[...].dtype)))
  return new


def zero_weights(params: nnx.State, sites: Sequence[Site], coordinates: Iterable[tuple[str, int, int]]) -> nnx.State:
  """A copy of `params` with down[row, col] of each (site name, row, col) set to zero."""
  by_name = sites_by_name(sites)
  edits: dict[ModulePath, list] = {}
  for name, row, col in coordinates:
    edits.setdefault(by_name[name].path, []).append((int(row), int(col), 0.0))
  return set_down_weights(params, edits)


def largest_down_weights(params: nnx.State, sites: Sequence[Site], count: int,
                         exclude: Iterable[tuple[str, int, int]] = ()) -> list[tuple[str, int, int, float]]:
  """The `count` largest-|w| down-projection weights over all sites, except `exclude`: (site, row, col, w),
  largest first. Each site contributes its own top `count` first, so memory stays per-matrix."""
  exclude = set(exclude)
  pool = []
  for site in sites:
    down = np.asarray(jax.device_get(module_at(params, site.path)["down"][...]), np.float32)
    flat = np.abs(down).reshape(-1).copy()
    for name, row, col in exclude:
      if name == site.name:
        flat[row * down.shape[1] + col] = -1.0
    k = min(count, flat.size)
    top = np.argpartition(-flat, k - 1)[:k]
    pool += [(site.name, int(i // down.shape[1]), int(i % down.shape[1]), float(down.reshape(-1)[i]))
             for i in top if flat[i] >= 0]
  return sorted(pool, key=lambda w: -abs(w[3]))[:count]
