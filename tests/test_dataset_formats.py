"""Your own data: messages (multi-turn), prompt/completion and question/answer rows, --field mapping,
--data-format, parquet and folders, the fingerprint, every bad row in one line, eval on such data, and a
messages dataset through teacher-cache -> train-student as real processes, its validation CE / KL /
agreement equal to a hand computation on exactly the assistant tokens.

Supervised tokens are checked against an independent construction: the ChatML text rendered here by string
concatenation, tokenised once, and the assistant spans found by character offsets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache.util import UserError
from pipeline.data import (
    Turn,
    chat_prompt_ids,
    dataset_hash,
    folder_files,
    format_chat,
    hub_config,
    load_examples,
    parse_fields,
    tokenize_examples,
)

TEACHER = Path(__file__).resolve().parents[1] / "pipeline" / "demo" / "pretrained" / "teacher"
SYSTEM = "You are a helpful assistant."  # the default system prompt of both ChatML templates


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import AutoTokenizer

    if not (TEACHER / "tokenizer.json").exists():
        pytest.skip("the shipped demo teacher is missing")
    return AutoTokenizer.from_pretrained(TEACHER)


@pytest.fixture(params=["demo", "qwen2"])
def tok(request, demo_tokenizer):
    return demo_tokenizer if request.param == "demo" else request.getfixturevalue("qwen_tokenizer")


def chatml(tokenizer, turns: list[Turn]) -> tuple[list[int], np.ndarray]:
    """The independent construction: render ChatML by hand up to the last supervised turn, tokenise it
    once, and mark the tokens inside each supervised turn's content + <|im_end|> by character offsets."""
    text, spans = "", []
    if turns[0].role != "system":
        text += f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    last = max(i for i, t in enumerate(turns) if t.supervised)
    for i, t in enumerate(turns[: last + 1]):
        text += f"<|im_start|>{t.role}\n"
        if t.supervised:
            spans.append((len(text), len(text) + len(t.content) + len("<|im_end|>")))
        text += t.content + "<|im_end|>" + ("\n" if i < last else "")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = np.array([any(lo <= a and b <= hi for lo, hi in spans) for a, b in enc["offset_mapping"]])
    return list(enc["input_ids"]), mask


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((json.dumps(r) if r is not None else "") + "\n" for r in rows))
    return path


def msg(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


CHAT = msg(("system", "Answer in one line."), ("user", "What is 2+3?"), ("assistant", "2+3 = 5\n#### 5"),
           ("user", "And times 4?"), ("assistant", "5*4 = 20\n#### 20"), ("user", "Thanks!"))


# ------------------------------------------------------------------------------ supervised tokens


def test_every_assistant_turn_and_nothing_else_is_supervised(tok, tmp_path):
    rows = [{"messages": CHAT}, {"messages": msg(("user", "Name a colour."), ("assistant", "Blue."))}]
    examples = load_examples(str(write_jsonl(tmp_path / "m.jsonl", rows)))
    assert [e.kind for e in examples] == ["messages", "messages"]
    assert examples[0].answer == "5*4 = 20\n#### 20" and examples[0].question == "And times 4?"
    assert examples[0].turns[-1].content == "5*4 = 20\n#### 20"  # the trailing user turn teaches nothing
    for ex in examples:
        ids, mask = format_chat(tok, ex.chat())
        want_ids, want_mask = chatml(tok, list(ex.turns))
        assert ids == want_ids
        np.testing.assert_array_equal(mask, want_mask)
        replies = [t.content for t in ex.turns if t.role == "assistant"]
        assert [tok.decode(ids[a:b]) for a, b in runs(mask)] == [r + "<|im_end|>" for r in replies]
        assert ids[-1] == tok.eos_token_id
    data = tokenize_examples(tok, examples, max_length=512)
    seq = next(s for s in data.seqs if s.row == 0)
    assert len(runs(seq.loss_mask)) == 2 and seq.assistant_start == runs(seq.loss_mask)[0][0]


def test_the_three_formats_give_the_same_tokens_for_the_same_exchange(tok, tmp_path):
    q, a = "Tom has 3 apples and buys 2. How many?", "3 + 2 = 5\n#### 5"
    qa = load_examples(str(write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a}])))
    one = [{"messages": msg(("user", q), ("assistant", a))}]
    ms = load_examples(str(write_jsonl(tmp_path / "m.jsonl", one)))
    pc = load_examples(str(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": q, "completion": a}])))
    outs = [format_chat(tok, e[0].chat()) for e in (qa, ms, pc)]
    want_ids, want_mask = chatml(tok, [Turn("user", q), Turn("assistant", a, True)])
    for ids, mask in outs:
        assert ids == want_ids
        np.testing.assert_array_equal(mask, want_mask)
    # a prompt given as turns is context only: its assistant turn is not learned, the completion is
    turns = msg(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", q))
    pc2 = load_examples(str(write_jsonl(tmp_path / "pc2.jsonl", [{"prompt": turns, "completion": a}])))[0]
    ids, mask = format_chat(tok, pc2.chat())
    want_ids, want_mask = chatml(tok, [Turn(t["role"], t["content"]) for t in turns]
                                 + [Turn("assistant", a, True)])
    assert ids == want_ids and [tok.decode(ids[x:y]) for x, y in runs(mask)] == [a + "<|im_end|>"]
    np.testing.assert_array_equal(mask, want_mask)
    # TRL's conversational completion (a list of assistant turns) is the same as the string
    pc3 = load_examples(str(write_jsonl(tmp_path / "pc3.jsonl",
                                        [{"prompt": turns, "completion": msg(("assistant", a))}])))[0]
    assert format_chat(tok, pc3.chat())[0] == ids


def test_truncation_keeps_the_prefix_of_the_mask(demo_tokenizer, tmp_path):
    ex = load_examples(str(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}])))
    full = tokenize_examples(demo_tokenizer, ex, max_length=512).seqs[0]
    first, second = runs(full.loss_mask)
    cut = tokenize_examples(demo_tokenizer, ex, max_length=second[0] + 2, overflow="truncate")
    s = cut.seqs[0]
    assert cut.truncated == 1 and s.truncated and len(s) == second[0] + 2
    np.testing.assert_array_equal(s.loss_mask, full.loss_mask[: len(s)])
    dropped = tokenize_examples(demo_tokenizer, ex, max_length=first[0], overflow="truncate")
    assert dropped.dropped == 1 and not dropped.seqs  # no supervised token fits


# ------------------------------------------------------------------------------ mapping and sources


def test_field_mapping_reads_other_names(tmp_path):
    plain = load_examples(str(write_jsonl(tmp_path / "qa.jsonl", [{"question": "q1", "answer": "a1"}])))
    mapped = load_examples(str(write_jsonl(tmp_path / "p.jsonl", [{"problem": "q1", "solution": "a1"}])),
                           fields=["question=problem", "answer=solution"])
    assert mapped == plain
    share = [{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                                {"from": "gpt", "value": "hello"}]}]
    ex = load_examples(str(write_jsonl(tmp_path / "sg.jsonl", share)),
                       fields=("messages=conversations", "role=from", "content=value"))[0]
    assert ex.turns == (Turn("system", "s"), Turn("user", "hi"), Turn("assistant", "hello", True))
    assert parse_fields(["question=question", " answer = solution "]) == (("answer", "solution"),)
    # an explicit --data-format reads a row whose marking field is absent from detection's view
    got = load_examples(str(write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "completion": "c"}])),
                        data_format="prompt-completion")
    assert got[0].kind == "prompt-completion" and got[0].answer == "c"


def test_parquet_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": msg(("user", f"q{i}"), ("assistant", f"a{i}"))} for i in range(5)]
    want = load_examples(str(write_jsonl(tmp_path / "all.jsonl", rows)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "all.parquet")
    assert load_examples(str(tmp_path / "all.parquet")) == want

    hub = tmp_path / "hub"  # a Hub dataset's layout: data/<split>-NNNNN-of-NNNNN shards, mixed file types
    (hub / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:2]), hub / "data" / "train-00000-of-00002.parquet")
    write_jsonl(hub / "data" / "train-00001-of-00002.jsonl", rows[2:])
    write_jsonl(hub / "data" / "test-00000-of-00001.jsonl", rows[:1])
    assert load_examples(str(hub)) == want
    assert len(load_examples(str(hub), split="test")) == 1
    assert load_examples(str(hub), limit=3)[2].where.endswith("train-00001-of-00002.jsonl: row 1")

    loose = tmp_path / "loose"  # no split names at all: every file, by name
    loose.mkdir()
    write_jsonl(loose / "b.jsonl", rows[3:])
    write_jsonl(loose / "a.jsonl", rows[:3])
    (loose / "notes.txt").write_text("not data")
    assert [p.name for p in folder_files(loose, "train")] == ["a.jsonl", "b.jsonl"]
    assert load_examples(str(loose)) == want

    with pytest.raises(UserError, match=r"has no validation split .* holds test-00000"):
        load_examples(str(hub), split="validation")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .jsonl or .parquet files"):
        load_examples(str(tmp_path / "empty"))
    assert hub_config("openai/gsm8k", None) == "main" and hub_config("me/chats", None) is None
    assert hub_config("openai/gsm8k", "socratic") == "socratic"


def test_fingerprint_records_format_and_mapping_only_when_not_the_default(demo_tokenizer, tmp_path):
    from types import SimpleNamespace

    import torch

    from pipeline.teacher_cache import TeacherCacheConfig, build_fingerprint

    teacher = SimpleNamespace(identity={"name": "t"}, dtype=torch.float32)

    def fp(row_format="qa", **kw):
        cfg = TeacherCacheConfig(teacher="t", dataset="d.jsonl", out=tmp_path / "c", **kw)
        return build_fingerprint(cfg, teacher, demo_tokenizer, "h", row_format)["dataset"]

    assert fp() == {"hash": "h", "split": "train", "limit": None}  # what caches of GSM8K always had
    assert fp(fields=("question=question",)) == fp()  # an identity mapping is no mapping
    assert fp("messages")["format"] == "messages"
    assert fp(fields=("question=problem",))["fields"] == {"question": "problem"}
    assert fp(fields=("question=problem",)) != fp(fields=("question=title",))
    q = [load_examples(str(write_jsonl(tmp_path / f"{k}.jsonl", [r])))[0]
         for k, r in (("qa", {"question": "q", "answer": "a"}),
                      ("m", {"messages": msg(("user", "q"), ("assistant", "a"))}))]
    assert dataset_hash(q[:1]) != dataset_hash(q[1:])


# ------------------------------------------------------------------------------------ bad input

GOOD_M = {"messages": msg(("user", "Hi"), ("assistant", "Hello"))}
GOOD_PC = {"prompt": "Hi", "completion": "Hello"}

BAD_ROWS = [  # (first row, bad row on line 3 after a blank line, options, the one line)
    (GOOD_M, {"messages": msg(("user", "Hi"))}, {},
     r"row 3: the 'messages' field has no assistant turn, so nothing would be learned from it; add"),
    (GOOD_M, {"messages": msg(("user", "Hi"), ("tool", "x"), ("assistant", "a"))}, {},
     r"row 3: turn 2 of the 'messages' field has role 'tool'; roles must be one of system, user, assistant"),
    (GOOD_M, {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}, {},
     r"row 3: the content of turn 1 \(user\) of the 'messages' field is a list, not a string; give"),
    (GOOD_M, {"messages": msg(("user", "Hi"), ("assistant", " "))}, {},
     r"row 3: turn 2 \(assistant\) of the 'messages' field is empty; fix or remove"),
    (GOOD_M, {"messages": msg(("assistant", "Hello"), ("user", "Hi"))}, {},
     r"row 3: the 'messages' field starts with an assistant turn; put the user"),
    (GOOD_M, {"messages": "Hi"}, {}, r"row 3: the 'messages' field is a str, not a list of \{role, content"),
    (GOOD_M, {"messages": ["Hi"]}, {}, r"row 3: turn 1 of the 'messages' field is not an object with 'role'"),
    (GOOD_M, {"question": "q", "answer": "a"}, {},
     r"row 3: a qa row \(the 'question' field\), but .*m\.jsonl: row 1 is a messages row; one dataset"),
    (GOOD_PC, {"prompt": "Hi"}, {},
     r"row 3: the 'completion' field is missing \(a prompt-only file needs teacher-cache --write N"),
    (GOOD_PC, {"prompt": 7, "completion": "x"}, {}, r"row 3: the 'prompt' field is a int, not a string or a"),
    (GOOD_PC, {"prompt": "Hi", "completion": msg(("user", "x"))}, {},
     r"row 3: turn 1 of the 'completion' field has role 'user'; a completion holds assistant turns only"),
    (GOOD_PC, {"problem": "Hi", "completion": "x"},
     {"fields": ["prompt=problem"], "data_format": "prompt-completion"},
     r"row 1: the 'problem' field \(--field prompt=problem\) is missing, not a string or a list"),
    ({"question": "q", "messages": GOOD_M["messages"]}, GOOD_M, {},
     r"row 1: the row has the 'question' field and the 'messages' field, so its format is ambiguous; pick "
     r"one with --data-format qa or --data-format messages"),
    ({"text": "hi"}, GOOD_M, {},
     r"row 1: no 'question', 'messages' or 'prompt' field \(its fields: 'text'\); name yours with --field "
     r"question=NAME"),
    (GOOD_M, GOOD_M, {"data_format": "qa"},
     r"row 1: a messages row \(the 'messages' field\), but --data-format is qa"),
    (GOOD_M, GOOD_M, {"fields": ["question=problem"]},
     r"--field question=problem does not apply to messages rows"),
    (GOOD_M, GOOD_M, {"require_answer": False}, r"row 1: --write needs question or prompt rows, but the "
                                                r"dataset has messages rows"),
    (GOOD_M, GOOD_M, {"fields": ["question"]}, r"--field 'question' is not CANON=COLUMN"),
    (GOOD_M, GOOD_M, {"fields": ["query=q"]}, r"'query' is not a field this reads; the fields are question"),
    (GOOD_M, GOOD_M, {"fields": ["question=a", "question=b"]}, r"--field question is given twice"),
    (GOOD_M, GOOD_M, {"data_format": "chat"}, r"--data-format must be one of auto, qa, messages, "),
]


@pytest.mark.parametrize("first, bad, kw, line", BAD_ROWS)
def test_every_bad_input_is_one_line_with_its_row(tmp_path, first, bad, kw, line):
    path = write_jsonl(tmp_path / "m.jsonl", [first, None, bad])
    with pytest.raises(UserError, match=line) as info:
        load_examples(str(path), **kw)
    assert "\n" not in str(info.value)


def in_process(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["fnet-distill", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code, capsys.readouterr().err


def test_commands_refuse_bad_rows_and_unscorable_data_in_one_line(demo_tokenizer, tmp_path, monkeypatch,
                                                                  capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl",
                      [GOOD_M, None, {"messages": msg(("user", "Hi"), ("robot", "x"))}])
    code, err = in_process(monkeypatch, capsys, "teacher-cache", "--teacher", str(TEACHER), "--dataset",
                           str(bad), "--out", str(tmp_path / "c"), "--device", "cpu", "--no-progress")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "bad.jsonl: row 3: turn 2" in lines[0] and "'robot'" in lines[0]
    assert not (tmp_path / "c" / "manifest.json").exists()

    chats = write_jsonl(tmp_path / "chats.jsonl", [GOOD_M] * 3)
    code, err = in_process(monkeypatch, capsys, "eval", "--model", str(TEACHER), "--dataset", str(chats),
                           "--device", "cpu", "--no-progress")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "none of the 3 rows has a GSM8K-style reference answer" in lines[0] and "--val-cache" in lines[0]


# ------------------------------------------------------------------------------------------ eval


def test_eval_prompts_of_chat_rows_and_answers_out(demo_tokenizer, tmp_path):
    from pipeline.evaluate import evaluate_examples, write_answers
    from pipeline.prompts import prompt_ids

    q, a = "What is 2+3?", "2+3 = 5\n#### 5"
    qa = load_examples(str(write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a}])))
    rows = [{"messages": msg(("user", q), ("assistant", a))}, {"messages": CHAT}]
    multi = load_examples(str(write_jsonl(tmp_path / "m.jsonl", rows)))
    seen: list[list[int]] = []

    def answer_20(prompts):
        seen.extend(prompts)
        reply = demo_tokenizer("#### 20", add_special_tokens=False)["input_ids"]
        return [reply + [demo_tokenizer.eos_token_id] for _ in prompts]

    out = tmp_path / "records.jsonl"
    res = evaluate_examples(multi, demo_tokenizer, answer_20, stop_ids=[demo_tokenizer.eos_token_id],
                            progress=False, out=out)
    assert res.n == 2 and res.strict_correct == 1  # row 2's final reply is '#### 20'
    by_len = sorted(seen, key=len)
    assert by_len[0] == prompt_ids(demo_tokenizer, q, a)
    assert by_len[0] == chat_prompt_ids(demo_tokenizer, qa[0].prompt_turns())
    want_text = ("<|im_start|>system\nAnswer in one line.<|im_end|>\n"
                 "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
                 "<|im_start|>assistant\n2+3 = 5\n#### 5<|im_end|>\n"
                 "<|im_start|>user\nAnd times 4?<|im_end|>\n<|im_start|>assistant\n")
    assert by_len[1] == demo_tokenizer(want_text, add_special_tokens=False)["input_ids"]

    n = write_answers(out, tmp_path / "answers.jsonl", written_by="me")
    back = load_examples(str(tmp_path / "answers.jsonl"))
    assert n == 2 and [e.kind for e in back] == ["prompt-completion"] * 2
    assert [t[:2] for t in back[1].turns[:-1]] == [t[:2] for t in multi[1].prompt_turns()]
    assert not any(t.supervised for t in back[1].turns[:-1]) and back[1].answer == "#### 20"
    assert back[1].written_by == "me" and back[1].reference == "20"


# ------------------------------------------------------------------- teacher-cache -> train-student


def cli() -> list[str]:
    script = Path(sys.executable).parent / "fnet-distill"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cli() + args, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_messages_dataset_through_both_stages_matches_a_hand_computation(demo_tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from cache.reader import open_cache
    from cache.schema import FingerprintMismatch
    from pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache
    from student.modeling import CausalFNetForCausalLM

    words = ["red", "blue", "green", "seven", "apples", "cats", "three", "two"]
    rows = []
    for i in range(10):
        w, v = words[i % 8], words[(3 * i + 1) % 8]
        turns = [("user", f"Say {w}."), ("assistant", f"{w}."), ("user", f"Now {v} and {w}?"),
                 ("assistant", f"{v} and {w}.")]
        rows.append({"messages": msg(*([("system", "Be brief.")] if i % 3 == 0 else []), *turns)})
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    cache = tmp_path / "cache"
    run(["teacher-cache", "--teacher", str(TEACHER), "--dataset", str(data), "--out", str(cache),
         "--topk", "8", "--encoding", "exact", "--logprob-dtype", "float32", "--temperatures", "1",
         "--unit-size", "4", "--max-length", "128", "--device", "cpu", "--no-progress"])
    reader = open_cache(cache, verify_hashes="all")
    assert reader.fingerprint["dataset"]["format"] == "messages" and len(reader) == 10
    examples = load_examples(str(data))
    by_ids = {}
    for i in range(len(reader)):
        r = reader[i]
        ex = next(e for e in examples if format_chat(demo_tokenizer, e.chat())[0] == r.input_ids.tolist())
        want_ids, want_mask = chatml(demo_tokenizer, list(ex.turns))
        assert r.input_ids.tolist() == want_ids
        np.testing.assert_array_equal(r.loss_mask, want_mask)
        assert len(runs(r.loss_mask)) == 2
        by_ids[r.seq_id] = (np.asarray(want_ids), want_mask)

    out = tmp_path / "run"
    run(["train-student", "--cache", str(cache), "--val-cache", str(cache), "--out", str(out),
         "--hidden-size", "16", "--layers", "1", "--ffn", "32", "--window", "4", "--max-positions", "128",
         "--dropout", "0", "--steps", "3",
         "--batch-tokens", "512", "--lr", "3e-3", "--warmup", "1", "--eval-every", "3", "--save-every", "0",
         "--log-every", "1", "--num-workers", "0", "--device", "cpu", "--no-progress"])
    evals = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_ce" in m]
    got = evals[-1]

    # by hand: the trained student and the teacher on every sequence, at exactly the assistant tokens
    student = CausalFNetForCausalLM.from_pretrained(out / "final").eval()
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    ce = kl = agree = n = 0.0
    with torch.no_grad():
        for ids, mask in by_ids.values():
            x = torch.from_numpy(ids).long()[None]
            t = torch.from_numpy(np.flatnonzero(mask))
            logq = torch.log_softmax(student(input_ids=x).logits[0, t - 1].double(), -1)
            logp = torch.log_softmax(teacher(input_ids=x).logits[0, t - 1].double(), -1)
            ce -= logq.gather(1, x[0, t][:, None]).sum().item()
            top_p, top_i = logp.exp().topk(8, -1)
            q_top = logq.exp().gather(1, top_i)
            tail_p, tail_q = 1 - top_p.sum(1), 1 - q_top.sum(1)
            kl += ((top_p * (top_p.log() - q_top.log())).sum(1)
                   + tail_p * (tail_p.log() - tail_q.log())).sum().item()
            agree += (logq.argmax(-1) == top_i[:, 0]).sum().item()
            n += len(t)
    assert got["val_tokens"] == n == reader.manifest["num_supervised"]
    assert got["val_ce"] == pytest.approx(ce / n, rel=1e-4)
    assert got["val_kl"] == pytest.approx(kl / n, rel=1e-3, abs=1e-5)
    assert got["val_top1_agree"] == pytest.approx(agree / n)

    # the same conversations under another column name: same text, other mapping -> refused on resume
    renamed = write_jsonl(tmp_path / "conv.jsonl", [{"conversations": r["messages"]} for r in rows])
    with pytest.raises(FingerprintMismatch, match=r"differs: dataset\.fields\)"):
        run_teacher_cache(TeacherCacheConfig(
            teacher=str(TEACHER), dataset=str(renamed), out=cache, fields=("messages=conversations",), topk=8,
            encoding="exact", logprob_dtype="float32", temperatures=(1.0,), unit_size=4, max_length=128,
            device="cpu", progress=False))


def test_write_answers_prompt_rows_like_questions(demo_tokenizer, tmp_path):
    """--write on prompt rows: a prompt string writes what the same question writes (same text, tokens and
    teacher rows; another fingerprint), a prompt of turns conditions the writer on them, and the cached
    sequence is the prompt turns then the written reply."""
    from cache.reader import open_cache
    from pipeline.demo.problems import iter_problems
    from pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache

    it = iter_problems(5, stream="tests")
    probs = [next(it) for _ in range(3)]
    qs = write_jsonl(tmp_path / "q.jsonl", [{"question": p["question"]} for p in probs])
    ps = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p["question"]} for p in probs])
    system = "Answer with the number after ####."
    pl = write_jsonl(tmp_path / "pl.jsonl", [{"prompt": msg(("system", system), ("user", p["question"])),
                                              "completion": p["answer"]} for p in probs])

    def cache(data: Path, name: str):
        out = tmp_path / name
        run_teacher_cache(TeacherCacheConfig(
            teacher=str(TEACHER), dataset=str(data), out=out, topk=8, temperatures=(1.0,), max_length=256,
            unit_size=8, device="cpu", progress=False, write=2, keep="all", write_max_tokens=48,
            encoding="exact", logprob_dtype="float32"))
        r = open_cache(out, verify_hashes="all")
        return r, [r[i] for i in range(len(r))]

    rq, from_q = cache(qs, "q")
    rp, from_p = cache(ps, "p")
    assert rp.fingerprint["dataset"]["format"] == "prompt-completion"
    assert "format" not in rq.fingerprint["dataset"]
    assert len(from_q) == len(from_p) > 0
    for a, b in zip(from_q, from_p):
        for f in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))

    _, from_l = cache(pl, "pl")
    prompts = {tuple(chat_prompt_ids(demo_tokenizer, [Turn("system", system), Turn("user", p["question"])]))
               for p in probs}
    for r in from_l:
        start = r.assistant_start
        assert tuple(r.input_ids[:start].tolist()) in prompts
        assert r.loss_mask[start:].all() and not r.loss_mask[:start].any()
        assert r.input_ids[-1] == demo_tokenizer.eos_token_id
