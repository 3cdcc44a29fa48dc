"""EleutherAI lm-evaluation-harness adapter: `lm_eval --model superlm_jax --model_args checkpoint=RUN_DIR`.

Importing this module registers the model type "superlm_jax" with lm-eval (lm-eval 0.4.13 finds model types only
in its own MODEL_MAPPING, so `python -m superlm_jax.eval_harness`, lm-eval's CLI after this import, is the way in).

The conventions are those of lm-eval's `hf` model (HFLM), so that a converted checkpoint scores what the Hugging
Face original scores: context/continuation encoding is TemplateLM's own; an empty context is the prefix token
(BOS, else EOS); rows longer than the context lose tokens on the left; loglikelihood_rolling uses lm-eval's own
disjoint windows; generate_until left-truncates the context to leave `max_gen_toks` of room, adds the EOS text to
`until` and cuts the decoded text at the first stop string. The numbers come from the library's own batched,
jitted paths: `evaluation.scoring.Scorer` (bucketed rows, one compile per bucket) for log-likelihoods and
`generate.decode.Generator` (the KV/latent cache) for generation.
"""

from __future__ import annotations

import logging

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from superlm_jax.errors import UserError

log = logging.getLogger(__name__)

# Generation kwargs that Generator honours; others (num_beams, ...) are warned about and ignored.
_SAMPLING_KWARGS = {"do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty"}
_DEFAULT_BATCH_SIZE = 8


def _integer(name: str, value, minimum: int = 1) -> int:
  """model_args arrive as strings or ints (lm-eval's parser); "3.5", "0" or True are refused in one line."""
  try:
    number = None if isinstance(value, bool) else int(str(value).strip())
  except ValueError:
    number = None
  if number is None or number < minimum:
    raise UserError(f"superlm_jax: {name}={value!r} must be an integer >= {minimum}")
  return number


@register_model("superlm_jax")
class SuperLMJax(TemplateLM):
  """A run directory of superlm_jax (trained or converted) as an lm-eval model."""

  backend = "causal"

  def __init__(self, checkpoint: str | None = None, step: int | None = None, best: bool = False,
               batch_size: int | str | None = None, max_length: int | None = None, max_gen_toks: int = 256,
               add_bos_token: bool | None = None, prefix_token_id: int | None = None, bucket: int = 64,
               seed: int = 1234, device: str | None = None, max_batch_size: int | None = None, **unknown):
    """`batch_size` (lm-eval's --batch_size; "auto" means the default, 8): rows per jitted call, for scoring and
    generation alike. `max_length`: the context used (default and at most the model's). `add_bos_token`: None
    follows the tokenizer (HFLM's default: BOS where a tokenizer.json's post-processor adds it), True/False forces
    it. `device`, `max_batch_size`: lm-eval passes them to every model; JAX places the model itself."""
    super().__init__()
    if unknown:
      raise UserError(f"superlm_jax: unknown model_args {', '.join(sorted(unknown))} (known: checkpoint, step, best, "
                      "max_length, max_gen_toks, add_bos_token, prefix_token_id, bucket, seed; --batch_size)")
    if not checkpoint:
      raise UserError("superlm_jax needs --model_args checkpoint=RUN_DIR (a run directory of train or convert)")
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from superlm_jax.evaluation.scoring import Scorer  # pylint: disable=import-outside-toplevel
    from superlm_jax.generate.restore import load_for_inference  # pylint: disable=import-outside-toplevel

    del device, max_batch_size
    if batch_size is None or str(batch_size).startswith("auto"):
      batch_size = _DEFAULT_BATCH_SIZE
    self._batch_size = _integer("batch_size", batch_size)
    self.checkpoint = str(checkpoint)
    self._generator, self.tokenizer, self.config, self.step = load_for_inference(
        checkpoint, step=None if step is None else _integer("step", step, 0), best=bool(best))
    # The scorer runs the generator's weights (the same arrays) as the plain full-sequence program.
    model = nnx.merge(self._generator.graphdef, self._generator.params, self._generator.rest)
    self._scorer = Scorer(model, batch_size=self._batch_size, bucket=_integer("bucket", bucket))
    context = self._scorer.max_seq_len
    self._max_length = context if max_length is None else _integer("max_length", max_length)
    if self._max_length > context:
      raise UserError(f"superlm_jax: max_length={self._max_length} is longer than the model context of {context}")
    self._max_gen_toks = _integer("max_gen_toks", max_gen_toks)
    self.add_bos_token = add_bos_token
    self._prefix = list(self.tokenizer.special_prefix) if add_bos_token is None else (
        [self.tokenizer.bos_id] if add_bos_token and self.tokenizer.bos_id is not None else [])
    self.custom_prefix_token_id = prefix_token_id
    self._seed = int(seed)
    self._warned: set[str] = set()

  # ------------------------------------------------------------------ what lm-eval asks of a model
  @property
  def eot_token_id(self) -> int | None:
    return self.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    """What an empty context and the first rolling window are conditioned on: as HFLM, BOS, else EOS."""
    for token in (self.custom_prefix_token_id, self.tokenizer.bos_id, self.tokenizer.eos_id):
      if token is not None:
        return int(token)
    raise UserError(f"the tokenizer of {self.checkpoint} has neither BOS nor EOS: pass --model_args "
                    "prefix_token_id=ID to condition empty contexts on")

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return self.checkpoint.rstrip("/").replace("/", "__")

  def get_model_info(self) -> dict:
    return {"checkpoint": self.checkpoint, "checkpoint_step": self.step}

  def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
    """`--apply_chat_template`: the few-shot conversation in the tokenizer's own chat format (generate/chat.py,
    rendered as transformers renders it). Prefilling an assistant turn (add_generation_prompt=False, which HFLM
    renders with transformers' continue_final_message) is refused rather than approximated."""
    from superlm_jax.generate.chat import render_chat  # pylint: disable=import-outside-toplevel

    if not add_generation_prompt:
      raise UserError("superlm_jax cannot continue a final assistant message in a chat template "
                      "(a task with an assistant prefill); run without --apply_chat_template")
    return render_chat(self.tokenizer.chat_template, chat_history, special_tokens=self.tokenizer.special_tokens)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs) -> list[int]:
    """HFLM's rule: an explicit `add_special_tokens` wins, else `add_bos_token`, else the tokenizer's default; a
    string that already starts with the prefix token's text gets none added."""
    del kwargs
    prefix = self._prefix
    if add_special_tokens is not None:
      prefix = (self._prefix or list(self.tokenizer.special_prefix)) if add_special_tokens else []
    elif prefix and self._piece(self.prefix_token_id) and string.startswith(self._piece(self.prefix_token_id)):
      prefix = []
    ids = prefix + list(self.tokenizer.encode(string))
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def _piece(self, token_id: int | None) -> str:
    """The text of a special token (HF's `decode(id, skip_special_tokens=False)`); our decode skips specials."""
    return "" if token_id is None else str(self.tokenizer.id_to_piece(int(token_id)))

  # ------------------------------------------------------------------ log-likelihoods
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
    """(sum of log p(continuation | context), continuation is the greedy one) per (strings, context, continuation)
    request; identical rows (shared windows, repeated requests) are scored once."""
    del override_bs
    keys = []
    for _, context_enc, continuation_enc in requests:
      if not context_enc or not continuation_enc:
        raise ValueError("loglikelihood requests need a non-empty context and continuation")
      if len(continuation_enc) > self.max_length:
        raise UserError(f"a continuation of {len(continuation_enc)} tokens is longer than max_length="
                        f"{self.max_length}")
      tokens = tuple(context_enc + continuation_enc)[-(self.max_length + 1):]  # HFLM: truncated from the left
      keys.append((tokens, len(tokens) - len(continuation_enc)))
    unique = list(dict.fromkeys(keys))
    with tqdm(total=len(unique), disable=disable_tqdm, desc="Running loglikelihood requests") as bar:
      rows = self._scorer.score([(list(tokens), first) for tokens, first in unique], progress=bar.update)
    scored = {key: (float(row.logprobs.astype("float64").sum()), bool(row.greedy.all()))
              for key, row in zip(unique, rows)}
    results = []
    for (request_strings, _, _), key in zip(requests, keys):
      results.append(scored[key])
      if request_strings is not None:  # rolling windows are cached per document by loglikelihood_rolling
        self.cache_hook.add_partial("loglikelihood", request_strings, scored[key])
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """The whole text's log-likelihood from lm-eval's own windows (as HFLM: max_length tokens each, every token
    predicted once, the first conditioned on the prefix token)."""
    windows, counts = [], []
    for (string,) in [request.args for request in requests]:
      pairs = [lm_utils.make_disjoint_window(pair) for pair in lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)]
      windows.extend((None, context, continuation) for context, continuation in pairs)
      counts.append(len(pairs))
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals, start = [], 0
    for request, count in zip(requests, counts):
      totals.append(sum(logprob for logprob, _ in scores[start:start + count]))
      start += count
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, totals[-1])
    return totals

  # ------------------------------------------------------------------ generation
  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Continuations cut at the first `until` string (and EOS), at most `max_gen_toks` tokens each; greedy unless
    the request samples (do_sample / temperature > 0). Batches group requests of equal gen_kwargs, longest first."""
    collator = Collator([request.args for request in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                        group_by="gen_kwargs", group_fn=lambda r: r[1])
    eos_text = self._piece(self.eot_token_id) or None
    results = []
    with tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests") as bar:
      for chunk in collator.get_batched(n=self.batch_size):
        contexts, all_kwargs = zip(*chunk)
        kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        if max_gen_toks >= self.max_length:
          raise UserError(f"max_gen_toks={max_gen_toks} leaves no room for a context in max_length="
                          f"{self.max_length}")
        prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_gen_toks) or [self.prefix_token_id]
                   for c in contexts]
        for context, ids in zip(contexts, self._generate(prompts, self._sampling(kwargs, max_gen_toks), until)):
          text = postprocess_generated_text(self.tokenizer.decode(ids), until, None)
          results.append(text)
          self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
          bar.update(1)
    return collator.get_original(results)

  def _sampling(self, kwargs: dict, max_gen_toks: int):
    from superlm_jax.generate.decode import SamplingParams  # pylint: disable=import-outside-toplevel

    ignored = sorted(set(kwargs) - _SAMPLING_KWARGS - self._warned)
    if ignored:
      log.warning("superlm_jax ignores the generation kwargs %s", ", ".join(ignored))
      self._warned.update(ignored)
    if not kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0)) == 0.0:
      return SamplingParams(max_new_tokens=max_gen_toks, temperature=0.0)
    self._seed += 1  # each sampled batch draws anew, reproducibly from the `seed` model arg
    return SamplingParams(max_new_tokens=max_gen_toks, temperature=float(kwargs["temperature"]),
                          top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                          min_p=float(kwargs.get("min_p") or 0.0),
                          repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0), seed=self._seed)

  def _generate(self, prompts: list[list[int]], params, until: list[str]) -> list[list[int]]:
    """Generated ids per prompt, ending at any of the tokenizer's EOS ids (not included) or with the token that
    completes a stop string (the caller cuts the text at it). The batch is padded to `batch_size` rows (copies of
    the last prompt) so that every batch has one shape."""
    padded = prompts + [prompts[-1]] * (self.batch_size - len(prompts))
    rows = self._generator.generate_rows(padded, params, eos_ids=self.tokenizer.eos_ids, stop_strings=until,
                                         decode=self.tokenizer.decode)
    return [row.ids for row in rows[:len(prompts)]]
