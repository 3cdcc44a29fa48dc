"""Dense feed-forward blocks: GPT-2's GELU MLP and Llama's SwiGLU (Shazeer 2020, "GLU Variants", eq. 6).

The transformer block takes any module with `__call__(x) -> y` of the same width in its feed-forward slot, which is
where the mixture of experts plugs in. `MLP` is its two halves, `hidden` then `down_proj`, so that a module put in
that slot in its place can run them itself and see the hidden activation between them.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from superlm_jax.layers.initializers import param


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
    self.up = param(rngs, (dim, hidden), ("embed", "mlp"), std=std)
    self.gate = param(rngs, (dim, hidden), ("embed", "mlp"), std=std) if activation == "swiglu" else None
    self.down = param(rngs, (hidden, dim), ("mlp", "embed"), std=out_std)
    self.up_bias = param(None, (hidden,), ("mlp",), value=0.0) if use_bias else None
    self.down_bias = param(None, (dim,), ("embed",), value=0.0) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.hidden(x))

  def hidden(self, x: jax.Array) -> jax.Array:
    """The hidden activation [..., hidden] from the input [..., dim], in the input's dtype."""
    dtype = x.dtype
    h = x @ self.up[...].astype(dtype)
    if self.up_bias is not None:
      h = h + self.up_bias[...].astype(dtype)
    gate = None if self.gate is None else x @ self.gate[...].astype(dtype)
    return ffn_hidden(h, gate, self.activation)

  def down_proj(self, h: jax.Array) -> jax.Array:
    """The block's output [..., dim] from its hidden activation [..., hidden]."""
    dtype = h.dtype
    y = h @ self.down[...].astype(dtype)
    if self.down_bias is not None:
      y = y + self.down_bias[...].astype(dtype)
    return y


def residual_std(std: float, num_layers: int) -> float:
  """GPT-2 (Radford et al. 2019, sec. 2.3): scale residual-branch output weights by 1/sqrt(N), N = 2 * layers."""
  return std / math.sqrt(2 * num_layers)
