"""SSMax x NoPE study (reference project 000/001, "Super-transformers"): one GPT-2-style decoder trained once per attention
scoring x position scheme, on the same data, steps, init seed and budget.

``python -m superlm_jax.experiments.ssmax_nope --config=configs/ssmax_nope.py:PRESET``

Sections (each a full superlm_jax config, see superlm_jax/config.py), named `<scoring>_<positions>`:
  softmax_learned, ssmax_learned   GPT-2's learned absolute position table (Radford et al. 2019).
  softmax_nope, ssmax_nope         no positional signal at all, the causal mask is the only source of order
                                   (NoPE: Haviv et al. 2022; Kazemnejad et al. 2023).
  softmax_rope, ssmax_rope         rotary embeddings (Su et al. 2021), theta 1e4.
  `ssmax` is Scalable-Softmax (Nakanishi 2025, arXiv 2501.19399): the logits of query i are multiplied by
  s_h * log n_i before the softmax, with n_i the number of keys query i sees (i + 1 under the causal mask) and s_h
  learned per head, initialised to 1.
  study   `variants` (comma-separated section names: which of the six to train and evaluate), the evaluation
          lengths (`eval_factor` x data.max_length for the loss per position; `probe_factors` x data.max_length for
          the retrieval probe), the probe's shape (`probe_trials`, `probe_key_len`, `probe_key_offset`,
          `probe_pool`, `probe_seed`), `position_windows`, `eval_batch`, and `out_dir`, which holds report.md,
          report.json, the PNGs and one run directory per variant.

Every key the runs share (width, depth, heads, FFN, data, optimiser, steps, seeds, batch, LR, ...) is one
ml_collections FieldReference: `--config.softmax_learned.train.steps=500` changes all six runs, so they see the same
data in the same order. Only model.scoring, model.positions and train.workdir differ. model.max_seq_len is a
reference to data.max_length, so every run is built for exactly its training length (a learned table has only
trained rows). The study rebuilds the NoPE and RoPE models with a longer max_seq_len to evaluate them at up to
`eval_factor` x the training length: their parameters do not depend on max_seq_len (no position table), so the
trained weights load unchanged. A learned table has no row for a position it was not built with, so learned models
are evaluated up to 1x only.

Presets (GPT-2 block: LayerNorm, GELU MLP, biases, tied embeddings; 4 heads):
  preset   d / layers / ffn / ctx / vocab     steps x batch x ctx   eval to   probe lengths
  tiny     48 / 2 / 128 / 32 / 512            24 x 8 x 32           128       32, 64, 128
  default  128 / 4 / 512 / 128 / 4096         800 x 16 x 128        512       128, 256, 512

`default` trains each of the six models on 1.6M tokens (0.9 passes over the 1.8M training tokens of the 4096-piece
Shakespeare split). The measured study took 52.6 minutes on a 2-core CPU shared with other jobs (load average 3-8):
47 minutes of training, 5-11 minutes per run depending on the load, and 5 minutes of evaluation. The least disturbed
run (softmax_nope: 308 s with compilation and evaluations, 0.3-0.4 s per step) puts the whole study at about 35
minutes on an idle machine. Rerunning resumes finished runs and only re-evaluates (5 minutes). `tiny` is the
CI-sized twin (about 30 s).
"""

from __future__ import annotations

import ml_collections

from superlm_jax.config import apply_preset, base_config
from superlm_jax.experiments.common import study_config
# The sections (section name -> (model.scoring, model.positions)) and the only keys in which they may differ.
from superlm_jax.experiments.ssmax_nope import ALL_VARIANTS, COMPARISON

# GPT-2's block (reference project 000/001): pre-LayerNorm, GELU MLP, biases, tied output head.
_GPT2 = dict(norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True, attention="mha", num_kv_heads=0,
             ssmax_bias=False, rope_theta=1e4)

PRESETS = {
    "tiny": dict(
        model=dict(vocab_size=512, d_model=48, num_layers=2, num_heads=4, d_ff=128),
        data=dict(max_length=32, stride=16),
        train=dict(steps=24, batch_size=8, learning_rate=3e-3, warmup_steps=4, log_every=4, eval_every=12,
                   eval_batches=2, ckpt_every=12, sample_every=0),
        study=dict(eval_factor=4, probe_factors=(1, 2, 4), probe_trials=8, probe_key_len=6, probe_key_offset=4,
                   probe_pool=256, position_windows=8, eval_batch=8, out_dir="runs/ssmax_nope_tiny"),
    ),
    "default": dict(
        model=dict(vocab_size=4096, d_model=128, num_layers=4, num_heads=4, d_ff=512),
        data=dict(max_length=128, stride=64),
        train=dict(steps=800, batch_size=16, learning_rate=2e-3, warmup_steps=60, log_every=20, eval_every=100,
                   eval_batches=20, ckpt_every=400, sample_every=0),
        study=dict(eval_factor=4, probe_factors=(1, 2, 4), probe_trials=128, probe_key_len=10, probe_key_offset=8,
                   probe_pool=1024, position_windows=256, eval_batch=8, out_dir="runs/ssmax_nope"),
    ),
}


def study_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.variants = ",".join(COMPARISON.runs)  # Which sections to train and evaluate, comma-separated, in report order.
  s.eval_factor = 4  # Loss per position on validation windows of eval_factor x data.max_length tokens.
  s.position_windows = 256  # How many such windows (spread evenly over the validation split).
  s.probe_factors = (1, 2, 4)  # Retrieval-probe context lengths, in multiples of data.max_length (<= eval_factor).
  s.probe_trials = 128  # Probe sequences per length (each scored with and without the planted key).
  s.probe_key_len = 10  # Tokens in the random "passkey"; the probe scores the copy of its last probe_key_len - 1.
  s.probe_key_offset = 8  # Validation-text tokens before the planted key (the key is planted this early).
  s.probe_pool = 1024  # Key tokens are drawn from the training split's probe_pool most frequent ordinary pieces.
  s.probe_seed = 0  # Seed of the probe's filler offsets and keys (the same probe for every variant).
  s.eval_batch = 8  # Sequences per batch in the long-context evaluations.
  s.out_dir = "runs/ssmax_nope"  # Report, figures, and one run directory per variant.
  return s


def _run_config(preset: str, overrides: dict, variant: str) -> ml_collections.ConfigDict:
  c = base_config()
  c.name = f"ssmax_nope/{variant}"
  scoring, positions = ALL_VARIANTS[variant]
  c.model.update(**_GPT2)
  section = {key: overrides[key] for key in ("model", "data", "train")}
  section["model"] = dict(section["model"], scoring=scoring, positions=positions)
  return apply_preset(c, {preset: section}, preset, default=preset)


def _train_length_context(runs: dict) -> None:
  # Built for exactly the training length: a learned table then has no untrained rows, and the NoPE/RoPE models are
  # rebuilt longer only for evaluation (their parameters do not depend on max_seq_len).
  first = runs[COMPARISON.runs[0]]
  first.model.max_seq_len = first.data.get_ref("max_length")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  # Every key but the scoring, the positions and the run directory is tied to the first run's, so an override in
  # any section changes all six runs.
  return study_config(COMPARISON, PRESETS, preset, study_defaults, _run_config, adjust_runs=_train_length_context)
