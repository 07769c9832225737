"""The model card (``README.md``) of a saved student folder."""

from __future__ import annotations

import json

from tiny_student import save_student, tiny_student  # tests/ is on sys.path under pytest

from student.model_card import last_eval, parameter_count, write_model_card
from student.modeling import compact_model, count_parameters


def test_card_names_teacher_data_budget_metrics_and_usage(tmp_path):
    model = tiny_student()
    folder = save_student(model, tmp_path / "final")
    (folder / "train_config.json").write_text(json.dumps({"config": {"kd": "topk_tail", "alpha": 0.5,
                                                                      "temperature": 2.0, "lr": 0.001,
                                                                      "batch_tokens": 4096, "seed": 7}}))
    (folder / "provenance.json").write_text(json.dumps({
        "cache": "/data/cache", "cache_fingerprint_digest": "abc123", "code_version": "0.1.0", "step": 321,
        "tokens": 99000, "supervised_tokens": 45000, "precision": "bf16"}))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({
        "fingerprint": {"teacher": {"kind": "hub", "id": "Qwen/Qwen2-0.5B-Instruct"},
                        "dataset": {"hash": "d5", "split": "train", "limit": None}},
        "num_sequences": 7473, "num_supervised": 1234567, "topk": 32, "temperatures": [1.0, 2.0]}))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"event": "eval", "step": 100, "val_ce": 3.0}, {"event": "train", "step": 320, "loss": 1.0},
        {"event": "eval", "step": 321, "val_ce": 2.25, "val_top1_agree": 0.5}]) + "\n")
    card = write_model_card(folder, cache_dir=cache, metrics_file=metrics).read_text()

    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "# Causal STFT FNet student distilled from Qwen/Qwen2-0.5B-Instruct\n" in card
    assert f"| parameters | {count_parameters(model):,} |" in card
    for text in ("| abc123 |", "| optimizer steps | 321 |", "| supervised tokens seen | 45,000 |",
                 "| topk_tail |", "| val_ce | 2.25 |", "| val_top1_agree | 0.5 |", "| sequences | 7,473 |",
                 "trust_remote_code=True", "model.generate(", "At most 64 positions", "previous 6 tokens"):
        assert text in card, text
    assert "| val_ce | 3 |" not in card  # the last validation, not an earlier one
    assert "| teacher | Qwen/Qwen2-0.5B-Instruct |" in card and "`{" not in card  # no raw JSON
    assert "| dataset | train split, all rows, content hash d5 |" in card
    assert "| micro-batch size (padded tokens, --batch-tokens) | 4,096 |" in card
    assert "tokens per step" not in card.replace("padded tokens per step", "")  # not batch_tokens alone
    assert "held out" not in card


def test_card_says_what_validation_was_and_how_many_tokens_a_step_takes(tmp_path):
    folder = save_student(tiny_student(num_tokenizer_ids=30), tmp_path / "final")
    (folder / "train_config.json").write_text(json.dumps({"config": {
        "batch_tokens": 1024, "accum": 2, "val_fraction": 0.05, "val_cache": None}}))
    (folder / "provenance.json").write_text(json.dumps({"world_size": 4, "micro_batches_per_step": 8}))
    cache = tmp_path / "cache"
    cache.mkdir()
    digest = "xxh3_128:809a4ec967a0334ef5bd0e62db13b964"
    (cache / "manifest.json").write_text(json.dumps({"fingerprint": {
        "teacher": {"kind": "local", "hash": digest},
        "dataset": {"hash": digest, "split": "test", "limit": 100, "format": "messages"}}}))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"event": "eval", "step": 9, "val_ce": 2.0}) + "\n")
    card = write_model_card(folder, cache_dir=cache, metrics_file=metrics).read_text()

    assert "distilled from a local model (content hash 809a4ec967a0334e)\n" in card
    assert "| dataset | test split, first 100 rows, content hash 809a4ec967a0334e, format messages |" in card
    assert "| micro-batch size (padded tokens, --batch-tokens) | 1,024 |" in card
    assert "| micro-batches per step (all processes) | 8 |" in card
    assert "| padded tokens per step (at most) | 8,192 |" in card
    assert "| validation | 5.0% of the training cache's sequences, held out before training" in card
    assert "(step 9), on 5.0% of the training cache's sequences" in card
    assert "Ids from 30 on" in card and "never emits them" in card


def test_card_of_a_bare_compacted_folder(tmp_path):
    small = compact_model(tiny_student(), [0, 1, 5, 9, 20])
    folder = save_student(small, tmp_path / "c")
    card = write_model_card(folder).read_text()
    assert "5 rows, compacted from 39 tokenizer ids" in card and "can only produce the 5 tokens" in card
    assert "No validation was run" in card
    assert parameter_count(small.config) == count_parameters(small)
    assert last_eval(tmp_path / "missing.jsonl") == {}
