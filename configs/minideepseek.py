"""MiniDeepSeek (reference project 000): a Llama-style dense decoder (RMSNorm, SwiGLU, tied embeddings) with DeepSeek-V2/V3
Multi-head Latent Attention: a shared key/value latent plus one decoupled rotary key, so the decode cache holds
kv_lora_rank + qk_rope_head_dim values per token and layer.

Presets (``--config=configs/minideepseek.py:PRESET``), widths from the reference project; MLA ranks chosen here:

  preset   d / heads / layers / ffn   q_lora  kv_lora  nope  rope  v    cache values/token/layer  vs MHA
  tiny     192 / 4 / 4 / 512          0       48       48    16    48   64                        384 (6.0x)
  small    512 / 8 / 6 / 1376         0       128      64    32    64   160                       1024 (6.4x)
  default  768 / 12 / 12 / 2048       384     192      64    32    64   224                       1536 (6.9x)
  large    1024 / 16 / 24 / 2816      512     256      64    64    64   320                       2048 (6.4x)

Decode uses the absorbed form by default; ``--config.decode.absorb=False`` switches to the expanded form.
"""

from superlm_jax.config import CPU_TINY_DATA, CPU_TINY_TRAIN, accelerator_preset, apply_preset, base_config

_MLA = dict(attention="mla", norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False, tie_embeddings=True,
            norm_eps=1e-6)

PRESETS = {
    "tiny": dict(
        model=dict(vocab_size=4096, d_model=192, num_layers=4, num_heads=4, d_ff=512, max_seq_len=128,
                   q_lora_rank=0, kv_lora_rank=48, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=48),
        data=CPU_TINY_DATA,
        train=CPU_TINY_TRAIN,
    ),
    "small": dict(model=dict(d_model=512, num_heads=8, num_layers=6, d_ff=1376, max_seq_len=1024,
                             q_lora_rank=0, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                             v_head_dim=64),
                  data=dict(max_length=1024, stride=256)),
    "default": dict(model=dict(d_model=768, num_heads=12, num_layers=12, d_ff=2048, max_seq_len=1024,
                               q_lora_rank=384, kv_lora_rank=192, qk_nope_head_dim=64, qk_rope_head_dim=32,
                               v_head_dim=64),
                    data=dict(max_length=1024, stride=256)),
    "large": dict(model=dict(d_model=1024, num_heads=16, num_layers=24, d_ff=2816, max_seq_len=2048,
                             q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=64,
                             v_head_dim=64),
                  data=dict(max_length=2048, stride=512)),
}
# Every size but `tiny` is for accelerators: scan over layers and full remat (superlm_jax/config.py).
PRESETS = {name: preset if name == "tiny" else accelerator_preset(preset) for name, preset in PRESETS.items()}


def get_config(preset=None):
  c = base_config()
  c.name = "minideepseek"
  c.model.update(**_MLA)
  c.train.workdir = f"runs/minideepseek_{preset or 'default'}"
  return apply_preset(c, PRESETS, preset, default="default")
