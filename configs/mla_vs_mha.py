"""MHA vs MLA study (reference project 004): two Llama-style dense decoders that differ only in their attention.

``python -m superlm_jax.experiments.mla_vs_mha --config=configs/mla_vs_mha.py:PRESET``

Sections:
  mha    a full superlm_jax config (see superlm_jax/config.py): RMSNorm, RoPE, SwiGLU, tied embeddings, multi-head
         attention (Vaswani et al. 2017) with num_kv_heads = num_heads.
  mla    the same config with model.attention='mla': DeepSeek-V2 Multi-head Latent Attention (arXiv 2405.04434,
         sec. 2.1), no query compression (q_lora_rank=0, as in DeepSeek-V2-Lite).
  study  what the report measures: `long_context` (tokens) and `long_context_batch` for the training-memory and
         KV-cache figures, `decode_prompt` / `decode_tokens` for decode speed, `decode_repeats` timed
         generations, `timing_windows` x `timing_steps` for the step-time measurement, and `out_dir`, which
         holds report.md/report.json/PNGs and the two run directories `mha/` and `mla/`.

Every key the two models share (width, depth, heads, FFN, data, optimiser, steps, seed, batch, LR, ...) is one
ml_collections FieldReference: `--config.mha.train.steps=500` (or `--config.mla.train.steps=500`) changes both
runs, so they cannot drift apart and see the same data in the same order. Only model.attention and the MLA ranks
differ: the comparison is declared once, as `COMPARISON` in superlm_jax/experiments/mla_vs_mha.py, and
`comparison_config` builds the sections from it. The run directories follow `study.out_dir`.

KV-cache values per token and layer (bf16 in the report), MHA 2 * heads * head_dim vs MLA kv_lora_rank +
qk_rope_head_dim (the latent c_kv and the one shared rotary key):

  preset   d / heads / layers / ffn / ctx   kv_lora  nope  rope  v    MLA cache  MHA cache  MHA/MLA
  tiny     64 / 4 / 2 / 128 / 64            16       16    8     16   24         128        5.33x
  default  192 / 4 / 4 / 512 / 128          48       48    16    48   64         384        6.00x

The latent is far narrower than the model width (48 vs 192), so MLA compresses; the reference project's "MLA" used a latent
wider than d_model and so expanded the cache instead. The default widths are MiniDeepSeek-tiny's
(configs/minideepseek.py:tiny) with the same MLA ranks.

`default` trains each model for 1200 steps of 16 x 128 tokens (2.5M tokens, ~1.3 passes over the 1.8M training
tokens of the 4096-piece Shakespeare data). On a 2-core CPU a step of either model takes 0.4-0.8 s depending on
other load; the measured run took 31 minutes for both trainings and the measurements (27 + 4), and rerunning only
re-measures (3-4 minutes), since the trainings resume as complete. `tiny` is the CI-sized twin (30 steps, under a
minute).
"""

from __future__ import annotations

import ml_collections

from superlm_jax.config import apply_preset, base_config, tie_shared_keys
from superlm_jax.experiments.common import study_config
from superlm_jax.experiments.mla_vs_mha import COMPARISON

_LLAMA = dict(norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False, tie_embeddings=True, norm_eps=1e-6)

PRESETS = {
    "tiny": dict(
        model=dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, d_ff=128, max_seq_len=64),
        mla=dict(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
        data=dict(max_length=64, stride=32),
        train=dict(steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=5, log_every=5, eval_every=15,
                   eval_batches=4, ckpt_every=15, sample_every=0),
        study=dict(long_context=256, long_context_batch=2, decode_prompt=16, decode_tokens=32, decode_repeats=3,
                   timing_windows=5, timing_steps=3, out_dir="runs/mla_vs_mha_tiny"),
    ),
    "default": dict(
        model=dict(vocab_size=4096, d_model=192, num_layers=4, num_heads=4, d_ff=512, max_seq_len=128),
        mla=dict(kv_lora_rank=48, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=48),
        data=dict(max_length=128, stride=64),
        train=dict(steps=1200, batch_size=16, learning_rate=2e-3, warmup_steps=60, log_every=20, eval_every=200,
                   eval_batches=20, ckpt_every=200, sample_every=0),
        study=dict(long_context=2048, long_context_batch=8, decode_prompt=32, decode_tokens=96, decode_repeats=5,
                   timing_windows=10, timing_steps=5, out_dir="runs/mla_vs_mha"),
    ),
}


def study_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.long_context = 2048  # Tokens per sequence for the training-memory and KV-cache-memory figures.
  s.long_context_batch = 8  # Sequences per batch for those figures.
  s.decode_prompt = 32  # Prompt length (tokens, taken from validation text) for the decode-speed measurement.
  s.decode_tokens = 96  # New tokens generated (greedy) per timed generation.
  s.decode_repeats = 3  # Timed generations after a warm-up one; the fastest is reported (and the median).
  s.timing_windows = 10  # Timed windows of the jitted train step (alternating MHA and MLA); median and fastest.
  s.timing_steps = 5  # Train steps per timed window.
  s.out_dir = "runs/mla_vs_mha"  # Report, figures, and the run directories mha/ and mla/.
  return s


def _model_config(preset: str, overrides: dict, attention: str) -> ml_collections.ConfigDict:
  c = base_config()
  c.name = f"mla_vs_mha/{attention}"
  c.model.update(**_LLAMA)
  section = {key: overrides[key] for key in ("model", "data", "train")}
  if attention == "mla":
    section["model"] = dict(overrides["model"], attention="mla", **overrides["mla"])
  return apply_preset(c, {preset: section}, preset, default=preset)


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  # Every key the comparison does not let differ is one reference, so an override of either section changes both.
  c = study_config(COMPARISON, PRESETS, preset, study_defaults, _model_config)
  # The decode and sampling settings too (comparison_config ties the model, data and train sections only).
  tie_shared_keys(c.mha, [c.mla], sections=("decode", "sample"))
  return c
