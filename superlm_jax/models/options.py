"""`RuntimeOptions`: how a built model computes, as opposed to what it is (`ModelSpec`).

None of these change the parameters, so one checkpoint runs under any of them. They are given when the model is
built (`Transformer(spec, options=..., rngs=...)`) or when its weights are put under another graph definition
(`models.transformer.with_options`), never set afterwards on a built model. They are static (part of the graph
definition), so a step traced with them compiles once.
"""

from __future__ import annotations

import dataclasses

from superlm_jax.config import CHOICES
from superlm_jax.kernels.mla_decode import DECODE_IMPLS
from superlm_jax.layers.mla import FORMS
from superlm_jax.layers.partitioning import MeshAxes


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
  # The device mesh the model runs across (superlm_jax.sharding.mesh_axes): the residual stream stays split by
  # batch rows and MoE layers dispatch tokens to experts on other devices. None: the single-device program.
  mesh_axes: MeshAxes | None = None
  # MLA only: "auto" (absorbed single-token decode steps, expanded otherwise), or "expanded" / "absorbed" everywhere.
  mla_form: str = "auto"
  # MLA absorbed decode steps: "xla" (einsums), "pallas" (kernels/mla_decode.py) or "auto" (pallas where it compiles
  # natively, see kernels.mla_decode.resolve_decode_impl).
  decode_impl: str = "xla"
  # jax.checkpoint policy of each block in the backward pass (train.remat; models/transformer.py REMAT_POLICIES).
  remat: str = "none"

  def __post_init__(self):
    for name, value, allowed in (("mla_form", self.mla_form, FORMS), ("decode_impl", self.decode_impl, DECODE_IMPLS),
                                 ("remat", self.remat, CHOICES["train.remat"])):
      if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; one of {allowed}")

  def replace(self, **changes) -> "RuntimeOptions":
    return dataclasses.replace(self, **changes)
