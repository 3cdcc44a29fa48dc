"""Load a run directory for inference: config.json + the tokenizer + the weights of one checkpoint."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from superlm_jax import checkpoint as ckpt_lib
from superlm_jax.data.tokenizer import load_tokenizer
from superlm_jax.errors import UserError
from superlm_jax.generate.decode import Generator
from superlm_jax.models import layout as layout_lib
from superlm_jax.models.spec import ModelSpec
from superlm_jax.models.transformer import RUNTIME_MODEL_KEYS, abstract_model


def load_model(run_dir: str | Path, *, step: int | None = None, best: bool = False, overrides: dict | None = None,
               layout: str | None = None):
  """(model, config, step) with the weights of `step` (default: the latest; `best`: lowest validation loss).

  `layout` "loop" or "scan" returns the model in that layout of its blocks whatever layout the run was saved in
  (models/layout.py); None keeps the saved one.
  `overrides` ({"decode.absorb": False, ...}) change the run's saved config; they may not change the model.
  The model is built abstractly (`nnx.eval_shape`), so no random initialisation is computed and thrown away.
  """
  run_dir = Path(run_dir)
  if not run_dir.is_dir():
    raise UserError(f"checkpoint directory {run_dir} does not exist")
  config = ckpt_lib.load_run_config(run_dir)
  for dotted, value in (overrides or {}).items():
    if dotted.startswith("model.") and dotted[len("model."):] not in RUNTIME_MODEL_KEYS:
      raise UserError(f"--config.{dotted} cannot change the architecture of a trained model")
    section, _, key = dotted.rpartition(".")
    (config if not section else config[section])[key] = value
  checkpointer = ckpt_lib.Checkpointer(run_dir / "checkpoints", keep=1, create=False)
  if best:
    step = checkpointer.best_step()
    if step is None:
      raise UserError(f"no checkpoint in {run_dir} has a validation loss to pick the best by")
  spec = ModelSpec.from_config(config.model, config.train.compute_dtype)
  graphdef, abstract_params, abstract_rest = nnx.split(abstract_model(spec), nnx.Param, ...)
  read = lambda s: checkpointer.restore_weights(abstract_params, abstract_rest, s)
  if step is None:  # The latest, or the newest readable one with a warning if it is corrupt.
    step, (params, rest) = checkpointer.first_readable(read)
  else:  # A step asked for (or the best) is read or fails.
    step = checkpointer.resolve_step(step)
    params, rest = read(step)
  if layout is not None and (layout == "scan") != config.model.scan_layers:
    convert = layout_lib.loop_to_scan if layout == "scan" else layout_lib.scan_to_loop
    config.model.scan_layers = layout == "scan"
    graphdef, *targets = nnx.split(abstract_model(spec.replace(scan_layers=config.model.scan_layers)), nnx.Param,
                                   ...)
    for source, target in zip((params, rest), targets):
      nnx.replace_by_pure_dict(target, convert(source.to_pure_dict(), config.model))  # fills the abstract leaves
    params, rest = targets
  return nnx.merge(graphdef, params, rest), config, step


def load_run_tokenizer(run_dir: str | Path, config):
  """The tokenizer of a run directory, checked against the run's `config`.

  A tokenizer with more tokens than the model's vocabulary is refused: its ids past the embedding table would read
  no row (NaN or another token's). One with fewer is allowed, as `prepare` allows it: converted models pad their
  vocabulary (Qwen2, DeepSeek-V3), and ids the tokenizer lacks are dropped when decoding."""
  tokenizer = load_tokenizer(run_dir)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise UserError(f"the tokenizer in {Path(run_dir)} has {tokenizer.vocab_size} tokens, more than the model's "
                    f"model.vocab_size={config.model.vocab_size}: it belongs to another model")
  return tokenizer


def load_for_inference(run_dir: str | Path, *, step: int | None = None, best: bool = False,
                       overrides: dict | None = None, speculative: bool = False):
  """(Generator, tokenizer, config, step) for a run directory written by `superlm_jax.train` or
  `superlm_jax.convert` (the tokenizer checked by `load_run_tokenizer`). `speculative`: decode self-speculatively
  with decode.draft_tokens MTP modules (all of them, model.mtp_depth, when that is 0); a run without MTP modules is
  a one-line UserError."""
  model, config, step = load_model(run_dir, step=step, best=best, overrides=overrides)
  tokenizer = load_run_tokenizer(run_dir, config)
  draft_tokens = config.decode.draft_tokens
  if speculative:
    if not config.model.mtp_depth:
      raise UserError(f"--speculative drafts with multi-token-prediction modules, and the checkpoint in {run_dir} "
                      "has none (model.mtp_depth=0; train with --config.model.mtp_depth=1 or more)")
    draft_tokens = draft_tokens or config.model.mtp_depth
  generator = Generator(model, absorb=config.decode.absorb, decode_impl=config.decode.impl,
                        draft_tokens=draft_tokens)
  return generator, tokenizer, config, step
