"""Student folders are checked wherever the project reads them: ``generate`` and ``eval`` refuse a folder
whose files do not match its manifest.json (``--no-verify`` reads it anyway); ``--init-from`` refuses a folder
of another tokenizer or whose weights do not fill its config; ``--student-config`` refuses an unknown model
type, and another vocabulary with ``--compact-vocab``; ``generate`` refuses an empty prompt. Every refusal is
one line and exit 2 through the real CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_bigram_cache  # tests/ is on sys.path under pytest

from cache.util import UserError
from student.checkpoint import write_folder_manifest
from student.modeling import CausalFNetConfig, CausalFNetForCausalLM
from student.train import TrainConfig, setup

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHER = ROOT / "pipeline" / "demo" / "pretrained" / "teacher"  # a Qwen2 folder shipped in the repo
TINY = dict(hidden_size=16, layers=1, ffn=32, window=4, max_positions=64, dropout=0.0, steps=2,
            batch_tokens=96, warmup=1, eval_every=0, save_every=0, num_workers=0, progress=False,
            chunk_size=64)


def cli(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["fnet-distill", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    got = capsys.readouterr()
    return info.value.code, got.out, got.err


def flip_a_weight_bit(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-10] ^= 0x01  # tensor data at the end of the file: it still loads
    (folder / "model.safetensors").write_bytes(bytes(data))


@pytest.fixture(scope="module")
def best(tmp_path_factory) -> Path:
    """A tiny student over the demo teacher's tokenizer (with Qwen2's chat template), written as train-student
    writes best/: weights, config, tokenizer, then manifest.json."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_TEACHER)
    torch.manual_seed(0)
    model = CausalFNetForCausalLM(CausalFNetConfig(
        vocab_size=512, hidden_size=16, num_hidden_layers=1, intermediate_size=32, stft_window_size=4,
        max_position_embeddings=256, hidden_dropout_prob=0.0, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id))
    folder = tmp_path_factory.mktemp("run") / "best"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_folder_manifest(folder, step=2)
    return folder


def test_generate_and_eval_refuse_a_damaged_folder_unless_told_not_to_verify(best, tmp_path, monkeypatch,
                                                                             capsys):
    import shutil

    damaged = tmp_path / "best"
    shutil.copytree(best, damaged)
    flip_a_weight_bit(damaged)
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n"
                                        f"#### {i + 1}"}) + "\n" for i in range(2)))
    gen = ["generate", "--model", str(damaged), "--prompt", "What is 2 + 2?", "--max-new-tokens", "3",
           "--device", "cpu"]
    ev = ["eval", "--model", str(damaged), "--dataset", str(data), "--max-new-tokens", "3", "--device", "cpu",
          "--no-progress", "--json"]
    for argv in (gen, ev):
        code, out, err = cli(argv, monkeypatch, capsys)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert f"--model {damaged}: model.safetensors does not match its content hash in manifest.json" in err
        assert "--no-verify" in err
    code, out, err = cli([*gen, "--no-verify"], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = cli([*ev, "--no-verify"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)["n"] == 2, err
    code, out, err = cli(ev[:2] + [str(best)] + ev[3:], monkeypatch, capsys)  # the intact folder is read
    assert code == 0 and json.loads(out)["n"] == 2, err


def test_generate_refuses_an_empty_prompt(best, monkeypatch, capsys):
    for prompt in ("", "  \n"):
        code, out, err = cli(["generate", "--model", str(best), "--prompt", prompt, "--device", "cpu"],
                             monkeypatch, capsys)
        assert code == 2 and out == "" and err.strip().count("\n") == 0 and "--prompt is empty" in err


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_bigram_cache(tmp_path_factory.mktemp("bigram") / "cache", n=8)


def test_init_from_refuses_a_teacher_folder_and_weights_that_do_not_fill_the_config(cache, tmp_path,
                                                                                   monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    code, out, err = cli(["train-student", "--cache", str(cache), "--out", str(tmp_path / "a"), "--init-from",
                          str(DEMO_TEACHER), "--steps", "1", "--num-workers", "0", "--no-progress"],
                         monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    # a transformers model may be a student, but not one of another tokenizer than the cache's
    assert f"--init-from: {DEMO_TEACHER} holds a tokenizer of 512 tokens but the cache" in err
    assert not (tmp_path / "a").exists()  # nothing written

    # a student config whose weights file lacks a tensor: transformers would initialise it at random
    from helpers import EOS, PAD, V

    torch.manual_seed(0)
    student = CausalFNetForCausalLM(CausalFNetConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                                     intermediate_size=32, stft_window_size=4,
                                                     max_position_embeddings=64, pad_token_id=PAD,
                                                     eos_token_id=EOS))
    partial = tmp_path / "partial"
    student.save_pretrained(partial)
    weights = load_file(str(partial / "model.safetensors"))
    dropped = sorted(weights)[-1]
    save_file({k: v for k, v in weights.items() if k != dropped}, str(partial / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"^--init-from: the weights in .* do not fit its config\.json \(1 "):
        setup(TrainConfig(cache=cache, out=tmp_path / "b", init_from=partial, **TINY))
    student.save_pretrained(partial)  # the complete folder is accepted
    run = setup(TrainConfig(cache=cache, out=tmp_path / "c", init_from=partial, **TINY))
    run.close()


def test_student_config_of_another_model_or_vocabulary_is_refused(cache, tmp_path, monkeypatch, capsys):
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "no-such-model", "hidden_size": 16}))
    code, out, err = cli(["train-student", "--cache", str(cache), "--out", str(tmp_path / "a"),
                          "--student-config", str(unknown), "--steps", "1",
                          "--num-workers", "0", "--no-progress"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "transformers cannot build a 'no-such-model' config" in err
    assert not (tmp_path / "a").exists()

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model_type": "causal_stft_fnet", "vocab_size": 1000, "hidden_size": 16,
                                 "num_hidden_layers": 1, "intermediate_size": 32, "stft_window_size": 4,
                                 "max_position_embeddings": 64}))
    with pytest.raises(UserError, match=r"has a vocabulary of 1000 ids but the cache's has 40; --compact"):
        setup(TrainConfig(cache=cache, out=tmp_path / "b", student_config=other, compact_vocab=True, **TINY))
    setup(TrainConfig(cache=cache, out=tmp_path / "c", student_config=other, **TINY)).close()  # no compaction

    # a compacted student's own config.json (same teacher vocabulary) is compacted again from this cache
    run = setup(TrainConfig(cache=cache, out=tmp_path / "d", compact_vocab=True, **TINY))
    run.model.config.save_pretrained(tmp_path / "compact")
    run.close()
    run = setup(TrainConfig(cache=cache, out=tmp_path / "e", compact_vocab=True,
                            student_config=tmp_path / "compact" / "config.json", **TINY))
    assert run.model.config.full_vocab_size == 40
    run.close()
