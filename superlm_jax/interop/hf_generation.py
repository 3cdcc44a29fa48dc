"""generation_config.json and the special ids of a Hugging Face checkpoint <-> a run's `sample.*` defaults and
special_tokens.json.

What `transformers.generate` does with a checkpoint by default is what `sample` does with its conversion:
`do_sample` false (or absent, transformers' default) is greedy decoding (sample.temperature=0); with `do_sample`,
the fields given are used and those absent take transformers' defaults (temperature 1, top_k 50, top_p 1, no
min_p). Every id of `eos_token_id` (chat models list several, e.g. <|im_end|> and <|endoftext|>) ends a generation.
`max_length` (prompt + new tokens, default 20 in transformers) is not taken: sample counts new tokens only; a
`max_new_tokens` is taken.
"""

from __future__ import annotations

from pathlib import Path

from superlm_jax.fileio import read_json_object

GENERATION_CONFIG_FILE = "generation_config.json"
# transformers' GenerationConfig defaults for the fields we map (transformers/generation/configuration_utils.py).
_HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "repetition_penalty": 1.0}


def read_generation_config(hf_dir: str | Path) -> dict:
  """The checkpoint's generation_config.json ({} without one)."""
  return read_json_object(Path(hf_dir) / GENERATION_CONFIG_FILE) or {}


def special_ids(generation: dict, hf_config: dict) -> dict:
  """{"bos_id", "eos_id", "eos_ids", "pad_id"} of a checkpoint (special_tokens.json): generation_config.json first
  (it is what `generate` stops at), then config.json. `eos_ids` keeps every EOS id; `eos_id` is the first."""
  ids = {}
  for ours, theirs in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
    for source in (generation, hf_config):
      value = source.get(theirs)
      values = [int(v) for v in (value if isinstance(value, list) else [value]) if v is not None]
      if values:
        ids[ours] = values[0]
        if ours == "eos_id":
          ids["eos_ids"] = list(dict.fromkeys(values))
        break
  return ids


def sampling_defaults(generation: dict) -> dict:
  """The `sample.*` values (without the prefix) that make `sample` decode as `transformers.generate` would."""
  values = {}
  if generation.get("max_new_tokens"):
    values["max_new_tokens"] = int(generation["max_new_tokens"])
  given = {k: generation[k] if generation.get(k) is not None else default
           for k, default in _HF_SAMPLING_DEFAULTS.items()}
  values["repetition_penalty"] = float(given["repetition_penalty"])
  if not generation.get("do_sample") or not given["temperature"]:
    values["temperature"] = 0.0
    return values
  values.update(temperature=float(given["temperature"]), top_k=int(given["top_k"] or 0),
                top_p=float(given["top_p"]), min_p=float(given["min_p"] or 0.0))
  return values


def generation_config_from(sample_cfg, special: dict | None) -> dict:
  """generation_config.json for an export: the run's sampling defaults and EOS ids, which transformers then uses."""
  config = {"do_sample": sample_cfg.temperature > 0, "max_new_tokens": int(sample_cfg.max_new_tokens),
            "repetition_penalty": float(sample_cfg.repetition_penalty)}
  if sample_cfg.temperature > 0:
    config.update(temperature=float(sample_cfg.temperature), top_k=int(sample_cfg.top_k),
                  top_p=float(sample_cfg.top_p))
    if sample_cfg.min_p > 0:
      config["min_p"] = float(sample_cfg.min_p)
  for ours, theirs in (("bos_id", "bos_token_id"), ("pad_id", "pad_token_id")):
    if (special or {}).get(ours) is not None:
      config[theirs] = special[ours]
  eos = (special or {}).get("eos_ids") or ([special["eos_id"]] if (special or {}).get("eos_id") is not None else [])
  if eos:
    config["eos_token_id"] = eos if len(eos) > 1 else eos[0]
  return config
