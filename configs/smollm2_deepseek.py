"""SmolLM2-DeepSeek (reference project 003): a SmolLM2-shaped GQA decoder (hidden 384, 24 layers, 6 heads / 2 KV heads, rope
theta 1e5) whose FFN is a mixture of 8 SwiGLU experts (width 1024), top-2, balanced WITHOUT an auxiliary loss:
DeepSeek-V3's per-expert selection bias, b += 0.001 * sign(mean load - load) after every optimizer step (the reference project's
"loss-less load balancing", whose router had no gradient and whose model had no causal mask).

Presets (``--config=configs/smollm2_deepseek.py:PRESET``):
  default  the reference project's widths; vocabulary 8192 of our own tokenizer (the reference project used SmolLM2's 49152 pieces).
  tiny     the same shape of model at CPU size.
"""

from superlm_jax.config import CPU_TINY_DATA, CPU_TINY_TRAIN, accelerator_preset, apply_preset, base_config

PRESETS = {
    "default": dict(
        model=dict(vocab_size=8192, d_model=384, num_layers=24, num_heads=6, num_kv_heads=2, d_ff=1024,
                   max_seq_len=512),
        data=dict(max_length=512, stride=256),
        train=dict(learning_rate=3e-4, warmup_steps=200, steps=5000),
    ),
    "tiny": dict(
        model=dict(vocab_size=4096, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=256,
                   max_seq_len=128),
        data=CPU_TINY_DATA,
        train=CPU_TINY_TRAIN,
    ),
}
# Every size but `tiny` is for accelerators: scan over layers and full remat (superlm_jax/config.py).
PRESETS = {name: preset if name == "tiny" else accelerator_preset(preset) for name, preset in PRESETS.items()}


def get_config(preset=None):
  c = base_config()
  c.name = "smollm2_deepseek"
  c.model.update(attention="mha", norm="rmsnorm", positions="rope", rope_theta=1e5, mlp="swiglu", use_bias=False,
                 tie_embeddings=True, n_routed_experts=8, n_shared_experts=0, num_experts_per_tok=2,
                 router_scoring="softmax", norm_topk_prob=True)
  c.train.update(moe_bias_update_rate=0.001)
  c.train.workdir = f"runs/smollm2_deepseek_{preset or 'default'}"
  return apply_preset(c, PRESETS, preset, default="default")
