"""``fnet-distill generate`` with the real Qwen2 tokenizer and chat template, full and compacted vocab."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from cache.util import UserError
from pipeline.generate import generate_text, load_student
from student.modeling import CausalFNetConfig, CausalFNetForCausalLM, compact_model

QWEN2_VOCAB = 151_936


def _student(tmp_path, qwen_tokenizer, name="student"):
    torch.manual_seed(0)
    cfg = CausalFNetConfig(vocab_size=QWEN2_VOCAB, hidden_size=16, num_hidden_layers=2, intermediate_size=32,
                           stft_window_size=4, max_position_embeddings=96, hidden_dropout_prob=0.0,
                           pad_token_id=qwen_tokenizer.pad_token_id)
    model = CausalFNetForCausalLM(cfg).eval()
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.mul_(40.0)
    model.save_pretrained(tmp_path / name)
    qwen_tokenizer.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def test_cli_generate_matches_hf_generate_on_the_chat_prompt(tmp_path, qwen_tokenizer):
    from pipeline.cli import app

    model, path = _student(tmp_path, qwen_tokenizer)
    prompt = "Natalia sold clips to 48 of her friends. How many clips did she sell?"
    result = CliRunner().invoke(app, ["generate", "--model", str(path), "--prompt", prompt,
                                      "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output

    text = qwen_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True)
    ids = torch.tensor([qwen_tokenizer(text, add_special_tokens=False)["input_ids"]])
    assert qwen_tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")
    hf = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=qwen_tokenizer.eos_token_id,
                        pad_token_id=qwen_tokenizer.pad_token_id)
    expected = qwen_tokenizer.decode(hf[0, ids.shape[1]:], skip_special_tokens=True)
    assert result.stdout == expected + "\n"


def test_compacted_student_reads_and_writes_tokenizer_ids(tmp_path, qwen_tokenizer):
    model, _ = _student(tmp_path, qwen_tokenizer)
    prompt = "What is 3 + 4?"
    text = qwen_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True)
    used = set(qwen_tokenizer(text, add_special_tokens=False)["input_ids"])
    used |= set(range(15, 40)) | {qwen_tokenizer.eos_token_id, qwen_tokenizer.pad_token_id}
    small = compact_model(model, sorted(used))
    assert small.lm_head.weight.shape[0] == len(used) < QWEN2_VOCAB / 1000
    small.save_pretrained(tmp_path / "small")
    qwen_tokenizer.save_pretrained(tmp_path / "small")
    loaded, tok = load_student(tmp_path / "small")
    out = generate_text(loaded, tok, prompt, max_new_tokens=10)
    assert isinstance(out, str)
    ids = torch.tensor([qwen_tokenizer(text, add_special_tokens=False)["input_ids"]])
    fast = loaded.generate_fast(ids, max_new_tokens=10, eos_token_id=qwen_tokenizer.eos_token_id)
    assert set(fast[0].tolist()) <= used
    full_logits = model(ids).logits[0, -1, sorted(used)]
    torch.testing.assert_close(loaded(ids).logits[0, -1, sorted(used)], full_logits, atol=1e-5, rtol=1e-5)


def test_cli_reports_a_folder_without_a_model(tmp_path):
    with pytest.raises(UserError, match="not a model folder"):
        load_student(tmp_path)
