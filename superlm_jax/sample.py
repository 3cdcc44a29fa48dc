"""Generate text from a trained run: ``python -m superlm_jax.sample --checkpoint=runs/gpt2_tiny --prompt="ROMEO."``

Restores the latest checkpoint of the run directory (or a given --step) with the tokenizer and config saved beside
it, and streams the continuation as it is decoded with the KV cache.
"""

from __future__ import annotations

import contextlib
import sys

from absl import flags
from ml_collections import config_flags

from superlm_jax.cli import run_main
from superlm_jax.config import base_config

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory written by superlm_jax.train.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat the flag for a batch of prompts.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BEST = flags.DEFINE_bool("best", False, "Use the checkpoint with the best validation loss.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate (default: the run config's).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass (1 = off).")
_PENALTY = flags.DEFINE_float("repetition_penalty", None, "CTRL repetition penalty (1 = off).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed.")
_PROFILE = flags.DEFINE_string("profile", None, "Write a jax.profiler trace of the generation to this directory "
                               "(xprof --logdir=DIR, or its *.trace.json.gz in https://ui.perfetto.dev).")
# Overrides of the run's saved config, e.g. --config.decode.absorb=False (MLA: expanded instead of absorbed decode)
# or --config.decode.impl=xla (MLA: absorbed steps as XLA einsums instead of the fused Pallas kernel).
_CONFIG = config_flags.DEFINE_config_dict("config", base_config(), "Overrides of the run's config.json.",
                                          lock_config=True)


def main(argv):
  del argv
  from superlm_jax.errors import UserError
  from superlm_jax.generate.decode import SamplingParams
  from superlm_jax.generate.restore import load_for_inference

  if not _CHECKPOINT.value:
    raise UserError("--checkpoint=RUN_DIR is required (the train.workdir of a training run)")
  # The flags' ranges are checked before the checkpoint is loaded (the run's own values are checked after).
  flag_values = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                     top_p=_TOP_P.value, repetition_penalty=_PENALTY.value, seed=_SEED.value)
  SamplingParams.from_config(vars(SamplingParams()), **flag_values)
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  generator, tokenizer, config, step = load_for_inference(_CHECKPOINT.value, step=_STEP.value, best=_BEST.value,
                                                    overrides=overrides)
  print(f"Restored {_CHECKPOINT.value} at step {step} ({config.name}).", file=sys.stderr)
  s = config.sample
  params = SamplingParams.from_config(s, **flag_values)
  prompts = _PROMPT.value or [s.prompt]
  encoded = [tokenizer.encode(p) for p in prompts]
  generator.check_prompts(encoded)

  import jax  # pylint: disable=import-outside-toplevel
  profile = jax.profiler.trace(_PROFILE.value) if _PROFILE.value else contextlib.nullcontext()
  with profile:
    _generate(generator, tokenizer, prompts, encoded, params)
  if _PROFILE.value:
    print(f"profile of the generation (its compilation included) written to {_PROFILE.value}", file=sys.stderr)


def _generate(generator, tokenizer, prompts, encoded, params) -> None:
  if len(prompts) == 1:  # Stream a single prompt token by token.
    sys.stdout.write(prompts[0])
    sys.stdout.flush()
    printed = []

    def stream(step, tokens, alive):
      if alive[0]:
        printed.append(int(tokens[0]))
        # Decode the whole tail so multi-byte characters split over tokens come out whole.
        text = tokenizer.decode(printed)
        sys.stdout.write(text[len(stream.shown):])
        stream.shown = text
        sys.stdout.flush()
    stream.shown = ""
    generator.generate(encoded, params, eos_id=tokenizer.eos_id, on_tokens=stream)
    sys.stdout.write("\n")
  else:
    outputs = generator.generate(encoded, params, eos_id=tokenizer.eos_id)
    for i, (prompt, ids) in enumerate(zip(prompts, outputs)):
      print(f"--- [{i}] ---\n{prompt}{tokenizer.decode(ids)}")


def cli() -> None:
  """The `superlm-sample` console script (pyproject.toml): the same program as `python -m superlm_jax.sample`."""
  run_main(main)


if __name__ == "__main__":
  cli()
