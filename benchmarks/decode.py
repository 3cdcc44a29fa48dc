"""Decode latency of a model three ways: full recompute, KV/latent cache (expanded MLA), latent cache (absorbed MLA).

  python benchmarks/decode.py --config=configs/minideepseek.py:small [--prompt_lengths=64,128,256,512]
      [--new_tokens=50] [--batch=1] [--repeats=3] [--out_dir=benchmarks/results/decode]

Why: the reference project claimed that the KV cache and the absorbed MLA form took decoding from 10-11 ms to 7.5 ms per
token and the first token from 100-200 ms to 10 ms (~3x in total, on CUDA). This script measures those claims here,
on random weights (seed 0: latency does not depend on the values), greedily, for each prompt length:

  no_cache        for every new token, a jitted forward over the whole sequence so far, logits read at the last
                  real position. To avoid one compilation per length the sequence sits in a zero-padded buffer
                  rounded up to `--recompute_bucket` tokens (causality makes the padding irrelevant to the logits),
                  so a step costs a forward over up to bucket-1 extra tokens (0 = one fixed buffer of
                  prompt + new tokens, the worst case). The forward is `model(tokens)`, so it also computes the
                  output head at every position, as a plain recompute loop does.
  cache_expanded  `Generator(model, absorb=False)`: prefill once, then one-token steps that re-expand the cached
                  latents into per-head keys and values (MLA eq. 10-11) at every step.
  cache_absorbed  `Generator(model, absorb=True)`: the same prefill, then one-token steps that attend in latent space
                  (W_UK folded into the query, W_UV applied after attending).

Both cached methods attend over the whole preallocated cache buffer (the Generator rounds it up to a multiple of
64), masked by position, so their step cost does not grow with the position inside one generation.

Every (method, prompt length) pair first runs once untimed (compilation and warm-up), then `--repeats` timed runs,
interleaved across methods so background load hits them alike; medians are reported. Clocks are read after the new
token is on the host (the Generator's `on_tokens` callback receives host numpy tokens), so device work is done:
  total       the whole generate call (cache allocation, prefill, all steps);
  first       time to first token: from the call until the first token is on the host;
  per token   the mean gap between consecutive tokens on the host, tokens 2..N;
  positions   every gap (the first entry is the time to first token), to plot latency against position.

For context the script also measures the machine's memory bandwidth (a large-array copy) and prints the floor that
reading every float32 weight once per token puts on decode latency, the decode FLOPs per token of both MLA forms,
and the KV-cache bytes per token of the config against the same config with MHA.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import machine  # noqa: E402
from superlm_jax.cli import run_main  # noqa: E402
from superlm_jax.errors import UserError  # noqa: E402
from superlm_jax.generate.decode import Generator, SamplingParams  # noqa: E402
from superlm_jax.generate.sampling import sample_next_token  # noqa: E402
from superlm_jax.models import accounting  # noqa: E402
from superlm_jax.models.options import RuntimeOptions  # noqa: E402
from superlm_jax.models.spec import parse_dtype  # noqa: E402
from superlm_jax.models.transformer import build_model, with_options  # noqa: E402
from superlm_jax.training import metrics  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/minideepseek.py:small", "Config file[:preset].",
                                          lock_config=True)
_PROMPT_LENGTHS = flags.DEFINE_list("prompt_lengths", ["64", "128", "256", "512"], "Prompt lengths in tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 50, "Tokens generated per run (greedy).")
_BATCH = flags.DEFINE_integer("batch", 1, "Prompts per batch (all of the same length).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per method and prompt length (the median is reported).")
_BUCKET = flags.DEFINE_integer("recompute_bucket", 16, "no_cache: pad the sequence to a multiple of this many "
                               "tokens (one compilation per bucket); 0 = one buffer of prompt + new tokens.")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/results/decode", "Where decode.json and decode.png go.")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Matmul dtype (and cache dtype).")

METHODS = ("no_cache", "cache_expanded", "cache_absorbed")
RATIOS = (("cache_expanded", "no_cache"), ("cache_absorbed", "no_cache"), ("cache_absorbed", "cache_expanded"))
SHORT = {"no_cache": "a", "cache_expanded": "b", "cache_absorbed": "c"}
SEED_CLAIM = "seed (CUDA): per token 10-11 ms -> 7.5 ms, first token 100-200 ms -> 10 ms, ~3x in total"
GREEDY = SamplingParams(temperature=0.0)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------------------------- the three methods
class Recompute:
  """Greedy decoding without a cache: every token costs a jitted forward over the sequence so far.

  Sampling goes through the same `sample_next_token` (greedy knobs, repetition-penalty history) as the Generator's
  step, so the methods differ only in how they get the logits."""

  def __init__(self, model: nnx.Module, bucket: int):
    model = with_options(model, RuntimeOptions(mla_form="expanded"))  # What "auto" does without a cache anyway.
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    self.bucket = bucket
    self._next = jax.jit(self._next_fn)

  def _next_fn(self, params, rest, tokens, length, key, knobs):
    logits = nnx.merge(self.graphdef, params, rest)(tokens)  # [batch, L, vocab]
    last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)
    mask = jnp.broadcast_to(jnp.arange(tokens.shape[1])[None, :] < length, tokens.shape)
    return sample_next_token(key, last, token_history=tokens, history_mask=mask, **knobs)

  def generate(self, prompts: np.ndarray, new_tokens: int, on_tokens: Callable[[int, np.ndarray], None]) -> None:
    batch, prompt_len = prompts.shape
    final = prompt_len + new_tokens
    buffer = np.zeros((batch, final), np.int32)
    buffer[:, :prompt_len] = prompts
    knobs, key = GREEDY.knobs(), jax.random.key(GREEDY.seed)
    for step in range(new_tokens):
      length = prompt_len + step  # tokens so far
      padded = min(_round_up(length, self.bucket), final) if self.bucket else final
      token = self._next(self.params, self.rest, jnp.asarray(buffer[:, :padded]), jnp.int32(length), key, knobs)
      host = np.asarray(token)  # waits for the device
      if length < final:
        buffer[:, length] = host
      on_tokens(step, host)


def timed_run(run: Callable[[Callable[[int, np.ndarray], None]], None]) -> dict:
  """Runs one generation and returns its timings (seconds) and tokens; `run(on_tokens)` must call
  `on_tokens(step, host_tokens)` once per new token, after the token is on the host."""
  stamps: list[float] = []
  tokens: list[np.ndarray] = []

  def on_tokens(step, host_tokens, *_):
    stamps.append(time.perf_counter())
    tokens.append(np.array(host_tokens))

  start = time.perf_counter()
  run(on_tokens)
  end = time.perf_counter()
  gaps = np.diff([start, *stamps]).tolist()
  return {"total_s": end - start, "first_token_s": gaps[0],
          "per_token_s": float(np.mean(gaps[1:])) if len(gaps) > 1 else float("nan"),
          "step_times_s": gaps, "tokens": np.stack(tokens, axis=1).tolist()}


def summarise(runs: list[dict]) -> dict:
  """Medians over the timed runs (elementwise for the per-position list); the raw runs are kept too."""
  return {
      "total_s": statistics.median(r["total_s"] for r in runs),
      "first_token_s": statistics.median(r["first_token_s"] for r in runs),
      "per_token_s": statistics.median(r["per_token_s"] for r in runs),
      "step_times_s": np.median(np.array([r["step_times_s"] for r in runs]), axis=0).tolist(),
      "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
      "tokens": runs[0]["tokens"],
  }


# ---------------------------------------------------------------------------------------------- context figures


def mla_decode_costs(m: ml_collections.ConfigDict, cache_len: int, bytes_per_value: int) -> dict:
  """FLOPs and attention bytes of one single-token decode step (per row) over a cache of `cache_len` slots.

  Both forms share the weight matmuls (2 N, head included). Per layer, the expanded form up-projects every cached
  latent into per-head keys and values, 2 C r h (nope + v) FLOPs, and materialises them (C h (nope + v) values);
  the absorbed form folds W_UK/W_UV into the query/output (2 h nope r + 2 h r v) and scores against the latents
  directly, 2 h C (r + rope) + 2 h C r. Elementwise work (softmax, norms, RoPE) is left out."""
  weights = accounting.flops_per_token(m, 0, training=False)
  if m.attention != "mla":
    return {"weights": weights}
  h, r, n, p, v, c = m.num_heads, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, cache_len
  expanded = 2 * c * r * h * (n + v) + 2 * h * c * (n + p) + 2 * h * c * v
  absorbed = 2 * h * n * r + 2 * h * c * (r + p) + 2 * h * c * r + 2 * h * r * v
  cache_bytes = c * (r + p) * bytes_per_value
  layers = m.num_layers
  return {"cache_len": c, "weights": weights, "expanded_attention": layers * expanded,
          "absorbed_attention": layers * absorbed, "expanded_total": weights + layers * expanded,
          "absorbed_total": weights + layers * absorbed, "latent_cache_bytes_read": layers * cache_bytes,
          "expanded_kv_bytes_materialised": layers * c * h * (n + v) * bytes_per_value}


def mha_twin(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same model config with standard multi-head attention (head_dim = d_model / heads, all heads kept)."""
  twin = ml_collections.ConfigDict(m.to_dict())
  twin.attention = "mha"
  return twin


# ---------------------------------------------------------------------------------------------- output
def write_figure(path: Path, results: dict, lengths: list[int], floor_s: float, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  for method in METHODS:
    left.plot(lengths, [results[method][str(n)]["per_token_s"] * 1e3 for n in lengths], "o-", label=method)
  left.axhline(floor_s * 1e3, color="gray", ls="--", label="weight-bandwidth floor")
  left.set(xscale="log", yscale="log", xlabel="prompt length (tokens)", ylabel="ms per token (tokens 2..N)",
           title="per-token decode latency")
  left.set_xticks(lengths, [str(n) for n in lengths])
  left.xaxis.set_minor_formatter(ticker.NullFormatter())
  left.legend()
  longest = lengths[-1]
  for method in METHODS:
    steps = results[method][str(longest)]["step_times_s"][1:]
    right.plot(range(longest + 1, longest + 1 + len(steps)), np.array(steps) * 1e3, label=method)
  right.axhline(floor_s * 1e3, color="gray", ls="--", label="weight-bandwidth floor")
  right.set(yscale="log", xlabel="position of the new token", ylabel="ms (gap since the previous token)",
            title=f"latency per position, prompt {longest} (after the first token)")
  right.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  right.legend()
  for ax in (left, right):
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  wall_start = time.perf_counter()
  config = _CONFIG.value
  m = config.model
  try:
    lengths = sorted({int(n) for n in _PROMPT_LENGTHS.value})
  except ValueError as e:
    raise UserError(f"--prompt_lengths must be integers: {_PROMPT_LENGTHS.value}") from e
  new, batch, repeats, bucket = _NEW_TOKENS.value, _BATCH.value, _REPEATS.value, _BUCKET.value
  if not lengths or lengths[0] < 1 or new < 1 or batch < 1 or repeats < 1 or bucket < 0:
    raise UserError("prompt lengths, --new_tokens, --batch and --repeats must be positive, --recompute_bucket >= 0")
  if lengths[-1] + new > m.max_seq_len:
    raise UserError(f"prompt {lengths[-1]} + {new} new tokens exceeds model.max_seq_len={m.max_seq_len}")
  compute_dtype = parse_dtype(_DTYPE.value)
  bytes_per_value = jnp.dtype(compute_dtype).itemsize
  config_name = config_flags.get_config_filename(flags.FLAGS["config"])

  machine_line = machine.describe()
  print(f"machine: {machine_line}")
  bandwidth = machine.memory_bandwidth()
  peak, peak_source = metrics.peak_flops_per_device()

  model = build_model(m, seed=0, compute_dtype=compute_dtype)
  params = accounting.parameter_count(m)["total"]
  weight_bytes = params * 4  # float32 master weights, read once per decode step whatever the compute dtype
  floor_s = weight_bytes / bandwidth["bytes_per_s"]
  kv_mla = accounting.kv_cache_bytes_per_token(m, bytes_per_value)
  kv_mha = accounting.kv_cache_bytes_per_token(mha_twin(m), bytes_per_value)

  runners = {"no_cache": Recompute(model, bucket)}
  generators = {"cache_expanded": Generator(model, absorb=False), "cache_absorbed": Generator(model, absorb=True)}
  rng = np.random.default_rng(0)
  all_prompts = rng.integers(0, m.vocab_size, (batch, lengths[-1]), dtype=np.int32)  # shorter ones are prefixes

  def runner(method: str, prompts: np.ndarray) -> Callable:
    if method == "no_cache":
      return lambda cb: runners[method].generate(prompts, new, cb)
    params_ = SamplingParams(max_new_tokens=new, temperature=0.0)
    return lambda cb: generators[method].generate(prompts.tolist(), params_, on_tokens=cb)

  raw: dict[str, dict[int, list[dict]]] = {method: {n: [] for n in lengths} for method in METHODS}
  bar = tqdm(total=len(lengths) * len(METHODS) * (repeats + 1), desc="decode", unit="run", file=sys.stderr)
  for n in lengths:
    prompts = all_prompts[:, :n]
    for rep in range(repeats + 1):  # rep 0 is the untimed warm-up (compilation)
      for method in METHODS:
        bar.set_postfix_str(f"{method} prompt={n} {'warm-up' if rep == 0 else f'repeat {rep}'}")
        result = timed_run(runner(method, prompts))
        if rep:
          raw[method][n].append(result)
        bar.update()
  bar.close()

  results = {method: {str(n): summarise(raw[method][n]) for n in lengths} for method in METHODS}
  for method in METHODS[1:]:
    for n in lengths:
      ours, ref = np.array(results[method][str(n)]["tokens"]), np.array(results["no_cache"][str(n)]["tokens"])
      results[method][str(n)]["tokens_match_no_cache"] = float((ours == ref).mean())
  ratios = {str(n): {f"{num}/{den}": {key: results[num][str(n)][key] / results[den][str(n)][key]
                                       for key in ("total_s", "first_token_s", "per_token_s")}
                     for num, den in RATIOS} for n in lengths}
  # The Generator's cache buffer for the longest prompt (prompt padded to 16, cache to 64), as in generate().
  cache_len = min(_round_up(_round_up(lengths[-1], 16) + new, 64), m.max_seq_len)
  costs = mla_decode_costs(m, cache_len, bytes_per_value)

  # ------------------------------------------------------------------ the table
  print(f"{config_name}: {config.name}, {params:,} parameters, {_DTYPE.value}, batch {batch}, {new} new tokens "
        f"(greedy), median of {repeats} after an untimed warm-up; random weights")
  print(f"no_cache pads the sequence to a multiple of {bucket} tokens and runs the full forward (output head at "
        f"every position) per token" if bucket else
        "no_cache runs the full forward over one buffer of prompt + new tokens per token (the worst case)")
  print("cached methods attend over the whole preallocated cache buffer (multiple of 64), so a step's cost does not "
        "grow within one generation")
  head = f"{'prompt':>6}  {'method':<18} {'total ms':>9} {'first ms':>9} {'ms/token':>9}  {'x floor':>7}  tokens=a"
  print(head)
  print("-" * len(head))
  for n in lengths:
    for method in METHODS:
      r = results[method][str(n)]
      match = "" if method == "no_cache" else f"{100 * r['tokens_match_no_cache']:.0f}%"
      label = f"({SHORT[method]}) {method}"
      print(f"{n:>6}  {label:<18} {r['total_s'] * 1e3:>9.1f} {r['first_token_s'] * 1e3:>9.1f} "
            f"{r['per_token_s'] * 1e3:>9.2f}  {r['per_token_s'] / floor_s:>7.1f}  {match:>8}")
  print("time ratios (< 1 = faster):")
  head = f"{'prompt':>6}  " + "  ".join(f"{SHORT[a]}/{SHORT[b]} total  {SHORT[a]}/{SHORT[b]} token" for a, b in RATIOS)
  print(head)
  print("-" * len(head))
  for n in lengths:
    cells = []
    for num, den in RATIOS:
      q = ratios[str(n)][f"{num}/{den}"]
      cells.append(f"{q['total_s']:>9.3f}  {q['per_token_s']:>9.3f}")
    print(f"{n:>6}  " + "  ".join(cells))
  a_tok = results["no_cache"][str(lengths[-1])]["per_token_s"]
  b_tok = results["cache_expanded"][str(lengths[-1])]["per_token_s"]
  c_tok = results["cache_absorbed"][str(lengths[-1])]["per_token_s"]
  print(f"prompt {lengths[-1]}: {a_tok * 1e3:.2f} -> {b_tok * 1e3:.2f} -> {c_tok * 1e3:.2f} ms/token "
        f"(no_cache -> expanded -> absorbed; {a_tok / c_tok:.1f}x overall); {SEED_CLAIM}")
  print(f"memory bandwidth: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s (copy of {bandwidth['array_mb']} MB, bytes "
        f"read + written; numpy {bandwidth['numpy_copy_bytes_per_s'] / 1e9:.1f}, "
        f"jax {bandwidth['jax_scale_bytes_per_s'] / 1e9:.1f})")
  print(f"weight-bandwidth floor: {weight_bytes / 1e6:.1f} MB of float32 weights per decode step / "
        f"{bandwidth['bytes_per_s'] / 1e9:.1f} GB/s = {floor_s * 1e3:.2f} ms/token; absorbed at prompt "
        f"{lengths[-1]} is {c_tok / floor_s:.1f}x that floor")
  if "expanded_total" in costs:
    print(f"decode FLOPs per token at cache length {cache_len}: weights {costs['weights'] / 1e6:.0f} M + attention "
          f"expanded {costs['expanded_attention'] / 1e6:.0f} M / absorbed {costs['absorbed_attention'] / 1e6:.1f} M "
          f"= {costs['expanded_total'] / 1e6:.0f} M vs {costs['absorbed_total'] / 1e6:.0f} M; at the measured "
          f"{peak / 1e9:.0f} GFLOP/s ({peak_source}) that is {costs['expanded_total'] / peak * 1e3:.2f} vs "
          f"{costs['absorbed_total'] / peak * 1e3:.2f} ms; expanded also materialises "
          f"{costs['expanded_kv_bytes_materialised'] / 1e6:.1f} MB of keys/values per token "
          f"(latent cache read: {costs['latent_cache_bytes_read'] / 1e6:.2f} MB)")
  print(f"KV cache per token ({bytes_per_value}-byte values, all layers): MLA {kv_mla:,} B vs MHA {kv_mha:,} B "
        f"({kv_mha / kv_mla:.1f}x); at {lengths[-1] + new} tokens x batch {batch}: "
        f"{kv_mla * (lengths[-1] + new) * batch / 1e6:.2f} MB vs {kv_mha * (lengths[-1] + new) * batch / 1e6:.2f} MB")

  # ------------------------------------------------------------------ files
  out_dir = Path(_OUT_DIR.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  runtime = time.perf_counter() - wall_start
  report = {
      "config": config_name, "name": config.name, "parameters": params, "compute_dtype": _DTYPE.value,
      "batch": batch, "new_tokens": new, "prompt_lengths": lengths, "repeats": repeats, "recompute_bucket": bucket,
      "machine": machine_line, "seed_claim": SEED_CLAIM, "memory_bandwidth": bandwidth,
      "peak_flops": peak, "peak_source": peak_source,
      "weight_bytes_per_token": weight_bytes, "weight_floor_s": floor_s,
      "absorbed_per_token_over_floor": {str(n): results["cache_absorbed"][str(n)]["per_token_s"] / floor_s
                                        for n in lengths},
      "decode_flops_per_token": costs,
      "kv_cache_bytes_per_token": {"mla": kv_mla, "mha": kv_mha, "bytes_per_value": bytes_per_value},
      "results": results, "ratios": ratios, "runtime_s": runtime,
  }
  (out_dir / "decode.json").write_text(json.dumps(report, indent=1) + "\n")
  write_figure(out_dir / "decode.png", results, lengths, floor_s,
               f"{config_name}, {params / 1e6:.1f}M params, {_DTYPE.value}, batch {batch}, {new} new tokens; "
               f"{machine_line}")
  print(f"wrote {out_dir / 'decode.json'} and {out_dir / 'decode.png'} ({runtime:.0f} s in all)")


if __name__ == "__main__":
  run_main(main)
