"""Dense feed-forward blocks: GPT-2's GELU MLP and Llama's SwiGLU (Shazeer 2020, "GLU Variants", eq. 6).

The transformer block takes any module with `__call__(x) -> y` of the same width in its feed-forward slot, which is
where the mixture of experts plugs in.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from superlm_jax.layers.initializers import param


class MLP(nnx.Module):
  """GELU: down(gelu(up x)). SwiGLU: down(silu(gate x) * up x). Residual output init scaled by `out_std`."""

  def __init__(self, dim: int, hidden: int, *, activation: str, use_bias: bool, std: float, out_std: float,
               rngs: nnx.Rngs):
    if activation not in ("gelu", "swiglu"):
      raise ValueError(f"unknown MLP activation {activation!r}")
    self.activation = activation
    self.capture_activations = False  # Set by analysis tools (super weights) to sow the down-proj input.
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
    if self.activation == "gelu":
      h = jax.nn.gelu(h, approximate=True)  # GPT-2's tanh approximation ("gelu_new" in transformers).
    else:
      h = jax.nn.silu(x @ self.gate[...].astype(dtype)) * h
    h = self.hidden_activation(h)
    y = h @ self.down[...].astype(dtype)
    if self.down_bias is not None:
      y = y + self.down_bias[...].astype(dtype)
    return y

  def hidden_activation(self, h: jax.Array) -> jax.Array:
    """Identity hook on the down-projection's input, where super activations appear (Yu et al. 2024, sec. 3):
    analysis tools switch `capture_activations` on and read it back with `nnx.pop(model, nnx.Intermediate)`."""
    if self.capture_activations:
      self.sow(nnx.Intermediate, "down_proj_input", h)
    return h


def residual_std(std: float, num_layers: int) -> float:
  """GPT-2 (Radford et al. 2019, sec. 2.3): scale residual-branch output weights by 1/sqrt(N), N = 2 * layers."""
  return std / math.sqrt(2 * num_layers)
