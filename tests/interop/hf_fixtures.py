"""Tiny Hugging Face checkpoints written by `transformers` itself, for tests that compare against it: a Llama
(GQA, tied embeddings) with a byte-level BPE tokenizer.json, a tokenizer_config.json (special tokens and a ChatML
chat template) and the generation_config.json that `save_pretrained` writes, optionally with given fields."""

from __future__ import annotations

import json
from pathlib import Path

TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"] * 20
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tiny_hf_llama(path: str | Path, *, generation_config: dict | None = None, chat_template: str | None =
                       CHATML_TEMPLATE, eos_token_id=(0, 2), seed: int = 0, num_layers: int = 2,
                       max_position_embeddings: int = 64, initializer_range: float = 0.02) -> Path:
  """Writes the checkpoint into `path` (created) and returns it. `eos_token_id` goes to config.json and
  generation_config.json (a list, as chat models have); `generation_config` fields are added to the latter. A
  larger `initializer_range` than transformers' 0.02 gives a random model whose greedy text varies (at 0.02 it
  repeats one token), for tests about where generation stops."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(TEXT, tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path / "tokenizer.json"))
  tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
                      "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
  if chat_template is not None:
    tokenizer_config["chat_template"] = chat_template
  (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
  eos = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else eos_token_id
  config = transformers.LlamaConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
      tie_word_embeddings=True, bos_token_id=0, eos_token_id=eos, pad_token_id=None,
      initializer_range=initializer_range)
  torch.manual_seed(seed)
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  if generation_config:
    generation_path = path / "generation_config.json"
    generation_path.write_text(json.dumps({**json.loads(generation_path.read_text()), **generation_config}, indent=2))
  return path
