"""HF tensors <-> our parameters, both ways from one rule table.

A `Rule` ties some of our arrays (dotted paths in the pure-dict params, or in the model state) to some HF tensors
through a list of exact, invertible array ops. Import runs the ops in order (HF -> ours); export runs their inverses
in reverse order, so each tensor is mapped once for both directions (like haliax's state-dict key maps):

    Rule(("blocks.0.attn.wkv_down", "blocks.0.attn.wk_rope"), ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight",),
         (Split(0, (kv_lora_rank, rope)), Transpose(), At(1, Permute(1, deinterleave))))

Layout: transformers' `nn.Linear` stores [out, in]; ours are [in, (heads, head_dim) | out] with named axes (GPT-2's
Conv1D already stores [in, out]). DeepSeek's rotary features are interleaved pairs (2i, 2i+1) (`rope_interleave`,
and always in DeepSeek-V2); ours rotate halves (i, i + d/2) like Llama, so the rotary rows of the query and
shared-key projections are permuted once here. q.k is unchanged because both sides get the same permutation.
Only transposes, reshapes, splits, concatenations, stacks and permutations, in float32: round trips are exact.

Every tensor is accounted for: import refuses a checkpoint tensor no rule reads (bar buffers and modules that never
feed the logits, see `_ignorable`), export refuses a parameter no rule writes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from superlm_jax.interop import HFConversionError
from superlm_jax.interop.hf_config import rope_interleaved
from superlm_jax.models.spec import ModelSpec


# ====================================================================================== invertible array ops
class _EachArray:
  """An op applied to every array of the list; subclasses give the one-array map and its inverse."""

  def to_ours(self, arrays: list) -> list:
    return [self.one_to_ours(a) for a in arrays]

  def to_hf(self, arrays: list) -> list:
    return [self.one_to_hf(a) for a in arrays]


@dataclasses.dataclass(frozen=True)
class Transpose(_EachArray):
  """Axes permuted; `axes` None reverses them (nn.Linear [out, in] <-> ours [in, out])."""
  axes: tuple[int, ...] | None = None

  def one_to_ours(self, a: np.ndarray) -> np.ndarray:
    return np.transpose(a, self.axes)

  def one_to_hf(self, a: np.ndarray) -> np.ndarray:
    return np.transpose(a, None if self.axes is None else tuple(np.argsort(self.axes)))


@dataclasses.dataclass(frozen=True)
class Unflatten(_EachArray):
  """Axis `axis` (>= 0) split into `shape`, e.g. HF's heads * head_dim features into ours (heads, head_dim)."""
  axis: int
  shape: tuple[int, ...]

  def one_to_ours(self, a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[:self.axis] + tuple(self.shape) + a.shape[self.axis + 1:])

  def one_to_hf(self, a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[:self.axis] + (-1,) + a.shape[self.axis + len(self.shape):])


@dataclasses.dataclass(frozen=True)
class Permute(_EachArray):
  """Our index i along `axis` is HF's index order[i] (the rotary deinterleave)."""
  axis: int
  order: tuple[int, ...]

  def one_to_ours(self, a: np.ndarray) -> np.ndarray:
    return np.take(a, self.order, axis=self.axis)

  def one_to_hf(self, a: np.ndarray) -> np.ndarray:
    return np.take(a, np.argsort(self.order), axis=self.axis)


@dataclasses.dataclass(frozen=True)
class At:
  """`op` applied to the index-th array of the list only."""
  index: int
  op: Any

  def to_ours(self, arrays: list) -> list:
    return self._apply(arrays, self.op.to_ours)

  def to_hf(self, arrays: list) -> list:
    return self._apply(arrays, self.op.to_hf)

  def _apply(self, arrays: list, fn: Callable) -> list:
    return arrays[:self.index] + fn(arrays[self.index:self.index + 1]) + arrays[self.index + 1:]


@dataclasses.dataclass(frozen=True)
class Split:
  """One HF tensor <-> consecutive parts of `sizes` along `axis` (a fused q|k|v, latent|rotary key, key|value)."""
  axis: int
  sizes: tuple[int, ...]

  def to_ours(self, arrays: list) -> list:
    (a,) = arrays
    if a.shape[self.axis] != sum(self.sizes):
      raise ValueError(f"axis {self.axis} has {a.shape[self.axis]} features, expected "
                       f"{' + '.join(map(str, self.sizes))}")
    return np.split(a, np.cumsum(self.sizes)[:-1], axis=self.axis)

  def to_hf(self, arrays: list) -> list:
    return [np.concatenate(arrays, axis=self.axis)]


class Stack:
  """Several HF tensors (one per expert) <-> ours stacked on a new leading axis."""

  def to_ours(self, arrays: list) -> list:
    return [np.stack(arrays)]

  def to_hf(self, arrays: list) -> list:
    (a,) = arrays
    return list(a)


T = Transpose()


# ====================================================================================== rules
@dataclasses.dataclass(frozen=True)
class Rule:
  """Our arrays `ours` <-> the HF tensors `hf` through `ops` (HF -> ours in order; inverses in reverse for export).

  `state`: the arrays are model state (MoE balance biases), not parameters. `missing`: our value when the checkpoint
  lacks the tensor; with no `hf` at all the value HF cannot hold, and export refuses anything else (`why`)."""
  ours: tuple[str, ...]
  hf: tuple[str, ...]
  ops: tuple = ()
  state: bool = False
  missing: np.ndarray | None = None
  why: str = ""

  def read(self, tensors: "_Tensors") -> list[np.ndarray]:
    if self.missing is not None and (not self.hf or self.hf[0] not in tensors):
      return [self.missing]
    arrays = [tensors[key] for key in self.hf]
    try:
      for op in self.ops:
        arrays = op.to_ours(arrays)
    except ValueError as e:
      raise HFConversionError(f"tensor {self.hf[0]} cannot be mapped to {self.ours[0]}: {e}") from e
    return arrays

  def write(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    if not self.hf:
      if not np.array_equal(arrays[0], self.missing):
        raise HFConversionError(self.why)
      return {}
    for op in reversed(self.ops):
      arrays = op.to_hf(arrays)
    return dict(zip(self.hf, arrays, strict=True))


def W(ours: str | list[str], hf: str | list[str], *ops, **options) -> Rule:  # pylint: disable=invalid-name
  """A `Rule`; one path or tensor may be given as a plain string."""
  as_tuple = lambda names: (names,) if isinstance(names, str) else tuple(names)
  return Rule(as_tuple(ours), as_tuple(hf), ops, **options)


@dataclasses.dataclass(frozen=True)
class OneOf:
  """Alternative HF layouts of the same arrays: export writes the first; import reads the first whose first tensor
  the checkpoint has (else the first, which then names what is missing)."""
  layouts: tuple[tuple[Rule, ...], ...]

  def choose(self, tensors: "_Tensors | None") -> tuple[Rule, ...]:
    for layout in self.layouts:
      if tensors is not None and layout[0].hf[0] in tensors:
        return layout
    return self.layouts[0]


def _each_rule(rules: list, tensors: "_Tensors | None" = None) -> Iterator[Rule]:
  for rule in rules:
    yield from rule.choose(tensors) if isinstance(rule, OneOf) else (rule,)


# ====================================================================================== the table
def _deinterleave(rope_dim: int) -> np.ndarray:
  """Our rotary feature i is the checkpoint's feature perm[i]: even features first, then odd ones."""
  return np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])


def _lm_head(spec: ModelSpec) -> list:
  return [] if spec.tie_embeddings else [W("head", "lm_head.weight", T)]


def _named(pairs, ours: str, hf: str, *ops) -> list[Rule]:
  """One rule per (our name, HF name) under the two prefixes, all with the same ops."""
  return [W(ours + a, hf + b, *ops) for a, b in pairs]


def _gpt2_rules(spec: ModelSpec) -> list:
  h, hd = spec.num_heads, spec.head_dim
  rules = _named((("embed.embedding", "wte.weight"), ("positions.embedding", "wpe.weight"),
                  ("final_norm.scale", "ln_f.weight"), ("final_norm.bias", "ln_f.bias")), "", "transformer.")
  for i in range(spec.num_layers):
    ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
    rules += _named((("attn_norm.scale", "ln_1.weight"), ("attn_norm.bias", "ln_1.bias"),
                     ("ffn_norm.scale", "ln_2.weight"), ("ffn_norm.bias", "ln_2.bias"),
                     ("attn.bo", "attn.c_proj.bias"), ("ffn.up", "mlp.c_fc.weight"), ("ffn.up_bias", "mlp.c_fc.bias"),
                     ("ffn.down", "mlp.c_proj.weight"), ("ffn.down_bias", "mlp.c_proj.bias")), ours, hf)
    # Conv1D stores [in, out]: the fused q|k|v projection is only split and cut into heads.
    rules += [W([ours + f"attn.w{x}" for x in "qkv"], hf + "attn.c_attn.weight", Split(1, (h * hd,) * 3),
                Unflatten(1, (h, hd))),
              W([ours + f"attn.b{x}" for x in "qkv"], hf + "attn.c_attn.bias", Split(0, (h * hd,) * 3),
                Unflatten(0, (h, hd))),
              W(ours + "attn.wo", hf + "attn.c_proj.weight", Unflatten(0, (h, hd)))]
  return rules + _lm_head(spec)


def _gqa_rules(spec: ModelSpec, ours: str, hf: str) -> list:
  hd = spec.head_dim
  return [W(ours + "wq", hf + "q_proj.weight", T, Unflatten(1, (spec.num_heads, hd))),
          *_named((("wk", "k_proj.weight"), ("wv", "v_proj.weight")), ours, hf, T,
                  Unflatten(1, (spec.num_kv_heads, hd))),
          W(ours + "wo", hf + "o_proj.weight", T, Unflatten(0, (spec.num_heads, hd)))]


def _mla_rules(spec: ModelSpec, ours: str, hf: str, interleaved: bool) -> list:
  h, nope, rope, v, c = (spec.num_heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim,
                         spec.kv_lora_rank)
  rotary = tuple(_deinterleave(rope) if interleaved else range(rope))
  # Within each head: the nope features, then the rotary ones.
  query = (T, Unflatten(1, (h, nope + rope)), Permute(2, tuple(range(nope)) + tuple(nope + r for r in rotary)))
  if spec.q_lora_rank:
    rules = [W(ours + "wq_down", hf + "q_a_proj.weight", T), W(ours + "q_norm.scale", hf + "q_a_layernorm.weight"),
             W(ours + "wq_up", hf + "q_b_proj.weight", *query)]
  else:
    rules = [W(ours + "wq", hf + "q_proj.weight", *query)]
  return rules + [
      # [kv_lora + rope, d]: the latent, then the shared rotary key.
      W([ours + "wkv_down", ours + "wk_rope"], hf + "kv_a_proj_with_mqa.weight", Split(0, (c, rope)), T,
        At(1, Permute(1, rotary))),
      W(ours + "kv_norm.scale", hf + "kv_a_layernorm.weight"),
      # [heads * (nope + v), kv_lora]: per head the key (no position) rows, then the value rows.
      W([ours + "wk_up", ours + "wv_up"], hf + "kv_b_proj.weight", Unflatten(0, (h, nope + v)), Split(1, (nope, v)),
        Transpose((2, 0, 1))),
      W(ours + "wo", hf + "o_proj.weight", T, Unflatten(0, (h, v)))]


def _swiglu_rules(ours: str, hf: str) -> list:
  return _named(((x, f"{x}_proj.weight") for x in ("gate", "up", "down")), ours, hf, T)


def _moe_rules(spec: ModelSpec, layer: int, ours: str, hf: str, model_type: str) -> list:
  e, hidden = spec.n_routed_experts, spec.expert_hidden
  per_expert = tuple(W(ours + f"w_{x}", [f"{hf}experts.{j}.{x}_proj.weight" for j in range(e)], T, Stack())
                     for x in ("gate", "up", "down"))
  fused = (W([ours + "w_gate", ours + "w_up"], hf + "experts.gate_up_proj", Split(1, (hidden, hidden)),
             Transpose((0, 2, 1))),  # transformers' in-memory layout: [E, 2I, d] and [E, d, I]
           W(ours + "w_down", hf + "experts.down_proj", Transpose((0, 2, 1))))
  rules = [W(ours + "router", hf + "gate.weight", T), OneOf((per_expert, fused))]
  if spec.n_shared_experts:
    rules += _swiglu_rules(ours + "shared.", hf + "shared_experts.")
  zeros = np.zeros((e,), np.float32)
  if model_type == "deepseek_v3":
    return rules + [W(ours + "balance_bias", hf + "gate.e_score_correction_bias", state=True, missing=zeros)]
  return rules + [W(ours + "balance_bias", [], state=True, missing=zeros,
                    why=f"cannot export to {model_type}: block {layer} has a nonzero router balance bias "
                        "(DeepSeek-V2 has no e_score_correction_bias)")]


def _decoder_rules(spec: ModelSpec, model_type: str, interleaved: bool) -> list:
  """Llama and DeepSeek: `model.layers.{i}` of attention (GQA or MLA) and feed-forward (SwiGLU or MoE)."""
  rules = [W("embed.embedding", "model.embed_tokens.weight"), W("final_norm.scale", "model.norm.weight")]
  for i in range(spec.num_layers):
    ours, hf = f"blocks.{i}.", f"model.layers.{i}."
    rules += _named((("attn_norm.scale", "input_layernorm.weight"),
                     ("ffn_norm.scale", "post_attention_layernorm.weight")), ours, hf)
    if spec.attention == "mla":
      rules += _mla_rules(spec, ours + "attn.", hf + "self_attn.", interleaved)
    else:
      rules += _gqa_rules(spec, ours + "attn.", hf + "self_attn.")
    if spec.is_moe_layer(i):
      rules += _moe_rules(spec, i, ours + "ffn.", hf + "mlp.", model_type)
    else:
      rules += _swiglu_rules(ours + "ffn.", hf + "mlp.")
  return rules + _lm_head(spec)


def _rules(hf: dict, spec: ModelSpec) -> list:
  if hf["model_type"] == "gpt2":
    return _gpt2_rules(spec)
  return _decoder_rules(spec, hf["model_type"], rope_interleaved(hf))


def _ignorable(hf: dict, spec: ModelSpec) -> Callable[[str], bool]:
  """Checkpoint tensors no rule reads and that cannot change the logits."""
  if hf["model_type"] == "gpt2":
    return lambda key: key.endswith((".attn.bias", ".attn.masked_bias"))  # the causal-mask buffers

  def ignorable(key: str) -> bool:
    # Tied checkpoints may still carry lm_head; rotary caches are buffers; MTP modules sit past the last layer.
    if key == "lm_head.weight" and spec.tie_embeddings:
      return True
    if key.endswith("rotary_emb.inv_freq"):
      return True
    parts = key.split(".")
    return len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() and int(parts[2]) >= spec.num_layers

  return ignorable


# ====================================================================================== the two directions
class _Tensors:
  """HF tensors by name with a consumption check, so an unexpected tensor is an error rather than ignored."""

  def __init__(self, tensors: dict[str, np.ndarray]):
    self.tensors = tensors
    self.used: set[str] = set()

  def __contains__(self, key: str) -> bool:
    return key in self.tensors

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self.tensors:
      raise HFConversionError(f"tensor {key} is missing from the checkpoint")
    self.used.add(key)
    return np.asarray(self.tensors[key], np.float32)

  def check_leftovers(self, ignorable: Callable[[str], bool]) -> None:
    unknown = sorted(k for k in set(self.tensors) - self.used if not ignorable(k))
    if unknown:
      raise HFConversionError(f"tensor {unknown[0]} is not used by the converted model "
                              f"({len(unknown)} unused: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''})")


def _nest(tree: dict, path: str, value: np.ndarray) -> None:
  """tree["blocks"][0]["attn"]["wq"] = value for path "blocks.0.attn.wq" (layer indices as ints, like nnx)."""
  *parents, leaf = [int(k) if k.isdigit() else k for k in path.split(".")]
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def _flatten(tree: dict) -> dict[str, np.ndarray]:
  """The inverse of `_nest`: dotted path -> float32 array."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(str(k.key) for k in path): np.asarray(leaf, np.float32) for path, leaf in leaves}


def params_from_hf(tensors: dict[str, np.ndarray], hf: dict, config: ml_collections.ConfigDict):
  """(params, model_state) as nested pure dicts in the loop layout of `Transformer(config.model)`."""
  spec = ModelSpec.from_config(config.model)
  if hf["model_type"] == "gpt2":  # GPT2Model checkpoints drop the "transformer." prefix of GPT2LMHeadModel's
    tensors = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in tensors.items()}
  t = _Tensors(tensors)
  params: dict[str, Any] = {}
  model_state: dict[str, Any] = {}
  for rule in _each_rule(_rules(hf, spec), t):
    for path, value in zip(rule.ours, rule.read(t), strict=True):
      _nest(model_state if rule.state else params, path, value)
  t.check_leftovers(_ignorable(hf, spec))
  return params, model_state


def hf_from_params(params: dict, model_state: dict, hf: dict,
                   config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """HF tensors (nn.Linear layout, DeepSeek rotary rows as `hf` says) from our loop-layout pure-dict params and
  model state, for the HF config dict `hf` (`hf_config.hf_config_from`)."""
  ours = {**_flatten(params), **_flatten(model_state)}
  out: dict[str, np.ndarray] = {}
  for rule in _each_rule(_rules(hf, ModelSpec.from_config(config.model))):
    missing = [path for path in rule.ours if path not in ours]
    if missing:
      raise HFConversionError(f"cannot export to {hf['model_type']}: the model has no {missing[0]}")
    out.update(rule.write([ours.pop(path) for path in rule.ours]))
  if ours:
    raise HFConversionError(f"cannot export to {hf['model_type']}: no Hugging Face tensor holds {sorted(ours)[0]}")
  return out
