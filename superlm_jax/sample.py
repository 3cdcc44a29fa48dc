"""Generate text from a trained run: ``python -m superlm_jax.sample --checkpoint=runs/gpt2_tiny --prompt="ROMEO."``

Restores the latest checkpoint of the run directory (or a given --step) with the tokenizer and config saved beside
it, and streams the continuation as it is decoded with the KV cache. A row ends at any of the tokenizer's EOS ids,
at a `--stop` string, or after --max_new_tokens. Converted chat models: `--chat` renders each prompt as a user
turn with the tokenizer's chat template (`--system` adds a system turn), `--conversation=FILE` a whole conversation
(a JSON list of {"role", "content"} messages), as `transformers`' apply_chat_template does.
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
_MIN_P = flags.DEFINE_float("min_p", None, "Drop tokens below min_p x the top token's probability (0 = off).")
_PENALTY = flags.DEFINE_float("repetition_penalty", None, "CTRL repetition penalty (1 = off).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop a row once its text contains this string (repeatable).")
_LOGPROBS = flags.DEFINE_bool("logprobs", False, "After the text, print each generated token with its "
                              "log-probability under the model.")
_CHAT = flags.DEFINE_bool("chat", False, "Render each --prompt as a user turn with the tokenizer's chat template.")
_SYSTEM = flags.DEFINE_string("system", None, "With --chat: a system message before each prompt.")
_CONVERSATION = flags.DEFINE_string("conversation", None, "A JSON file of chat messages to continue with the "
                                    "tokenizer's chat template (implies --chat).")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "Self-speculative decoding: the run's multi-token-prediction "
                                  "modules draft tokens that one pass of the model verifies (same output; needs a "
                                  "run trained with model.mtp_depth > 0; --config.decode.draft_tokens=N drafts N).")
_PROFILE = flags.DEFINE_string("profile", None, "Write a jax.profiler trace of the generation to this directory "
                               "(xprof --logdir=DIR, or its *.trace.json.gz in https://ui.perfetto.dev).")
# Overrides of the run's saved config, e.g. --config.decode.absorb=False (MLA: expanded instead of absorbed decode)
# or --config.decode.impl=xla (MLA: absorbed steps as XLA einsums instead of the fused Pallas kernel).
_CONFIG = config_flags.DEFINE_config_dict("config", base_config(), "Overrides of the run's config.json.",
                                          lock_config=True)


def main(argv):
  del argv
  from superlm_jax.errors import UserError
  from superlm_jax.generate import chat
  from superlm_jax.generate.decode import SamplingParams, StopStrings
  from superlm_jax.generate.restore import load_for_inference

  if not _CHECKPOINT.value:
    raise UserError("--checkpoint=RUN_DIR is required (the train.workdir of a training run)")
  # The flags are checked before the checkpoint is loaded (the run's own values are checked after).
  flag_values = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                     top_p=_TOP_P.value, min_p=_MIN_P.value, repetition_penalty=_PENALTY.value, seed=_SEED.value)
  SamplingParams.from_config(vars(SamplingParams()), **flag_values)
  stop_strings = StopStrings.check(_STOP.value)
  if _CONVERSATION.value and _PROMPT.value:
    raise UserError("give either --prompt or --conversation=FILE, not both")
  conversation = chat.read_conversation(_CONVERSATION.value) if _CONVERSATION.value else None
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  generator, tokenizer, config, step = load_for_inference(_CHECKPOINT.value, step=_STEP.value, best=_BEST.value,
                                                          overrides=overrides, speculative=_SPECULATIVE.value)
  print(f"Restored {_CHECKPOINT.value} at step {step} ({config.name}).", file=sys.stderr)
  s = config.sample
  params = SamplingParams.from_config(s, **flag_values)
  prompts = _PROMPT.value or [s.prompt]
  if conversation is not None or _CHAT.value:
    system = [{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else []
    conversations = [conversation] if conversation is not None else [
        system + [{"role": "user", "content": p}] for p in prompts]
    texts = [chat.render_chat(tokenizer.chat_template, c, special_tokens=tokenizer.special_tokens)
             for c in conversations]
    shown = [""] * len(texts)  # the reply is printed, not the rendered template
  else:
    texts = shown = prompts
  encoded = [tokenizer.encode(t) for t in texts]
  generator.check_prompts(encoded)

  import jax  # pylint: disable=import-outside-toplevel
  profile = jax.profiler.trace(_PROFILE.value) if _PROFILE.value else contextlib.nullcontext()
  with profile:
    rows = _generate(generator, tokenizer, shown, encoded, params, stop_strings)
  if _LOGPROBS.value:
    _print_logprobs(tokenizer, rows)
  if generator.last_stats is not None:
    stats = generator.last_stats
    rates = ", ".join(f"{r:.2f}" for r in stats.acceptance_rates())
    print(f"speculative decoding: {stats.tokens_per_step():.2f} tokens per verify pass; drafts 1..j accepted "
          f"in this fraction of passes, j = 1..{len(stats.accepted)}: {rates}", file=sys.stderr)
  if _PROFILE.value:
    print(f"profile of the generation (its compilation included) written to {_PROFILE.value}", file=sys.stderr)


def _generate(generator, tokenizer, shown, encoded, params, stop_strings):
  options = dict(eos_ids=tokenizer.eos_ids, stop_strings=stop_strings, decode=tokenizer.decode)
  if len(shown) == 1:  # Stream a single prompt token by token.
    sys.stdout.write(shown[0])
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
    rows = generator.generate_rows(encoded, params, on_tokens=stream, **options)
    sys.stdout.write("\n")
  else:
    rows = generator.generate_rows(encoded, params, **options)
    for i, (prompt, row) in enumerate(zip(shown, rows)):
      print(f"--- [{i}] ---\n{prompt}{tokenizer.decode(row.ids)}")
  return rows


def _print_logprobs(tokenizer, rows) -> None:
  for i, row in enumerate(rows):
    print(f"--- [{i}] log-probabilities ({row.finish_reason}; total {sum(row.logprobs):.4f}) ---")
    for token, logprob in zip(row.ids, row.logprobs):
      print(f"{token:>8} {tokenizer.id_to_piece(token)!r:<24} {logprob:10.4f}")


def cli() -> None:
  """The `superlm-sample` console script (pyproject.toml): the same program as `python -m superlm_jax.sample`."""
  run_main(main)


if __name__ == "__main__":
  cli()
