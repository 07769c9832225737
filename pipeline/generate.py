"""Load a trained student folder and answer one chat prompt with it (``fnet-distill generate``)."""

from __future__ import annotations

from pathlib import Path

from cache.util import UserError
from pipeline.evaluate import not_a_model_folder


def load_student(model_dir: Path, device: str = "auto", verify: bool = True):
    """(model, tokenizer) from a student folder written by train-student (tokenizer included); anything else
    (a missing folder, another model type, a broken config, with ``verify`` a file that does not match the
    folder's manifest.json) is refused with one line."""
    import json

    from transformers import AutoTokenizer

    from student.checkpoint import check_folder_manifest
    from student.device import resolve_device
    from student.modeling import CausalFNetForCausalLM

    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not config.is_file():
        raise UserError(not_a_model_folder(model_dir))
    try:
        kind = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"{config} is not a valid model config ({e}); pass a folder written by "
                        "train-student (OUT/final)") from None
    student_type = CausalFNetForCausalLM.config_class.model_type
    if kind != student_type:
        raise UserError(f"{model_dir} holds a {kind!r} model, not a student ({student_type!r}); generate "
                        "runs students only (score other causal LMs with fnet-distill eval --model)")
    if verify:
        check_folder_manifest(model_dir, "--model")
    torch_device = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"no usable tokenizer in {model_dir} ({str(e).splitlines()[0]}); save the teacher's "
                        "tokenizer into the model folder with tokenizer.save_pretrained") from None
    try:
        model = CausalFNetForCausalLM.from_pretrained(model_dir).to(torch_device).eval()
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the student from {model_dir} ({str(e).splitlines()[0]}); pass a "
                        "complete folder written by train-student") from None
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
    room = model.config.max_position_embeddings - ids.shape[1]
    if room <= 0:
        raise UserError(f"the chat-formatted prompt has {ids.shape[1]} tokens but the model takes at most "
                        f"{model.config.max_position_embeddings}; shorten the prompt")
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = model.generate_fast(ids, max_new_tokens=min(max_new_tokens, room), temperature=temperature,
                              top_k=top_k, eos_token_id=tokenizer.eos_token_id, generator=gen)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
