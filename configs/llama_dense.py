"""Llama-style dense decoder: RMSNorm, RoPE, SwiGLU, no biases; MHA/GQA/MQA via ``model.num_kv_heads``.

Presets (``--config=configs/llama_dense.py:PRESET``):
  tiny     CPU demo size with GQA (4 query heads, 2 KV heads).
  small    MiniDeepSeek-small widths without MLA (reference project 000): d 512, 8 heads, 6 layers, ffn 1376 (default preset).
  smollm2  SmolLM2-135M shape: d 576, 9 heads / 3 KV heads, 30 layers, ffn 1536, rope theta 1e5.
  llama1b  Llama-3.2-1B shape (1.24B params): d 2048, 32 heads / 8 KV heads, 16 layers, ffn 8192, vocab 128256,
           rope theta 5e5, tied embeddings, ctx 4096 (windows of 4096, stride 1024). Without Llama 3's RoPE
           frequency scaling (the 128k-context extension): a size for memory and throughput figures.
  350m     A 342M-parameter accelerator benchmark (benchmarks/device_suite.py): d 1024, 16 heads, 24 layers,
           ffn 2816, vocab 32768, bf16, 8 x 2048 tokens per step.
"""

from superlm_jax.config import CPU_TINY_DATA, CPU_TINY_TRAIN, accelerator_preset, apply_preset, base_config

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
    "llama1b": dict(model=dict(vocab_size=128256, d_model=2048, num_heads=32, num_kv_heads=8, num_layers=16,
                               d_ff=8192, max_seq_len=4096, rope_theta=5e5),
                    data=dict(max_length=4096, stride=1024)),
    "350m": dict(model=dict(vocab_size=32768, d_model=1024, num_heads=16, num_layers=24, d_ff=2816,
                            max_seq_len=2048),
                 data=dict(max_length=2048, stride=512), train=dict(batch_size=8, compute_dtype="bfloat16")),
}
# Every size but `tiny` is for accelerators: scan over layers and full remat (superlm_jax/config.py).
PRESETS = {name: preset if name == "tiny" else accelerator_preset(preset) for name, preset in PRESETS.items()}


def get_config(preset=None):
  c = base_config()
  c.name = "llama"
  c.model.update(norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False, tie_embeddings=True)
  c.train.workdir = f"runs/llama_{preset or 'small'}"
  return apply_preset(c, PRESETS, preset, default="small")
