"""A tiny student folder (full or compacted vocabulary) with a tiny word-level tokenizer, for the tests that
load students the way outside tools do (trust_remote_code in a bare process, lm-evaluation-harness)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<pad>", "<eos>", "<unk>"] + [str(i) for i in range(10)] + [
    "the", "a", "is", "and", "of", "to", "answer", "question", "sum", "plus", "equals", "cat", "dog", "red",
    "blue", "one", "two", "three", "four", "five", "+", "=", ":", "?", ".", ","]
PAD, EOS = 0, 1


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_student(seed: int = 0, **overrides):
    from student.modeling import CausalFNetConfig, CausalFNetForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, intermediate_size=32,
               stft_window_size=4, max_position_embeddings=64, hidden_dropout_prob=0.0, pad_token_id=PAD,
               eos_token_id=EOS)
    model = CausalFNetForCausalLM(CausalFNetConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():  # larger weights than the init so that the tokens depend on the input
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def save_student(model, folder: Path) -> Path:
    """``save_pretrained`` + the tokenizer, as the training code writes a student folder."""
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
