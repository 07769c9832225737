"""``fnet-distill eval``: the real CLI on a tiny student, greedy outputs against the models' own unbatched
``generate()``, the HF path on a Qwen2 folder, scoring through ``pipeline.answers``, and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cache.util import UserError
from pipeline.answers import extract_reference, score_output
from pipeline.cli import app
from pipeline.data import load_examples
from pipeline.evaluate import (
    EvalConfig,
    cut_at_stop,
    evaluate_examples,
    evaluate_model,
    left_pad,
    make_generate_fn,
)
from pipeline.prompts import prompt_ids, stop_token_ids
from student.modeling import CausalFNetConfig, CausalFNetForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

RECORD_FIELDS = {"row", "question", "reference", "output", "strict_answer", "flexible_answer",
                 "strict_correct", "flexible_correct", "new_tokens", "stopped"}
NEW_TOKENS = 12
IM_END = 151645




def _tiny_student(tokenizer, im_end_scale: float) -> CausalFNetForCausalLM:
    torch.manual_seed(1)
    cfg = CausalFNetConfig(vocab_size=151_936, hidden_size=16,
                           num_hidden_layers=2, intermediate_size=32, stft_window_size=48,
                           max_position_embeddings=512, hidden_dropout_prob=0.0,
                           pad_token_id=tokenizer.pad_token_id)
    model = CausalFNetForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked, prompt-dependent outputs; a larger <|im_end|> row makes some rows stop
        model.embeddings.word_embeddings.weight.mul_(20.0)
        model.lm_head.weight[IM_END].mul_(im_end_scale)
    return model


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, qwen_tokenizer, gsm8k_slice) -> Path:
    """A random student (real Qwen2 vocabulary, W=48 so the question reaches the output) saved with its
    tokenizer. The <|im_end|> row is scaled until some greedy outputs stop early and some run out."""
    prompts = [prompt_ids(qwen_tokenizer, e.question, e.answer) for e in load_examples(str(gsm8k_slice))]
    for scale in (3.0, 2.5, 3.5, 4.0, 2.0, 5.0):
        model = _tiny_student(qwen_tokenizer, scale)
        gen = make_generate_fn(model, "student", stop_ids=[IM_END], pad_id=qwen_tokenizer.pad_token_id,
                               max_new_tokens=NEW_TOKENS)
        stopped = {cut_at_stop(row, [IM_END])[2] for row in gen(prompts)}
        if stopped == {True, False}:
            break
    path = tmp_path_factory.mktemp("student")
    model.save_pretrained(path)
    qwen_tokenizer.save_pretrained(path)
    return path


def _reference_outputs(model, tokenizer, examples, stop_ids, max_new_tokens) -> list[tuple[str, int, bool]]:
    """Each prompt alone (no padding) through the model's own HF ``generate`` (greedy)."""
    out = []
    for ex in examples:
        ids = torch.tensor([prompt_ids(tokenizer, ex.question, ex.answer)])
        with torch.no_grad():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
                                 pad_token_id=tokenizer.pad_token_id)
        kept, used, stopped = cut_at_stop(seq[0, ids.shape[1]:].tolist(), stop_ids)
        out.append((tokenizer.decode(kept, skip_special_tokens=True), used, stopped))
    return out


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -------------------------------------------------------------------------------------- the real CLI


def test_cli_on_student_writes_scored_records(student_dir, gsm8k_slice, tmp_path):
    out = tmp_path / "eval" / "student.jsonl"
    res = CliRunner().invoke(app, [
        "eval", "--model", str(student_dir), "--dataset", str(gsm8k_slice), "--split", "train",
        "--limit", "7", "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "3", "--device", "cpu",
        "--out", str(out), "--no-progress", "--json",
    ])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    records = _read(out)
    examples = load_examples(str(gsm8k_slice), limit=7)
    assert [r["row"] for r in records] == list(range(7))
    for rec, ex in zip(records, examples):
        assert set(rec) == RECORD_FIELDS
        assert rec["question"] == ex.question
        assert rec["reference"] == str(extract_reference(ex.answer))
        scored = score_output(rec["output"], ex.answer)
        assert rec["strict_correct"] == scored.strict and rec["flexible_correct"] == scored.flexible
        flexible = None if scored.flexible_answer is None else str(scored.flexible_answer)
        assert rec["flexible_answer"] == flexible
        assert 1 <= rec["new_tokens"] <= NEW_TOKENS
        assert rec["stopped"] or rec["new_tokens"] == NEW_TOKENS
    assert summary["n"] == 7 and summary["model_kind"] == "student"
    assert summary["strict_correct"] == sum(r["strict_correct"] for r in records)
    assert summary["flexible_correct"] == sum(r["flexible_correct"] for r in records)
    assert summary["new_tokens"] == sum(r["new_tokens"] for r in records)
    assert summary["outputs_path"] == str(out)
    assert not list(out.parent.glob(".*.tmp"))


def test_cli_prints_summary(student_dir, gsm8k_slice):
    res = CliRunner().invoke(app, ["eval", "--model", str(student_dir), "--dataset", str(gsm8k_slice),
                                   "--limit", "2", "--max-new-tokens", "3", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "strict" in res.output and "flexible" in res.output and "tok/s" in res.output


# ------------------------------------------------------------------------- greedy parity with generate()


def test_student_batched_outputs_equal_unbatched_hf_generate(student_dir, gsm8k_slice, tmp_path):
    from transformers import AutoTokenizer

    # The fast decoder on left-padded, length-sorted batches == HF generate (full recompute), one prompt
    # at a time.
    examples = load_examples(str(gsm8k_slice))
    res = evaluate_model(student_dir, str(gsm8k_slice), "train", max_new_tokens=NEW_TOKENS, batch_size=5,
                         device="cpu", out=tmp_path / "s.jsonl", progress=False)
    records = _read(tmp_path / "s.jsonl")
    model = CausalFNetForCausalLM.from_pretrained(student_dir).eval()
    tok = AutoTokenizer.from_pretrained(student_dir)
    ref = _reference_outputs(model, tok, examples, stop_token_ids(tok, model), NEW_TOKENS)
    assert [(r["output"], r["new_tokens"], r["stopped"]) for r in records] == ref
    assert {r["stopped"] for r in records} == {True, False}  # both the stop and the budget ends are covered
    assert len({r["output"] for r in records}) > 1  # the output depends on the question
    assert len({len(prompt_ids(tok, e.question, e.answer)) for e in examples}) > 1  # padding is exercised
    assert res.n == len(examples) and res.new_tokens == sum(r[1] for r in ref)


def test_compacted_student_matches_its_own_generate(student_dir, gsm8k_slice, tmp_path):
    # A vocabulary-compacted student reads and writes tokenizer ids; eval needs nothing special for it.
    from transformers import AutoTokenizer

    from student.modeling import compact_model

    tok = AutoTokenizer.from_pretrained(student_dir)
    examples = load_examples(str(gsm8k_slice), limit=4)
    full = CausalFNetForCausalLM.from_pretrained(student_dir).eval()
    keep = {t for e in examples for t in prompt_ids(tok, e.question, e.answer) + tok.encode(e.answer)}
    small = compact_model(full, sorted(keep | {IM_END, tok.pad_token_id} | set(range(0, 151_936, 97))))
    small.save_pretrained(tmp_path / "compact")
    tok.save_pretrained(tmp_path / "compact")
    evaluate_model(tmp_path / "compact", str(gsm8k_slice), limit=4, max_new_tokens=NEW_TOKENS, batch_size=4,
                   device="cpu", out=tmp_path / "c.jsonl", progress=False)
    records = _read(tmp_path / "c.jsonl")
    ref = _reference_outputs(small, tok, examples, stop_token_ids(tok, small), NEW_TOKENS)
    assert [(r["output"], r["new_tokens"], r["stopped"]) for r in records] == ref


@pytest.fixture(scope="module")
def context_qwen_dir(tmp_path_factory) -> Path:
    """A random Qwen2ForCausalLM whose greedy output depends on the question (initializer_range 0.2 makes
    attention peaked; the shared ``tiny_qwen_dir`` answers every prompt alike), so padding mistakes show."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151_936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=151643, eos_token_id=IM_END, pad_token_id=151643,
                      initializer_range=0.2)
    path = tmp_path_factory.mktemp("context_qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def test_teacher_folder_through_cli_uses_hf_path(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, tmp_path):
    out = tmp_path / "teacher.jsonl"
    res = CliRunner().invoke(app, [
        "eval", "--model", str(tiny_qwen_dir), "--tokenizer", str(qwen_tokenizer_dir), "--dataset",
        str(gsm8k_slice), "--limit", "3", "--max-new-tokens", "4", "--device", "cpu", "--out", str(out),
        "--no-progress", "--json",
    ])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["model_kind"] == "hf"
    assert [set(r) for r in _read(out)] == [RECORD_FIELDS] * 3


def test_teacher_batched_left_padded_equals_unbatched_hf_generate(context_qwen_dir, qwen_tokenizer_dir,
                                                                  gsm8k_slice, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = evaluate_model(context_qwen_dir, str(gsm8k_slice), "train", limit=6, max_new_tokens=6,
                         batch_size=3, device="cpu", tokenizer=qwen_tokenizer_dir, out=tmp_path / "t.jsonl",
                         progress=False)
    assert res.model_kind == "hf" and res.n == 6
    records = _read(tmp_path / "t.jsonl")
    model = AutoModelForCausalLM.from_pretrained(context_qwen_dir).eval()
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    examples = load_examples(str(gsm8k_slice), limit=6)
    ref = _reference_outputs(model, tok, examples, stop_token_ids(tok, model), 6)
    assert [(r["output"], r["new_tokens"], r["stopped"]) for r in records] == ref
    assert len({r["output"] for r in records}) > 1


# ------------------------------------------------------------------------------------ prompts, scoring


def test_prompt_is_the_chat_template_with_default_system_prompt(qwen_tokenizer):
    ids = prompt_ids(qwen_tokenizer, "What is 2+3?", "2+3=5\n#### 5")
    text = qwen_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                              add_generation_prompt=True)
    assert qwen_tokenizer.decode(ids) == text
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")


def test_recorded_outputs_are_scored_strict_and_flexible(qwen_tokenizer, gsm8k_slice, tmp_path):
    # A "model" that answers with the reference solution (then <|im_end|> and junk) is strict-correct on
    # every row; one that writes only "The answer is N." is flexible-correct but not strict-correct.
    examples = load_examples(str(gsm8k_slice))
    by_prompt = {tuple(prompt_ids(qwen_tokenizer, e.question, e.answer)): e for e in examples}
    seen_batches = []

    def copy_answer(prompts):
        seen_batches.append([len(p) for p in prompts])
        rows = [qwen_tokenizer.encode(by_prompt[tuple(p)].answer) + [IM_END] for p in prompts]
        return [r + [qwen_tokenizer.pad_token_id] * (60 - len(r) % 60) for r in rows]

    res = evaluate_examples(examples, qwen_tokenizer, copy_answer, stop_ids=[IM_END], batch_size=4,
                            out=tmp_path / "copy.jsonl", progress=False)
    records = _read(tmp_path / "copy.jsonl")
    assert res.strict_acc == 1.0 and res.flexible_acc == 1.0 and res.strict_correct == len(examples)
    assert [r["output"] for r in records] == [e.answer for e in examples]
    assert all(r["stopped"] for r in records)
    assert res.new_tokens == sum(len(qwen_tokenizer.encode(e.answer)) + 1 for e in examples)
    assert all(b == sorted(b, reverse=True) for b in seen_batches)  # length-sorted batches

    def plain_number(prompts):
        return [qwen_tokenizer.encode(f"The answer is {extract_reference(by_prompt[tuple(p)].answer)}.")
                for p in prompts]

    res = evaluate_examples(examples, qwen_tokenizer, plain_number, stop_ids=[IM_END], batch_size=5,
                            progress=False)
    assert res.strict_correct == 0 and res.flexible_correct == len(examples) and res.outputs_path is None


def test_cut_at_stop_and_left_pad():
    assert cut_at_stop([5, 6, 9, 7, 9], [9, 8]) == ([5, 6], 3, True)
    assert cut_at_stop([5, 6], [9]) == ([5, 6], 2, False)
    assert cut_at_stop([8], [9, 8]) == ([], 1, True)
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_stop_ids_include_im_end_and_model_eos(qwen_tokenizer, tiny_qwen_dir):
    from transformers import AutoModelForCausalLM

    assert stop_token_ids(qwen_tokenizer) == [IM_END]
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir)
    model.generation_config.eos_token_id = [IM_END, 151643]
    assert stop_token_ids(qwen_tokenizer, model) == [151643, IM_END]


# ---------------------------------------------------------------------------------------------- errors


def test_missing_model_folder(gsm8k_slice, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        evaluate_model(tmp_path / "nope", str(gsm8k_slice), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        evaluate_model(tmp_path / "empty", str(gsm8k_slice), progress=False)


def test_folder_without_tokenizer_asks_for_tokenizer(tiny_qwen_dir, gsm8k_slice):
    with pytest.raises(UserError, match="--tokenizer"):
        evaluate_model(tiny_qwen_dir, str(gsm8k_slice), progress=False)


def test_dataset_errors_come_from_the_loader(student_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        evaluate_model(student_dir, str(tmp_path / "missing.jsonl"), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(UserError, match="answer"):
        evaluate_model(student_dir, str(bad), progress=False)


def test_bad_reference_is_refused_before_generating(qwen_tokenizer):
    from pipeline.data import Example

    def must_not_run(prompts):
        raise AssertionError("generated before checking the references")

    with pytest.raises(UserError, match="####"):
        evaluate_examples([Example(0, "What is 2+2?", "4")], qwen_tokenizer, must_not_run, stop_ids=[IM_END],
                          progress=False)
    with pytest.raises(UserError, match="no examples"):
        evaluate_examples([], qwen_tokenizer, must_not_run, stop_ids=[IM_END], progress=False)


def test_prompt_past_the_position_limit_is_refused(qwen_tokenizer, gsm8k_slice):
    examples = load_examples(str(gsm8k_slice))
    with pytest.raises(UserError, match="--max-new-tokens"):
        evaluate_examples(examples, qwen_tokenizer, lambda p: [[IM_END]] * len(p), stop_ids=[IM_END],
                          max_prompt_tokens=40, progress=False)


@pytest.mark.parametrize("field,value", [("limit", 0), ("max_new_tokens", 0), ("batch_size", 0)])
def test_config_validation(field, value):
    with pytest.raises(UserError, match=field.replace("_", "-")):
        EvalConfig(model="m", **{field: value})


@pytest.mark.slow
def test_cli_error_is_one_line(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "from pipeline.cli import main; main()", "eval", "--model",
           str(tmp_path / "x")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: model folder")
