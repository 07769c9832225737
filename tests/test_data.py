"""GSM8K loading, chat formatting with the real Qwen2 tokenizer, assistant-only masks, overflow policy and
the input errors a user can make."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cache.util import UserError
from pipeline.data import dataset_hash, format_example, load_examples, load_tokenizer, tokenize_examples


@pytest.fixture(scope="module")
def examples(gsm8k_slice):
    return load_examples(str(gsm8k_slice))


def test_loads_the_jsonl_rows_in_order(gsm8k_slice, examples):
    raw = [json.loads(line) for line in gsm8k_slice.read_text().splitlines()]
    assert [(e.question, e.answer) for e in examples] == [(r["question"], r["answer"]) for r in raw]
    assert [e.row for e in examples] == list(range(len(raw)))
    assert len(load_examples(str(gsm8k_slice), limit=5)) == 5


def test_parquet_and_folder_give_the_same_rows(gsm8k_slice, examples, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in gsm8k_slice.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    assert load_examples(str(tmp_path / "train.parquet")) == examples
    assert load_examples(str(tmp_path), split="train") == examples


def test_masks_cover_exactly_answer_and_closing_eos(qwen_tokenizer, examples):
    data = tokenize_examples(qwen_tokenizer, examples, max_length=4096)
    eos = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert qwen_tokenizer.eos_token_id == eos
    assert qwen_tokenizer.pad_token_id == qwen_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert len(data.seqs) == len(examples) and data.dropped == data.truncated == 0
    by_row = {e.row: e for e in examples}
    for s in data.seqs:
        ex = by_row[s.row]
        assert s.input_ids.dtype == np.int32 and s.loss_mask.dtype == bool
        assert s.input_ids[-1] == eos
        assert qwen_tokenizer.decode(s.input_ids[s.loss_mask]) == ex.answer + "<|im_end|>"
        assert s.loss_mask[s.assistant_start:].all() and not s.loss_mask[: s.assistant_start].any()
        user = [{"role": "user", "content": ex.question}]
        prompt = qwen_tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        assert qwen_tokenizer.decode(s.input_ids[: s.assistant_start]) == prompt
        assert "You are a helpful assistant." in prompt
        full = qwen_tokenizer.apply_chat_template(
            [{"role": "user", "content": ex.question}, {"role": "assistant", "content": ex.answer}],
            tokenize=False)
        assert full == qwen_tokenizer.decode(s.input_ids) + "\n"


def test_sequences_are_length_ordered_with_stable_ids(qwen_tokenizer, examples):
    data = tokenize_examples(qwen_tokenizer, examples, max_length=4096)
    lengths = [len(s) for s in data.seqs]
    assert lengths == sorted(lengths, reverse=True)
    assert [s.seq_id for s in data.seqs] == list(range(len(examples)))
    again = tokenize_examples(qwen_tokenizer, examples, max_length=4096)
    assert all(np.array_equal(a.input_ids, b.input_ids) and a.row == b.row
               for a, b in zip(data.seqs, again.seqs))


def test_overflow_drop_and_truncate(qwen_tokenizer, examples):
    full = {s.row: s for s in tokenize_examples(qwen_tokenizer, examples, max_length=4096).seqs}
    max_length = 150
    longer = [r for r, s in full.items() if len(s) > max_length]
    no_room = [r for r in longer if full[r].assistant_start >= max_length]
    assert longer and len(longer) < len(examples)

    dropped = tokenize_examples(qwen_tokenizer, examples, max_length=max_length, overflow="drop")
    assert dropped.dropped == len(longer) and dropped.truncated == 0
    assert {s.row for s in dropped.seqs} == set(full) - set(longer)

    cut = tokenize_examples(qwen_tokenizer, examples, max_length=max_length, overflow="truncate")
    assert cut.truncated == len(longer) - len(no_room) and cut.dropped == len(no_room)
    for s in cut.seqs:
        ref = full[s.row]
        assert len(s) == min(len(ref), max_length)
        assert np.array_equal(s.input_ids, ref.input_ids[: len(s)])
        assert s.assistant_start == ref.assistant_start and s.loss_mask[s.assistant_start:].all()
        assert s.truncated == (len(ref) > max_length)
        if s.truncated:
            assert qwen_tokenizer.eos_token_id not in s.input_ids[s.assistant_start:].tolist()


def test_format_example_prompt_is_prefix(qwen_tokenizer):
    ids, start = format_example(qwen_tokenizer, "What is 2+2?", "2+2 = 4\n#### 4")
    prompt = qwen_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=True,
                                                add_generation_prompt=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert ids[:start] == list(prompt)
    assert qwen_tokenizer.decode(ids[start:]) == "2+2 = 4\n#### 4<|im_end|>"


def test_dataset_hash_follows_the_texts_used(examples):
    assert dataset_hash(examples) == dataset_hash(list(examples))
    assert dataset_hash(examples[:5]) != dataset_hash(examples)


def test_malformed_jsonl_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed JSON"):
        load_examples(str(p))


@pytest.mark.parametrize("row, field", [({"question": "q", "answer": ""}, "answer"),
                                        ({"answer": "a"}, "question"),
                                        ({"question": "  ", "answer": "a"}, "question")])
def test_missing_or_empty_field_names_the_row(tmp_path, row, field):
    p = tmp_path / "rows.jsonl"
    p.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=rf"row 2: the '{field}' field is (missing|empty); fix or remove"):
        load_examples(str(p))


def test_bad_policy_and_missing_file(tmp_path, qwen_tokenizer):
    with pytest.raises(UserError, match="--overflow"):
        tokenize_examples(qwen_tokenizer, [], overflow="wrap")
    with pytest.raises(UserError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "no-tokenizer"))


def test_hub_unreachable_says_to_pass_a_local_path(tmp_path):
    code = ("from pipeline.data import load_examples\n"
            "from cache.util import UserError\n"
            "try:\n    load_examples('openai/gsm8k', 'train')\n"
            "except UserError as e:\n    print('USERERROR', e)\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    line = [x for x in out.stdout.splitlines() if x.startswith("USERERROR")]
    assert line, out.stdout + out.stderr
    assert "pass a local path" in line[0] and "--dataset" in line[0]
