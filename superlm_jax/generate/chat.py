"""Chat prompts: a conversation rendered with the tokenizer's own chat template, as `transformers` renders it.

A converted chat model (SmolLM2-Instruct, Qwen, DeepSeek) was trained on conversations in one exact text format,
kept as a jinja2 template in its tokenizer_config.json or chat_template.jinja. `render_chat` runs that template the
way `PreTrainedTokenizerBase.apply_chat_template` does: a sandboxed jinja2 environment with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `tojson` that does not escape HTML, `raise_exception` and
`strftime_now`, and the special-token strings (`bos_token`, `eos_token`, ...) as variables. The rendered text is
then encoded without adding special tokens (the template writes them), as transformers does.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from superlm_jax.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
  import jinja2  # pylint: disable=import-outside-toplevel
  import jinja2.ext  # pylint: disable=import-outside-toplevel
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise UserError(f"the tokenizer's chat template is not valid jinja2 (line {e.lineno}: {e.message})") from None


def render_chat(template: str | None, messages: Sequence[Mapping[str, str]], *, special_tokens: Mapping[str, str] =
                {}, add_generation_prompt: bool = True) -> str:
  """The text of `messages` ([{"role", "content"}, ...]) in the chat format of `template`; with
  `add_generation_prompt` it ends where the assistant's reply begins."""
  import jinja2  # pylint: disable=import-outside-toplevel

  if not template:
    raise UserError("--chat needs a chat template, and this tokenizer has none (a tokenizer_config.json with "
                    "\"chat_template\", or chat_template.jinja, beside tokenizer.json)")
  check_messages(messages)
  try:
    return _compile(template).render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **special_tokens)
  except jinja2.exceptions.TemplateError as e:
    raise UserError(f"the chat template refused the conversation: {' '.join(str(e).split())[:200]}") from None


def check_messages(messages) -> None:
  if not isinstance(messages, (list, tuple)) or not messages:
    raise UserError("a conversation is a non-empty JSON list of {\"role\": ..., \"content\": ...} messages")
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise UserError(f"message {i} of the conversation is not {{\"role\": str, \"content\": str}}: {m!r:.100}")


def read_conversation(path: str | Path) -> list[dict]:
  """A conversation file: a JSON list of messages, or JSON lines with one message each."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"conversation file {path} does not exist")
  text = path.read_text(encoding="utf-8")
  try:
    messages = json.loads(text)
  except ValueError:
    try:
      messages = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
      raise UserError(f"{path} is neither a JSON list of messages nor JSON lines ({e})") from None
  check_messages(messages)
  return messages
