"""LayerNorm (Ba et al. 2016; GPT-2) and RMSNorm (Zhang & Sennrich 2019; Llama, DeepSeek).

Both normalise in float32 whatever the compute dtype, because the mean/variance of bf16 activations with
outliers (see the super-weight paper, Yu et al. 2024) lose too much precision, then cast back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from superlm_jax.layers.initializers import param


class LayerNorm(nnx.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias, statistics over the last axis."""

  def __init__(self, dim: int, *, eps: float = 1e-5, use_bias: bool = True, axis_name: str = "embed"):
    self.eps = eps
    self.scale = param(None, (dim,), (axis_name,), value=1.0)
    self.bias = param(None, (dim,), (axis_name,), value=0.0) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(dtype)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale (no centring, no bias)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = "embed"):
    self.eps = eps
    self.scale = param(None, (dim,), (axis_name,), value=1.0)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(dtype)


def make_norm(kind: str, dim: int, *, eps: float, use_bias: bool = True, axis_name: str = "embed") -> nnx.Module:
  if kind == "layernorm":
    return LayerNorm(dim, eps=eps, use_bias=use_bias, axis_name=axis_name)
  if kind == "rmsnorm":
    return RMSNorm(dim, eps=eps, axis_name=axis_name)
  raise ValueError(f"unknown norm {kind!r}")
