"""Dense feed-forward blocks: GPT-2's GELU MLP and Llama's SwiGLU (Shazeer 2020, "GLU Variants", eq. 6).

The transformer block takes any module with `__call__(x) -> y` of the same width in its feed-forward slot, which is
where the mixture of experts plugs in.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from superlm_jax.layers.initializers import param


class DownProjOverride(nnx.Variable):
  """Values written over chosen channels of the down-projection output, for the super-activation restore
  experiment (Yu et al. 2024, sec. 3.2). Its value is a tuple (channels int[n], mask bool[..., n],
  values [..., n]): output channel channels[i] takes values[..., i] wherever mask[..., i] is set."""


ACTIVATIONS = ("gelu", "gelu_exact", "swiglu")


def ffn_hidden(up: jax.Array, gate: jax.Array | None, activation: str) -> jax.Array:
  """The hidden activation of a feed-forward block from its up (and, for SwiGLU, gate) projections.

  "gelu" is GPT-2's tanh approximation ("gelu_new" in transformers), "gelu_exact" the erf form (Hendrycks &
  Gimpel 2016), "swiglu" silu(gate) * up (Shazeer 2020, eq. 6).
  """
  if activation == "swiglu":
    return jax.nn.silu(gate) * up
  return jax.nn.gelu(up, approximate=activation == "gelu")


class MLP(nnx.Module):
  """GELU: down(gelu(up x)). SwiGLU: down(silu(gate x) * up x). Residual output init scaled by `out_std`."""

  def __init__(self, dim: int, hidden: int, *, activation: str, use_bias: bool, std: float, out_std: float,
               rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f"unknown MLP activation {activation!r}; one of {ACTIVATIONS}")
    self.activation = activation
    self.capture_activations = False  # Set by analysis tools (super weights) to sow the down-proj input/output.
    # Set by analysis tools to nnx.data(DownProjOverride(...)) (see `down_proj_output`).
    self.output_override = None
    self.up = param(rngs, (dim, hidden), ("embed", "mlp"), std=std)
    self.gate = param(rngs, (dim, hidden), ("embed", "mlp"), std=std) if activation == "swiglu" else None
    self.down = param(rngs, (hidden, dim), ("mlp", "embed"), std=out_std)
    self.up_bias = param(None, (hidden,), ("mlp",), value=0.0) if use_bias else None
    self.down_bias = param(None, (dim,), ("embed",), value=0.0) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    h = x @ self.up[...].astype(dtype)
    if self.up_bias is not None:
      h = h + self.up_bias[...].astype(dtype)
    gate = None if self.gate is None else x @ self.gate[...].astype(dtype)
    h = self.hidden_activation(ffn_hidden(h, gate, self.activation))
    y = h @ self.down[...].astype(dtype)
    if self.down_bias is not None:
      y = y + self.down_bias[...].astype(dtype)
    return self.down_proj_output(y)

  def hidden_activation(self, h: jax.Array) -> jax.Array:
    """Identity hook on the down-projection's input, where super activations appear (Yu et al. 2024, sec. 3):
    analysis tools switch `capture_activations` on and read it back with `nnx.pop(model, nnx.Intermediate)`."""
    if self.capture_activations:
      self.sow(nnx.Intermediate, "down_proj_input", h)
    return h

  def down_proj_output(self, y: jax.Array) -> jax.Array:
    """Hook on the down-projection's output, where the super activation is (Yu et al. 2024, sec. 3.1). An
    `output_override` writes chosen channels back (restoring a super activation after its super weight was
    pruned, sec. 3.2); `capture_activations` sows the result as "down_proj_output"."""
    if self.output_override is not None:
      channels, mask, values = self.output_override.get_value()
      current = y[..., channels]
      y = y.at[..., channels].set(jnp.where(mask, values.astype(y.dtype), current))
    if self.capture_activations:
      self.sow(nnx.Intermediate, "down_proj_output", y)
    return y


def residual_std(std: float, num_layers: int) -> float:
  """GPT-2 (Radford et al. 2019, sec. 2.3): scale residual-branch output weights by 1/sqrt(N), N = 2 * layers."""
  return std / math.sqrt(2 * num_layers)
