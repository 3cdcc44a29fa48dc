"""GPT-2 family (reference projects 000/001, "super-transformers"): pre-LayerNorm, GELU MLP, learned or no positions,
softmax or Scalable-Softmax attention.

Presets (``--config=configs/gpt2_small.py:PRESET``):
  tiny     ~2.5M params, CPU demo size: trains in minutes on 2 cores.
  small    the reference project's small model: d 768, 8 heads, 6 layers, ffn 2048, ctx 1024 (default preset).
  default  the reference project's default: d 1024, 16 heads, 24 layers, ffn 4096, ctx 2048.
  large    the reference project's large: d 1280, 20 heads, 36 layers, ffn 5120, ctx 4096.
NoPE: ``--config.model.positions=none``; SSMax: ``--config.model.scoring=ssmax``.
"""

from superlm_jax.config import CPU_TINY_DATA, CPU_TINY_TRAIN, accelerator_preset, apply_preset, base_config

_SEED_DATA = dict(max_length=1024, stride=256)

PRESETS = {
    "tiny": dict(
        model=dict(vocab_size=4096, d_model=192, num_layers=4, num_heads=4, d_ff=768, max_seq_len=128),
        data=CPU_TINY_DATA,
        train=CPU_TINY_TRAIN,
    ),
    "small": dict(model=dict(d_model=768, num_heads=8, num_layers=6, d_ff=2048, max_seq_len=1024),
                  data=_SEED_DATA),
    "default": dict(model=dict(d_model=1024, num_heads=16, num_layers=24, d_ff=4096, max_seq_len=2048),
                    data=_SEED_DATA),
    "large": dict(model=dict(d_model=1280, num_heads=20, num_layers=36, d_ff=5120, max_seq_len=4096),
                  data=_SEED_DATA),
}
# Every size but `tiny` is for accelerators: scan over layers and full remat (superlm_jax/config.py).
PRESETS = {name: preset if name == "tiny" else accelerator_preset(preset) for name, preset in PRESETS.items()}


def get_config(preset=None):
  c = base_config()
  c.name = "gpt2"
  c.model.update(norm="layernorm", positions="learned", mlp="gelu", use_bias=True, tie_embeddings=True)
  c.train.workdir = f"runs/gpt2_{preset or 'small'}"
  return apply_preset(c, PRESETS, preset, default="small")
