"""The embedded demo assets: problem generator, tokenizer, teacher and the cached builder."""

from __future__ import annotations

import ast
import json
import operator
import random
import re
from fractions import Fraction

import pytest

from cache.util import UserError
from pipeline.demo import assets as assets_mod
from pipeline.demo.assets import build_demo_assets
from pipeline.demo.problems import (
    TEMPLATES,
    generate_splits,
    is_test_question,
    iter_problems,
    teacher_pool,
    write_jsonl,
)
from pipeline.demo.teacher import encode_chat_rows, evaluate_teacher
from pipeline.demo.tokenizer import DEFAULT_SYSTEM_PROMPT, IM_END, IM_START, PAD_TOKEN

NOTE = re.compile(r"<<([^<>=]+)=([^<>]+)>>(\S*)")
NUMBER = re.compile(r"\d+")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(expr: str) -> Fraction:
    """Exact arithmetic on + - * / and integer literals (an evaluator independent of the generator)."""
    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        raise ValueError(f"unexpected node in {expr!r}: {ast.dump(node)}")

    return walk(ast.parse(expr, mode="eval").body)


def _check_problem(row: dict) -> None:
    assert set(row) == {"question", "answer"}
    lines = row["answer"].split("\n")
    final = re.fullmatch(r"#### (-?\d+)", lines[-1])
    assert final, row["answer"]
    results, operands = [], set()
    for line in lines[:-1]:
        notes = NOTE.findall(line)
        assert len(notes) == 1, line
        expr, result, shown = notes[0]
        value = _evaluate(expr)
        assert value.denominator == 1 and value == int(result), line
        assert shown.rstrip(".") == result, line
        assert f"{expr} = " in line, line
        results.append(int(result))
        operands |= set(NUMBER.findall(expr))
    assert 1 <= len(results) <= 3
    assert int(final.group(1)) == results[-1]
    assert set(NUMBER.findall(row["question"])) <= operands, row


def test_every_template_answers_recompute():
    rng = random.Random(0)
    for template in TEMPLATES:
        for _ in range(40):
            question, steps, final = template(rng)
            _check_problem({"question": question, "answer": "\n".join(steps) + f"\n#### {final}"})


def test_splits_recompute_deterministic_and_disjoint(tmp_path):
    train, test = generate_splits(400, 100, seed=3)
    for row in train + test:
        _check_problem(row)
    assert (train, test) == generate_splits(400, 100, seed=3)
    assert generate_splits(400, 100, seed=4)[0] != train
    qs_train, qs_test = [r["question"] for r in train], [r["question"] for r in test]
    assert len(set(qs_train)) == 400 and len(set(qs_test)) == 100
    assert not set(qs_train) & set(qs_test)
    first_words = {r["question"].split(" ")[0] for r in train}
    assert len(first_words) > 10
    write_jsonl(tmp_path / "t.jsonl", test)
    assert [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()] == test


def test_held_out_questions_never_reach_a_training_set():
    _, test = generate_splits(50, 200, seed=0)
    train_big, _ = generate_splits(2000, 16, seed=0)
    pool = teacher_pool(3000, seed=0)
    assert all(is_test_question(r["question"]) for r in test)
    held_out = {r["question"] for r in test}
    assert not held_out & {r["question"] for r in train_big + pool}
    for row in pool[:200]:
        _check_problem(row)
    assert pool == teacher_pool(3000, seed=0) and pool[:50] != train_big[:50]


def test_stream_prefix_is_stable():
    a, b = iter_problems(7), iter_problems(7)
    assert [next(a) for _ in range(20)] == [next(b) for _ in range(20)]


def test_impossible_sizes_are_user_errors():
    with pytest.raises(UserError):
        generate_splits(0, 5)


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("demo") / "assets", scale=0.05, seed=0, tiny=True)


@pytest.fixture(scope="module")
def demo_tokenizer(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)


def test_tokenizer_round_trips_and_special_tokens(demo_tokenizer, tiny_assets):
    tok = demo_tokenizer
    texts = [json.loads(line)["answer"] for line in tiny_assets.test_jsonl.read_text().splitlines()[:5]]
    texts += ["  Ünïcode ✓ 12345 tabs\tand\nnewlines  ", "x<<3*4=12>>12\n#### 12"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    digits = tok("1234567", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(digits) == list("1234567")
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == (PAD_TOKEN, IM_END, None)
    ids = {t: tok.convert_tokens_to_ids(t) for t in (PAD_TOKEN, IM_START, IM_END)}
    assert sorted(ids.values()) == [0, 1, 2]
    assert tok.pad_token_id == ids[PAD_TOKEN] and tok.eos_token_id == ids[IM_END]
    text = f"{IM_START}user\nhi{IM_END}"
    encoded = tok(text, add_special_tokens=False)["input_ids"]
    assert encoded[0] == ids[IM_START] and encoded[-1] == ids[IM_END]
    assert tok(text)["input_ids"] == encoded
    assert tok.decode(encoded, skip_special_tokens=True) == "user\nhi"
    assert 300 < len(tok) <= 1024


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!\n#### 5"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "a\nb"},
     {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}],
]


def test_chat_template_structure(demo_tokenizer):
    rendered = demo_tokenizer.apply_chat_template(CONVERSATIONS[1], tokenize=False,
                                                  add_generation_prompt=True)
    assert rendered == (f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n{IM_START}user\nHi{IM_END}\n"
                        f"{IM_START}assistant\nHello!\n#### 5{IM_END}\n{IM_START}assistant\n")


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_matches_qwen2(demo_tokenizer, qwen_tokenizer, generation_prompt):
    for messages in CONVERSATIONS:
        ours = demo_tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=generation_prompt)
        theirs = qwen_tokenizer.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=generation_prompt)
        assert ours == theirs


def test_stage_one_reads_the_demo_data(tiny_assets, demo_tokenizer):
    from pipeline.data import DataConfig, load_examples, load_tokenized

    folder = str(tiny_assets.train_jsonl.parent)
    rows = [json.loads(line) for line in tiny_assets.test_jsonl.read_text().splitlines()]
    examples = load_examples(folder, "test")
    assert [(e.question, e.answer) for e in examples] == [(r["question"], r["answer"]) for r in rows]
    data = load_tokenized(demo_tokenizer, DataConfig(dataset=folder, split="train"))
    assert len(data.seqs) == 32 and data.dropped == 0


def test_loss_mask_covers_the_answer_and_im_end(demo_tokenizer, tiny_assets):
    rows = [json.loads(line) for line in tiny_assets.test_jsonl.read_text().splitlines()[:4]]
    for row, (ids, mask) in zip(rows, encode_chat_rows(demo_tokenizer, rows, 512)):
        assert ids[-1] == demo_tokenizer.eos_token_id and mask[-1] and not mask[0]
        start = int(mask.argmax())
        assert mask[start:].all()
        assert demo_tokenizer.decode(ids[start:]) == row["answer"] + IM_END
        assert demo_tokenizer.decode(ids[:start]).endswith(f"{IM_START}assistant\n")


def test_teacher_trains_and_loads_back(tiny_assets, demo_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stats = tiny_assets.stats["teacher"]
    curve = stats["train_loss_curve"]
    assert sum(curve[-5:]) / 5 < curve[0] - 1.0
    assert stats["val"]["ce"] < stats["val_before"]["ce"] - 1.0
    assert stats["val"]["ce"] < stats["uniform_ce"] - 1.0

    model = AutoModelForCausalLM.from_pretrained(tiny_assets.teacher_dir).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == len(demo_tokenizer)
    assert model.generation_config.eos_token_id == demo_tokenizer.eos_token_id
    assert model.config.pad_token_id == demo_tokenizer.pad_token_id
    bundled = AutoTokenizer.from_pretrained(tiny_assets.teacher_dir)
    assert bundled.get_vocab() == demo_tokenizer.get_vocab()

    rows = [json.loads(line) for line in tiny_assets.test_jsonl.read_text().splitlines()]
    encoded = encode_chat_rows(demo_tokenizer, rows, 512)[: stats["config"]["eval_rows"]]
    again = evaluate_teacher(model, encoded, demo_tokenizer.pad_token_id)
    assert again["ce"] == pytest.approx(stats["val"]["ce"], rel=1e-4)

    # The same CE from a padded batch of unequal rows and from each row alone.
    ids, mask = encoded[0]
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids)[None]).logits[0, :-1]
    target = torch.from_numpy(ids[1:])[torch.from_numpy(mask[1:])]
    alone = torch.nn.functional.cross_entropy(logits[torch.from_numpy(mask[1:])], target, reduction="sum")
    single = evaluate_teacher(model, encoded[:1], demo_tokenizer.pad_token_id)
    assert single["ce"] * single["tokens"] == pytest.approx(float(alone), rel=1e-4)


def test_assets_layout_and_reuse(tiny_assets):
    teacher = tiny_assets.teacher_dir
    data, tokenizer = (tiny_assets.train_jsonl, tiny_assets.test_jsonl), tiny_assets.tokenizer_dir
    for path in (*data, tokenizer / "tokenizer.json",
                 teacher / "config.json", teacher / "generation_config.json", teacher / "tokenizer.json"):
        assert path.exists(), path
    assert tiny_assets.stats["reused"] is False
    train = [json.loads(line) for line in tiny_assets.train_jsonl.read_text().splitlines()]
    assert len(train) == 32
    root = tiny_assets.teacher_dir.parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = build_demo_assets(root, scale=0.05, seed=0, tiny=True)
    assert again.stats["reused"] is True and again.stats["key"] == tiny_assets.stats["key"]
    assert again.teacher_dir == tiny_assets.teacher_dir
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def _stub_teacher(tokenizer, train_rows, val_rows, out_dir, cfg, log=None) -> dict:
    """Stands in for the teacher where only the builder's caching is under test (the real one is above)."""
    from pathlib import Path

    Path(out_dir, "config.json").write_text(json.dumps({"steps": cfg.steps, "rows": len(train_rows)}))
    return {"val": {"ce": 1.0, "ppl": 2.7, "top1": 0.5}, "uniform_ce": 6.0, "parameters": 7, "wall_s": 0.0,
            "config": {"steps": cfg.steps}}


def _no_training(*args, **kwargs):
    raise AssertionError("the teacher was retrained although a matching shipped teacher exists")


def test_assets_rebuild_on_new_settings_and_survive_a_failed_build(tmp_path, monkeypatch):
    monkeypatch.setattr(assets_mod, "train_teacher", _stub_teacher)
    out = tmp_path / "assets"
    small = {"n_train": 24, "n_test": 6, "teacher_steps": 2, "tiny": True, "shipped": None}
    (tmp_path / ".assets.build-999999999-abc").mkdir()
    first = build_demo_assets(out, seed=1, **small)
    train_1 = first.train_jsonl.read_text()
    assert first.stats["reused"] is False and first.stats["teacher_source"] == "trained"

    second = build_demo_assets(out, seed=2, **small)
    assert second.stats["reused"] is False and second.stats["key"] != first.stats["key"]
    assert second.train_jsonl.read_text() != train_1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets"]

    def broken(*args, **kwargs):
        raise RuntimeError("teacher failed")

    with monkeypatch.context() as patch:
        patch.setattr(assets_mod, "train_teacher", broken)
        with pytest.raises(RuntimeError):
            build_demo_assets(out, seed=3, **small)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets"]
    assert build_demo_assets(out, seed=2, **small).stats["reused"] is True

    for changed in ({"n_train": 25}, {"n_test": 7}, {"teacher_steps": 3}):
        sizes = {**small, **changed}
        rebuilt = build_demo_assets(out, seed=2, **sizes)
        assert rebuilt.stats["reused"] is False
        written = json.loads((rebuilt.teacher_dir / "config.json").read_text())
        assert written == {"steps": sizes["teacher_steps"], "rows": assets_mod.TINY_POOL}
        assert len(rebuilt.train_jsonl.read_text().splitlines()) == sizes["n_train"]
    assert build_demo_assets(out, scale=1, seed=2, **sizes).stats["reused"] is True
    assert build_demo_assets(out, scale=0.5, seed=2, **sizes).stats["reused"] is False


def test_shipped_teacher_fingerprint_rule(tmp_path, monkeypatch):
    """A shipped teacher is used while its fingerprint (generator version, tokenizer recipe, teacher
    config, pool, seed) matches and its files are intact; any change retrains it."""
    monkeypatch.setattr(assets_mod, "train_teacher", _stub_teacher)
    shipped = tmp_path / "shipped"
    recipe_args = {"tiny": True, "teacher_steps": 2}
    assets_mod.ship_teacher(shipped, seed=0, **recipe_args)
    fp = json.loads((shipped / assets_mod.FINGERPRINT).read_text())
    assert fp["fingerprint"] == assets_mod.json_hash(assets_mod.teacher_recipe(0, **recipe_args))
    assert set(fp["files"]) == {p.name for p in (shipped / "teacher").iterdir()}

    def build(name: str):
        return build_demo_assets(tmp_path / name, n_train=24, n_test=6, shipped=shipped, **recipe_args)

    with monkeypatch.context() as patch:
        patch.setattr(assets_mod, "train_teacher", _no_training)
        used = build("a")
    assert used.stats["teacher_source"] == "shipped"
    shipped_config = (shipped / "teacher" / "config.json").read_bytes()
    assert (used.teacher_dir / "config.json").read_bytes() == shipped_config
    assert (used.tokenizer_dir / "tokenizer.json").is_file()

    for attr in ("GENERATOR_VERSION", "TOKENIZER_VERSION", "RECIPE_VERSION", "VOCAB_SIZE", "TINY_POOL"):
        with monkeypatch.context() as patch:
            patch.setattr(assets_mod, attr, getattr(assets_mod, attr) + 1)
            recipe = assets_mod.teacher_recipe(0, **recipe_args)
            usable, why = assets_mod.shipped_teacher_status(recipe, shipped)
            assert not usable and "another recipe" in why, attr
            rebuilt = build(f"b-{attr}")
            assert rebuilt.stats["teacher_source"] == "trained", attr

    (shipped / "teacher" / "config.json").write_text("{}")
    usable, why = assets_mod.shipped_teacher_status(assets_mod.teacher_recipe(0, **recipe_args), shipped)
    assert not usable and "do not match" in why
    assert build("c").stats["teacher_source"] == "trained"


def test_the_shipped_teacher_matches_the_current_recipe():
    """Fails when the generator, tokenizer or teacher recipe changed without `make demo-teacher`."""
    usable, why = assets_mod.shipped_teacher_status(assets_mod.teacher_recipe(0))
    assert usable, why
    size = sum(p.stat().st_size for p in assets_mod.SHIPPED_DIR.rglob("*") if p.is_file())
    assert size <= 20 * 2**20


def test_assets_refuse_a_foreign_folder_and_bad_scale(tmp_path):
    (tmp_path / "mine.txt").write_text("not demo assets")
    with pytest.raises(UserError):
        build_demo_assets(tmp_path, scale=0.05)
    assert (tmp_path / "mine.txt").exists()
    with pytest.raises(UserError):
        build_demo_assets(tmp_path / "new", scale=0)
