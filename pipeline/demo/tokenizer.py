"""A small byte-level BPE tokenizer trained on the demo text, wrapped as a transformers tokenizer.

It mirrors Qwen2's conventions so the same stage-one code path runs on it: the special tokens
``<|endoftext|>`` (pad), ``<|im_start|>`` and ``<|im_end|>`` (eos), no BOS, digits split one per token,
and a ChatML chat template that renders exactly what Qwen2's does (a default system prompt
"You are a helpful assistant." when the conversation has none).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cache.util import UserError

# Bump when the tokenizer recipe (pre-tokenization, trainer settings, special tokens) changes.
TOKENIZER_VERSION = 1

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Whitespace control (`{%-`, `-%}`) keeps the template's own line breaks out of the output; the `\n`
# inside string literals are Jinja escapes and become real newlines.
CHATML_TEMPLATE = (
    "{%- if messages and messages[0]['role'] != 'system' -%}\n"
    "{{- '" + IM_START + "system\\n" + DEFAULT_SYSTEM_PROMPT + IM_END + "\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "{{- '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '" + IM_START + "assistant\\n' -}}\n"
    "{%- endif -%}\n"
)


def chat_corpus_text(repeat: int = 100) -> list[str]:
    """The fixed strings of the chat format, repeated so that their words get merges like the data's do."""
    return [f"system\n{DEFAULT_SYSTEM_PROMPT}\nuser\nassistant\n"] * repeat


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024,
                    model_max_length: int = 1024):
    """Train byte-level BPE on ``texts``, save it with ``save_pretrained`` into ``out_dir``, return it.

    ``vocab_size`` counts the 256 byte symbols and the 3 special tokens (ids 0, 1, 2); the trainer may stop
    short of it on a small corpus. ``AutoTokenizer.from_pretrained(out_dir)`` loads the result.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise UserError(f"vocab_size={vocab_size} is too small; byte-level BPE needs at least 260")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts) + chat_corpus_text(), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=IM_END, bos_token=None, unk_token=None,
        additional_special_tokens=[IM_START, IM_END], model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHATML_TEMPLATE
    hf.save_pretrained(out_dir)
    return hf
