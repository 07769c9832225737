"""Load a trained student folder and answer one chat prompt with it (``fnet-distill generate``)."""

from __future__ import annotations

from pathlib import Path

from cache.util import UserError
from pipeline.evaluate import load_eval_model, load_eval_tokenizer


def load_student(model_dir: Path, device: str = "auto", verify: bool = True):
    """(model, tokenizer) from a student folder written by train-student (tokenizer included): the FNet or a
    transformers student (any causal LM folder with its tokenizer loads the same way), through the loaders
    of ``fnet-distill eval``. A missing folder, a broken config, a folder without a tokenizer and, with
    ``verify``, a file that does not match the folder's manifest.json are refused with one line."""
    model, _ = load_eval_model(str(model_dir), device=device, dtype="float32", verify=verify)
    tokenizer = load_eval_tokenizer(str(model_dir), instead="save the teacher's tokenizer into the model "
                                                            "folder with tokenizer.save_pretrained")
    return model, tokenizer


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
                  top_k: int | None = None, seed: int = 0) -> str:
    """Chat-format ``prompt`` (one user turn, generation prompt added), decode with the rolling state,
    stop at the tokenizer's eos; returns the new text without special tokens."""
    import torch

    if not prompt.strip():
        raise UserError("--prompt is empty; pass the question for the student to answer")
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=model.device)
    limit = getattr(model.config, "max_position_embeddings", None)
    room = max_new_tokens if limit is None else limit - ids.shape[1]
    if room <= 0:
        raise UserError(f"the chat-formatted prompt has {ids.shape[1]} tokens but the model takes at most "
                        f"{model.config.max_position_embeddings}; shorten the prompt")
    new = min(max_new_tokens, room)
    if hasattr(model, "generate_fast"):  # the FNet: its rolling-state decoder, seeded by its own generator
        gen = torch.Generator(device=model.device).manual_seed(seed)
        out = model.generate_fast(ids, max_new_tokens=new, temperature=temperature, top_k=top_k,
                                  eos_token_id=tokenizer.eos_token_id, generator=gen)
    else:  # any other causal LM: transformers' generate on its KV cache, seeded through torch
        sampling = temperature > 0
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 do_sample=sampling, temperature=temperature if sampling else None,
                                 top_k=(top_k or 0) if sampling else None, top_p=None,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
