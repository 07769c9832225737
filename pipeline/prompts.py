"""The prompt a model is asked to continue and the tokens that end its answer, shared by the teacher
writing solutions (stage one, ``--write``) and the evaluation: the tokenizer's chat template with its default
system prompt and the user turn(s), then the assistant generation prompt, exactly the prompt part of a
training sequence (``pipeline.data.format_example``)."""

from __future__ import annotations

from typing import Any

from pipeline.data import chat_prompt_ids, format_example
from pipeline.rows import Example

STOP_TOKEN = "<|im_end|>"


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """``<|im_end|>`` (when the tokenizer has it), the tokenizer's eos and the model's generation eos ids."""
    ids = {int(tokenizer.eos_token_id)}
    im_end = tokenizer.convert_tokens_to_ids(STOP_TOKEN)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
    return sorted(ids)


def prompt_ids(tokenizer: Any, question: str, answer: str) -> list[int]:
    """The chat prompt of one example, exactly the prompt part of the training sequence."""
    ids, start = format_example(tokenizer, question, answer)
    return ids[:start]


def example_prompt_ids(tokenizer: Any, ex: Example) -> list[int]:
    """The prompt of a row (``pipeline.data.Example``): a qa row's as ``prompt_ids``; a chat row's turns
    before its final reply, then the template's generation prompt."""
    if ex.turns is None:
        return prompt_ids(tokenizer, ex.question, ex.answer or "x")
    return chat_prompt_ids(tokenizer, ex.prompt_turns())
