"""Shared fixtures: the real Qwen2 tokenizer and GSM8K from ../shared (skipped when absent) and a tiny
randomly initialised ``Qwen2ForCausalLM`` with the real 151,936-row vocabulary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FNET_SHARED", REPO.parent / "shared"))
QWEN_TOKENIZER = SHARED / "tokenizers" / "qwen2"
GSM8K_DIR = SHARED / "data" / "gsm8k"
QWEN2_VOCAB = 151_936

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    if not (QWEN_TOKENIZER / "tokenizer_config.json").exists():
        pytest.skip(f"real Qwen2 tokenizer not found at {QWEN_TOKENIZER}")
    return QWEN_TOKENIZER


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.skip(f"GSM8K not found at {GSM8K_DIR}")
    return GSM8K_DIR


@pytest.fixture(scope="session")
def gsm8k_slice(gsm8k_dir, tmp_path_factory) -> Path:
    """The first 12 rows of the real GSM8K train split, as a local JSONL file."""
    out = tmp_path_factory.mktemp("gsm8k") / "train12.jsonl"
    with open(gsm8k_dir / "train.jsonl") as f:
        lines = [next(f) for _ in range(12)]
    out.write_text("".join(lines))
    return out


def make_tiny_qwen2(path: Path, *, vocab_size: int = QWEN2_VOCAB, hidden: int = 32, layers: int = 2,
                    seed: int = 0) -> Path:
    """Save a randomly initialised Qwen2ForCausalLM (real class) with ``save_pretrained``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    # Random init gives nearly uniform next-token distributions; scale the embeddings so the teacher
    # has peaked, informative distributions (closer to a real LM for top-k / tail tests).
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(40.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: on a shared 2-core machine several intra-op threads mostly wait on each other (up to ~15x
    slower than one). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
