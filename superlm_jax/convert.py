"""Hugging Face checkpoints <-> superlm_jax run directories.

    python -m superlm_jax.convert --from_hf=path/to/SmolLM2-135M --to=runs/smollm2
    python -m superlm_jax.sample --checkpoint=runs/smollm2 --prompt="The capital of France is"
    python -m superlm_jax.train --config=configs/llama_dense.py --config.train.init_from=runs/smollm2 ...
    python -m superlm_jax.convert --checkpoint=runs/smollm2 --to_hf=exports/smollm2   # and back

`--from_hf` writes a run directory like `superlm_jax.train` does: config.json, the tokenizer (tokenizer.json or
tokenizer.model, with the special ids from the HF config) and a weights-only Orbax checkpoint at step 0.
`--to_hf` writes config.json + model.safetensors (and copies the tokenizer file) that transformers loads.
Nothing is written unless the conversion succeeds: output goes to a temporary sibling that is renamed at the end,
and an existing output directory is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from absl import flags

from superlm_jax.cli import run_main
from superlm_jax.errors import UserError

_FROM_HF = flags.DEFINE_string("from_hf", None, "A local Hugging Face model directory (config.json + safetensors).")
_TO = flags.DEFINE_string("to", None, "With --from_hf: the run directory to create.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "With --to_hf: the run directory to export.")
_TO_HF = flags.DEFINE_string("to_hf", None, "The Hugging Face directory to create from --checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "With --to_hf: the checkpoint step (default: the latest).")
_MODEL_TYPE = flags.DEFINE_enum("model_type", None, ["gpt2", "llama", "deepseek_v2", "deepseek_v3"],
                                "With --to_hf: the HF model type (default: inferred from the architecture).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "With --to_hf: the tensor dtype written.")


def _special_ids(hf_dir: Path, hf_config: dict) -> dict:
  """bos/eos/pad ids of a HF checkpoint: generation_config.json first (it is what `generate` stops at)."""
  sources = [hf_config]
  generation = hf_dir / "generation_config.json"
  if generation.is_file():
    sources.insert(0, json.loads(generation.read_text()))
  ids = {}
  for ours, theirs in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
    for source in sources:
      value = source.get(theirs)
      if isinstance(value, list):
        value = value[0] if value else None
      if value is not None:
        ids[ours] = int(value)
        break
  return ids


def _staging(destination: Path) -> Path:
  if destination.exists():
    raise UserError(f"{destination} already exists; choose a new output directory")
  destination.parent.mkdir(parents=True, exist_ok=True)
  return Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))


def from_hf(hf_dir: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
  """Converts a Hugging Face directory into a run directory; returns it."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from superlm_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from superlm_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  from superlm_jax.interop import hf as hf_lib  # pylint: disable=import-outside-toplevel
  from superlm_jax.models.accounting import parameter_count  # pylint: disable=import-outside-toplevel

  hf_dir, run_dir = Path(hf_dir), Path(run_dir)
  hf_config = hf_lib.read_hf_config(hf_dir)
  model, config = hf_lib.from_pretrained(hf_dir)
  staging = _staging(run_dir)
  try:
    config.train.workdir = str(run_dir)
    tokenizer_note = "no tokenizer found (sample needs tokenizer.json or tokenizer.model in the run directory)"
    if (hf_dir / tok_lib.HF_TOKENIZER_FILE).is_file():
      shutil.copyfile(hf_dir / tok_lib.HF_TOKENIZER_FILE, staging / tok_lib.HF_TOKENIZER_FILE)
      (staging / tok_lib.HF_SPECIAL_IDS_FILE).write_text(json.dumps(_special_ids(hf_dir, hf_config), indent=2) + "\n")
      tokenizer_note = f"tokenizer {tok_lib.HF_TOKENIZER_FILE}"
    elif (hf_dir / tok_lib.SENTENCEPIECE_FILE).is_file():
      shutil.copyfile(hf_dir / tok_lib.SENTENCEPIECE_FILE, staging / tok_lib.SENTENCEPIECE_FILE)
      tokenizer_note = f"tokenizer {tok_lib.SENTENCEPIECE_FILE}"
    (staging / ckpt_lib.CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    params, model_state = nnx.state(model, nnx.Param), nnx.state(model, nnx.Not(nnx.Param))
    checkpointer = ckpt_lib.Checkpointer(staging / "checkpoints", keep=1)
    checkpointer.save(0, {"params": params, "model_state": model_state},
                      {"step": 0, "converted_from": str(hf_dir), "hf_model_type": hf_config["model_type"]})
    checkpointer.wait()
    checkpointer.close()
    os.replace(staging, run_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  counts = parameter_count(config.model)
  print(f"Converted {hf_dir} ({hf_config['model_type']}, {counts['total']:,} parameters) to {run_dir}: "
        f"config.json, {tokenizer_note}, checkpoint step 0.")
  return run_dir


def to_hf(run_dir: str | os.PathLike, hf_dir: str | os.PathLike, *, step: int | None = None,
          model_type: str | None = None, dtype: str = "float32") -> Path:
  """Exports one checkpoint of a run directory as a Hugging Face directory; returns it."""
  from superlm_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  from superlm_jax.generate.restore import load_model  # pylint: disable=import-outside-toplevel
  from superlm_jax.interop import hf as hf_lib  # pylint: disable=import-outside-toplevel

  run_dir, hf_dir = Path(run_dir), Path(hf_dir)
  model, config, step = load_model(run_dir, step=step)
  hf_lib.hf_config_from(config, model_type)  # refuse before anything is written
  staging = _staging(hf_dir)
  try:
    written = hf_lib.to_pretrained(model, config, staging, model_type=model_type, dtype=dtype)
    for name in (tok_lib.HF_TOKENIZER_FILE, tok_lib.SENTENCEPIECE_FILE):
      if (run_dir / name).is_file():
        shutil.copyfile(run_dir / name, staging / name)
    os.replace(staging, hf_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  print(f"Exported {run_dir} step {step} as {written} ({dtype}) to {hf_dir}.")
  return hf_dir


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _FROM_HF.value and _TO_HF.value:
    raise UserError("give either --from_hf=HF_DIR --to=RUN_DIR or --checkpoint=RUN_DIR --to_hf=HF_DIR, not both")
  if _FROM_HF.value:
    if not _TO.value:
      raise UserError("--from_hf needs --to=RUN_DIR (the run directory to create)")
    from_hf(_FROM_HF.value, _TO.value)
  elif _TO_HF.value:
    if not _CHECKPOINT.value:
      raise UserError("--to_hf needs --checkpoint=RUN_DIR (the run directory to export)")
    to_hf(_CHECKPOINT.value, _TO_HF.value, step=_STEP.value, model_type=_MODEL_TYPE.value, dtype=_DTYPE.value)
  else:
    print(__doc__, file=sys.stderr)
    raise UserError("nothing to do: give --from_hf=HF_DIR --to=RUN_DIR or --checkpoint=RUN_DIR --to_hf=HF_DIR")


if __name__ == "__main__":
  run_main(main)
