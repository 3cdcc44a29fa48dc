"""DeepSeek (Mini) MoE + MLA (reference project 002): MLA attention, DeepSeekMoE feed-forward (8 routed + 1 shared SwiGLU
experts, top-2, softmax router with renormalised top-k weights), Switch load-balancing loss (0.01) + router z-loss
(0.001) averaged over layers, tied embeddings, RMSNorm eps 1e-5, RoPE theta 1e4.

Presets (``--config=configs/deepseek_mini.py:PRESET``):
  default  the reference project's model: hidden 576, 30 layers, 8 heads, MLA with kv latent 72 (= 576 / 8, the reference project's
           "compression ratio 8") and per-head dims 48 (no position) + 24 (rotary) / 72 (value), experts of width
           1536, ctx 128. The reference project used the SmolLM2 tokenizer (49152 pieces); we train our own, 8192 pieces, on
           the bundled corpus (49152 pieces cannot be learned from 6 MB of text).
  tiny     the same shape of model at CPU size: trains in minutes.
"""

from superlm_jax.config import CPU_TINY_DATA, CPU_TINY_TRAIN, accelerator_preset, apply_preset, base_config

PRESETS = {
    "default": dict(
        model=dict(vocab_size=8192, d_model=576, num_layers=30, num_heads=8, d_ff=1536, max_seq_len=128,
                   kv_lora_rank=72, qk_nope_head_dim=48, qk_rope_head_dim=24, v_head_dim=72,
                   moe_intermediate_size=1536),
        data=dict(max_length=128, stride=64),
        # 16 sequences per step as 4 micro-batches of 4: the float32 weights + AdamW state of 745M parameters
        # take 12 GB, and a single batch of 16 ran out of a 24 GB machine (measured peak with this: 20 GB).
        train=dict(learning_rate=3e-4, warmup_steps=200, steps=5000, batch_size=4, grad_accum_steps=4),
    ),
    "tiny": dict(
        model=dict(vocab_size=4096, d_model=128, num_layers=4, num_heads=4, d_ff=256, max_seq_len=128,
                   kv_lora_rank=32, qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=32,
                   moe_intermediate_size=256),
        data=CPU_TINY_DATA,
        train=CPU_TINY_TRAIN,
    ),
}
# Every size but `tiny` is for accelerators: scan over layers and full remat (superlm_jax/config.py).
PRESETS = {name: preset if name == "tiny" else accelerator_preset(preset) for name, preset in PRESETS.items()}


def get_config(preset=None):
  c = base_config()
  c.name = "deepseek_mini"
  c.model.update(attention="mla", norm="rmsnorm", norm_eps=1e-5, positions="rope", rope_theta=1e4, mlp="swiglu",
                 use_bias=False, tie_embeddings=True, n_routed_experts=8, n_shared_experts=1,
                 num_experts_per_tok=2, router_scoring="softmax", norm_topk_prob=True)
  c.train.update(moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001)
  c.train.workdir = f"runs/deepseek_mini_{preset or 'default'}"
  return apply_preset(c, PRESETS, preset, default="default")
