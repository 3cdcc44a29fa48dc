"""MoE load-balancing study (reference project 002 and 003): one Mixture-of-Experts decoder trained three times, once per
balancing scheme, on the same data, steps and seed.

``python -m superlm_jax.experiments.moe_balance --config=configs/moe_balance.py:PRESET``

Sections (each a full superlm_jax config, see superlm_jax/config.py):
  no_balancing  alpha = beta = gamma = 0: the router learns whatever load the cross-entropy gives it.
  aux_loss      reference project 002's scheme: the Switch load-balancing loss alpha * E * sum_i f_i P_i with alpha = 0.01
                (Fedus et al. 2021, eq. 4) plus the ST-MoE router z-loss beta * mean(logsumexp(logits)^2) with
                beta = 0.001 (Zoph et al. 2022, eq. 5), both averaged over the MoE layers.
  aux_free      reference project 003's scheme: DeepSeek-V3 auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664;
                DeepSeek-V3 sec. 2.1.2): a per-expert bias added to the routing scores for the top-k SELECTION
                only, moved after every optimizer step by b_i += gamma * sign(mean load - load_i), and no
                auxiliary loss at all (alpha = beta = 0).
  study         `out_dir` (report.md, report.json, PNGs and the run directories no_balancing/, aux_loss/,
                aux_free/) and `maxvio_last`, how many of the last logged training steps the final MaxVio
                averages over.

The model is SmolLM2-DeepSeek's shape (configs/smollm2_deepseek.py: GQA, RMSNorm, RoPE theta 1e5, 8 routed SwiGLU
experts, top-2, softmax router with renormalised top-k weights, no shared expert, dropless dispatch) at CPU size.
Without a shared expert every token's FFN output comes from the routed experts, so their balance matters most.
The dropless dispatch never drops a token, so the three runs differ in routing only, not in how many tokens the
experts see (with capacity dispatch an unbalanced router would also lose tokens, mixing two effects).

Every key the three runs share (model, data, optimiser, steps, seed, batch, ...) is one ml_collections
FieldReference: `--config.aux_free.train.steps=50` changes all three runs. Only train.moe_aux_loss_coef,
train.moe_z_loss_coef, train.moe_bias_update_rate and train.workdir differ (the study's `COMPARISON`, declared in
superlm_jax/experiments/moe_balance.py, which checks any config it is given against it); the run directories follow
`study.out_dir`.

gamma. DeepSeek-V3 and Wang et al. use gamma = 0.001 over tens to hundreds of thousands of steps; a short run
could need more, because the sign update moves a bias by at most gamma per step while the router collapses onto
two experts within the first ~10 steps here, in every run (probably because early training pushes all tokens'
hidden states towards one shared direction, so every token prefers the same experts; not verified), and undoing
that takes biases of a few tenths (softmax scores are probabilities, 1/8 each at uniform routing). A pilot, the
`tiny` model trained 300 steps per run, measured the training-batch MaxVio (mean of the last 5 logs, log_every 10):
  no balancing 2.20   aux loss 0.87   gamma = 0.001: 0.30   gamma = 0.003: 0.33   gamma = 0.01: 0.57
With 0.001 MaxVio fell from ~3 to below 0.6 by step ~180 and the biases reached |b| ~0.3; 0.003 ended no better,
and 0.01 ended worse (presumably its larger steps keep every bias oscillating around its balancing value). So gamma
stays at V3's 0.001 for `default` (750 steps); the `tiny` run (30 steps) is for CI and only checks that the biases
move.

Presets:
  preset   d / layers / heads (kv) / experts x width / ctx / vocab   steps x batch x ctx   logs every
  tiny     64 / 2 / 4 (2) / 8 x 128 / 64 / 512                      30 x 8 x 64           5 steps
  default  128 / 4 / 4 (2) / 8 x 256 / 128 / 4096                    750 x 8 x 128         10 steps

`default` is smollm2_deepseek:tiny's model (3.9M parameters, 1.5M active per token) trained on 768k tokens (0.4
passes over the 4096-piece Shakespeare training split). Its dropless MoE step is the expensive part: jax 0.10's CPU
`ragged_dot` runs ~15x slower than a dense matmul of the same FLOPs ([4096, 128] x [8, 128, 256]: 45 ms vs 2.9 ms
for one expert's worth), so a step of 8 x 128 tokens takes 0.5-1.3 s on a 2-core CPU depending on other load, and
the three runs take about 30-45 minutes together. Batch 8 rather than 16 buys twice the steps (the bias moves per
step) for the same tokens. `tiny` is the CI-sized twin (about 50 s).
"""

from __future__ import annotations

import ml_collections

from superlm_jax.config import apply_preset, base_config
from superlm_jax.experiments.common import study_config
from superlm_jax.experiments.moe_balance import COMPARISON

# The balancing coefficients (train.moe_*) of each of COMPARISON's runs.
BALANCING = {
    "no_balancing": dict(moe_aux_loss_coef=0.0, moe_z_loss_coef=0.0, moe_bias_update_rate=0.0),
    "aux_loss": dict(moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001, moe_bias_update_rate=0.0),
    "aux_free": dict(moe_aux_loss_coef=0.0, moe_z_loss_coef=0.0, moe_bias_update_rate=0.001),
}

# SmolLM2-DeepSeek's architecture (configs/smollm2_deepseek.py), widths set by the presets.
_MOE = dict(attention="mha", norm="rmsnorm", positions="rope", rope_theta=1e5, mlp="swiglu", use_bias=False,
            tie_embeddings=True, n_routed_experts=8, n_shared_experts=0, num_experts_per_tok=2,
            router_scoring="softmax", norm_topk_prob=True, moe_dispatch="dropless")

PRESETS = {
    "tiny": dict(
        model=dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128, max_seq_len=64),
        data=dict(max_length=64, stride=32),
        train=dict(steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=5, log_every=5, eval_every=15,
                   eval_batches=4, ckpt_every=15, sample_every=0),
        study=dict(maxvio_last=3, out_dir="runs/moe_balance_tiny"),
    ),
    "default": dict(
        model=dict(vocab_size=4096, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=256,
                   max_seq_len=128),
        data=dict(max_length=128, stride=64),
        train=dict(steps=750, batch_size=8, learning_rate=2e-3, warmup_steps=60, log_every=10, eval_every=125,
                   eval_batches=40, ckpt_every=250, sample_every=0),
        study=dict(maxvio_last=10, out_dir="runs/moe_balance"),
    ),
}


def study_defaults() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.maxvio_last = 10  # Final MaxVio = mean over this many of the last logged training steps (batch MaxVio is noisy).
  s.out_dir = "runs/moe_balance"  # Report, figures, and the run directories no_balancing/, aux_loss/, aux_free/.
  return s


def _run_config(preset: str, overrides: dict, scheme: str) -> ml_collections.ConfigDict:
  c = base_config()
  c.name = f"moe_balance/{scheme}"
  c.model.update(**_MOE)
  section = {key: overrides[key] for key in ("model", "data", "train")}
  section["train"] = dict(section["train"], **BALANCING[scheme])
  return apply_preset(c, {preset: section}, preset, default=preset)


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  # Every key but the balancing coefficients and workdir is tied to the first run's: an override changes all three.
  return study_config(COMPARISON, PRESETS, preset, study_defaults, _run_config)
