"""Llama-style dense decoder: RMSNorm, RoPE, SwiGLU, no biases; MHA/GQA/MQA via ``model.num_kv_heads``.

Presets (``--config=configs/llama_dense.py:PRESET``):
  tiny     CPU demo size with GQA (4 query heads, 2 KV heads).
  small    MiniDeepSeek-small widths without MLA (seed 000): d 512, 8 heads, 6 layers, ffn 1376 (default preset).
  smollm2  SmolLM2-135M shape: d 576, 9 heads / 3 KV heads, 30 layers, ffn 1536, rope theta 1e5.
"""

from superlm_jax.config import CPU_TINY_DATA, CPU_TINY_TRAIN, apply_preset, base_config

PRESETS = {
    "tiny": dict(
        model=dict(vocab_size=4096, d_model=192, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=512,
                   max_seq_len=128),
        data=CPU_TINY_DATA,
        train=CPU_TINY_TRAIN,
    ),
    "small": dict(model=dict(d_model=512, num_heads=8, num_layers=6, d_ff=1376, max_seq_len=1024),
                  data=dict(max_length=1024, stride=256)),
    "smollm2": dict(model=dict(vocab_size=49152, d_model=576, num_heads=9, num_kv_heads=3, num_layers=30,
                               d_ff=1536, max_seq_len=2048, rope_theta=1e5),
                    data=dict(max_length=2048, stride=512)),
}


def get_config(preset=None):
  c = base_config()
  c.name = "llama"
  c.model.update(norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False, tie_embeddings=True)
  c.train.workdir = f"runs/llama_{preset or 'small'}"
  return apply_preset(c, PRESETS, preset, default="small")
