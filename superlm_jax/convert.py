"""Hugging Face checkpoints <-> superlm_jax run directories.

    python -m superlm_jax.convert --from_hf=path/to/SmolLM2-135M --to=runs/smollm2
    python -m superlm_jax.sample --checkpoint=runs/smollm2 --prompt="The capital of France is"
    python -m superlm_jax.train --config=configs/llama_dense.py --config.train.init_from=runs/smollm2 ...
    python -m superlm_jax.convert --checkpoint=runs/smollm2 --to_hf=exports/smollm2   # and back

`--from_hf` writes a run directory like `superlm_jax.train` does: config.json, the tokenizer (tokenizer.json or
tokenizer.model, with the special ids from the HF config) and a weights-only Orbax checkpoint at step 0.
`--to_hf` writes config.json + model.safetensors (and copies the tokenizer file) that transformers loads.
`--checkpoint=RUN --to=NEW --layout=scan|loop` writes a copy of a run whose blocks are in the other layout
(model.scan_layers, models/layout.py): the checkpoint of `--step` (default: the latest) with its optimizer state,
step and data position, so training resumes from NEW exactly where RUN stopped. `--from_hf` takes `--layout` too.
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
_LAYOUT = flags.DEFINE_enum("layout", None, ["loop", "scan"],
                            "With --checkpoint and --to: convert the run to this layout of the blocks; with "
                            "--from_hf: the layout to write (default loop).")


def _staging(destination: Path) -> Path:
  if destination.exists():
    raise UserError(f"{destination} already exists; choose a new output directory")
  destination.parent.mkdir(parents=True, exist_ok=True)
  return Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))


def from_hf(hf_dir: str | os.PathLike, run_dir: str | os.PathLike, *, layout: str = "loop") -> Path:
  """Converts a Hugging Face directory into a run directory (blocks in `layout`); returns it."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from superlm_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from superlm_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  from superlm_jax.interop import hf as hf_lib  # pylint: disable=import-outside-toplevel
  from superlm_jax.interop import hf_generation  # pylint: disable=import-outside-toplevel
  from superlm_jax.models.accounting import parameter_count  # pylint: disable=import-outside-toplevel

  hf_dir, run_dir = Path(hf_dir), Path(run_dir)
  hf_config = hf_lib.read_hf_config(hf_dir)
  generation = hf_generation.read_generation_config(hf_dir)
  model, config = hf_lib.from_pretrained(hf_dir, scan_layers=layout == "scan")
  # transformers.generate's defaults for this checkpoint become sample's (greedy unless it asks to sample).
  config.sample.update(hf_generation.sampling_defaults(generation))
  staging = _staging(run_dir)
  try:
    config.train.workdir = str(run_dir)
    tokenizer_note = "no tokenizer found (sample needs tokenizer.json or tokenizer.model in the run directory)"
    if (hf_dir / tok_lib.HF_TOKENIZER_FILE).is_file():
      # The chat template and special-token strings travel with the tokenizer (tokenizer_config.json and
      # transformers 5's chat_template.jinja), so `sample --chat` renders conversations as transformers does.
      for name in (tok_lib.HF_TOKENIZER_FILE, tok_lib.HF_TOKENIZER_CONFIG_FILE, tok_lib.HF_CHAT_TEMPLATE_FILE):
        if (hf_dir / name).is_file():
          shutil.copyfile(hf_dir / name, staging / name)
      special = hf_generation.special_ids(generation, hf_config)
      (staging / tok_lib.HF_SPECIAL_IDS_FILE).write_text(json.dumps(special, indent=2) + "\n")
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
  from superlm_jax.interop import hf_generation  # pylint: disable=import-outside-toplevel

  run_dir, hf_dir = Path(run_dir), Path(hf_dir)
  model, config, step = load_model(run_dir, step=step)
  hf_lib.hf_config_from(config, model_type)  # refuse before anything is written
  staging = _staging(hf_dir)
  try:
    written = hf_lib.to_pretrained(model, config, staging, model_type=model_type, dtype=dtype)
    for name in (tok_lib.HF_TOKENIZER_FILE, tok_lib.SENTENCEPIECE_FILE, tok_lib.HF_TOKENIZER_CONFIG_FILE,
                 tok_lib.HF_CHAT_TEMPLATE_FILE):
      if (run_dir / name).is_file():
        shutil.copyfile(run_dir / name, staging / name)
    special_path = run_dir / tok_lib.HF_SPECIAL_IDS_FILE
    special = json.loads(special_path.read_text()) if special_path.is_file() else None
    if special is None and (run_dir / tok_lib.SENTENCEPIECE_FILE).is_file():
      special = {"eos_id": tok_lib.EOS_ID}  # trained here: documents end with EOS
    generation = hf_generation.generation_config_from(config.sample, special)
    (staging / hf_generation.GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
    os.replace(staging, hf_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  print(f"Exported {run_dir} step {step} as {written} ({dtype}) to {hf_dir}.")
  return hf_dir


def convert_layout(run_dir: str | os.PathLike, new_dir: str | os.PathLike, layout: str, *,
                   step: int | None = None) -> Path:
  """Copies run `run_dir` into `new_dir` with its blocks in `layout` ("scan" or "loop"); returns new_dir."""
  import jax  # pylint: disable=import-outside-toplevel

  from superlm_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from superlm_jax.models import layout as layout_lib  # pylint: disable=import-outside-toplevel
  from superlm_jax.training.step import abstract_train_state  # pylint: disable=import-outside-toplevel

  run_dir, new_dir = Path(run_dir), Path(new_dir)
  if new_dir.exists():
    raise UserError(f"{new_dir} already exists: choose a new --to directory")
  source_config = ckpt_lib.load_run_config(run_dir)
  to_scan = layout == "scan"
  if source_config.model.scan_layers == to_scan:
    raise UserError(f"{run_dir} is already in the {layout} layout (model.scan_layers={to_scan})")
  target_config = ckpt_lib.load_run_config(run_dir)
  target_config.model.scan_layers = to_scan
  target_config.train.workdir = str(new_dir)
  source = ckpt_lib.Checkpointer(run_dir / "checkpoints", keep=1, create=False)
  step = source.resolve_step(step)
  source_abstract = abstract_train_state(source_config)
  has_train = (run_dir / "checkpoints" / str(step) / "train").is_dir()
  if not has_train:  # weights only (converted from Hugging Face)
    source_abstract = {k: source_abstract[k] for k in ("params", "model_state")}
  state, meta = source.restore(step, abstract_state=source_abstract)
  target_abstract = {k: v for k, v in abstract_train_state(target_config).items() if k in state}
  state = layout_lib.convert_state(state, target_abstract, source_config.model, to_scan)
  staging = _staging(new_dir)
  try:
    for item in run_dir.iterdir():  # tokenizer, metrics, TensorBoard events: everything but the checkpoints
      if item.name not in ("checkpoints", ckpt_lib.CONFIG_FILE):
        (shutil.copytree if item.is_dir() else shutil.copyfile)(item, staging / item.name)
    (staging / ckpt_lib.CONFIG_FILE).write_text(target_config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    checkpointer = ckpt_lib.Checkpointer(staging / "checkpoints", keep=target_config.train.keep_checkpoints)
    checkpointer.save(step, jax.device_get(state), meta)
    checkpointer.wait()
    checkpointer.close()
    os.replace(staging, new_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  print(f"Converted {run_dir} step {step} to the {layout} layout in {new_dir}"
        f"{'' if has_train else ' (weights only)'}.")
  return new_dir


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _FROM_HF.value and _TO_HF.value:
    raise UserError("give either --from_hf=HF_DIR --to=RUN_DIR or --checkpoint=RUN_DIR --to_hf=HF_DIR, not both")
  if _FROM_HF.value:
    if not _TO.value:
      raise UserError("--from_hf needs --to=RUN_DIR (the run directory to create)")
    from_hf(_FROM_HF.value, _TO.value, layout=_LAYOUT.value or "loop")
  elif _LAYOUT.value:
    if not (_CHECKPOINT.value and _TO.value):
      raise UserError("--layout needs --checkpoint=RUN_DIR and --to=NEW_RUN_DIR")
    convert_layout(_CHECKPOINT.value, _TO.value, _LAYOUT.value, step=_STEP.value)
  elif _TO_HF.value:
    if not _CHECKPOINT.value:
      raise UserError("--to_hf needs --checkpoint=RUN_DIR (the run directory to export)")
    to_hf(_CHECKPOINT.value, _TO_HF.value, step=_STEP.value, model_type=_MODEL_TYPE.value, dtype=_DTYPE.value)
  else:
    print(__doc__, file=sys.stderr)
    raise UserError("nothing to do: give --from_hf=HF_DIR --to=RUN_DIR or --checkpoint=RUN_DIR --to_hf=HF_DIR")


def cli() -> None:
  """The `superlm-convert` console script (pyproject.toml): the same program as `python -m superlm_jax.convert`."""
  run_main(main)


if __name__ == "__main__":
  cli()
