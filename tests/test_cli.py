"""The `fnet-distill` entry point: every command is registered, and errors are one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FNET = str(Path(sys.executable).with_name("fnet-distill"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FNET, *args], capture_output=True, text=True, timeout=120)


def test_every_command_is_registered_with_help():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("teacher-cache", "cache", "train-student", "eval", "generate", "demo"):
        assert command in out.stdout
    for args in (["cache", "info"], ["cache", "verify"]):
        assert run_cli(*args, "--help").returncode == 0


# ------------------------------------------------------------------------------ options, help, version


def in_process(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["fnet-distill", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_version(monkeypatch, capsys):
    from pipeline import __version__

    assert in_process(monkeypatch, capsys, "--version") == (0, f"fnet-distill {__version__}\n", "")


def test_yes_no_options_are_shown_and_parsed_as_flags(monkeypatch, capsys):
    commands = [["teacher-cache"], ["cache", "info"], ["cache", "verify"], ["train-student"], ["eval"],
                ["generate"], ["demo"], []]
    for args in commands:
        code, out, _ = in_process(monkeypatch, capsys, *args, "--help")
        assert code == 0 and "<bool>" not in out, args
    _, out, _ = in_process(monkeypatch, capsys, "train-student", "--help")
    assert "--compact-vocab  " in out and "--progress / --no-progress" in out and "--steps <int>" in out
    code, _, err = in_process(monkeypatch, capsys, "train-student", "--cache", "c", "--out", "o",
                              "--compact-vocab", "true")
    line = one_error_line(err)
    assert code == 2 and "(true)" in line and "flags" in line and "train-student --help" in line


def test_usage_errors_are_one_line(monkeypatch, capsys):
    for args, needle in [(["train-student", "--out", "o"], "Missing option '--cache'"),
                         (["train-student", "--cache", "c", "--out", "o", "--steps", "x"], "'--steps'"),
                         (["nope"], "No such command 'nope'"),
                         (["eval", "--model", "m", "--bogus"], "--bogus")]:
        code, _, err = in_process(monkeypatch, capsys, *args)
        assert code == 2 and needle in one_error_line(err), args


def test_make_help_lists_every_target():
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(["make", "-s", "help"], cwd=repo, capture_output=True, text=True, timeout=60).stdout
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"demo", "demo-gsm8k", "clean", "test", "install"} <= listed


def test_license_is_spdx_with_a_license_file():
    tomllib = pytest.importorskip("tomllib")
    repo = Path(__file__).resolve().parents[1]
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (repo / "LICENSE").read_text().startswith("MIT License")


# ------------------------------------------------------------------------------------ error messages


def test_os_errors_get_the_disk_hint_only_when_the_disk_is_full(tmp_path):
    import errno
    import shutil

    from pipeline.cli import os_error_line

    full = os_error_line(OSError(errno.ENOSPC, "No space left on device", "x"))
    assert "free disk space" in full and "--resume" in full
    for e in (NotADirectoryError(errno.ENOTDIR, "Not a directory", "x"),
              FileNotFoundError(errno.ENOENT, "No such file or directory", "model.safetensors")):
        assert "free disk space" not in os_error_line(e) and "check the path" in os_error_line(e)
    assert "permissions" in os_error_line(PermissionError(errno.EACCES, "Permission denied", "x"))

    # a copy on a full disk: copytree gathers one (src, dst, why) per file; one line, first file + count
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}.json").write_text("{}")

    def no_space(a, b):
        raise OSError(errno.ENOSPC, "No space left on device", b)

    try:
        shutil.copytree(src, tmp_path / "dst", copy_function=no_space)
    except shutil.Error as e:
        line = os_error_line(e)
    assert "\n" not in line and "(and 4 more files)" in line and "No space left" in line
    assert "free disk space" in line and "[(" not in line


def test_disk_error_names_the_path_without_the_disk_hint(monkeypatch, capsys, tmp_path):
    from helpers import write_bigram_cache

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = write_bigram_cache(tmp_path / "cache", n=4)
    code, _, err = in_process(monkeypatch, capsys, "train-student", "--cache", str(cache), "--out",
                              str(blocker / "run"), "--no-progress", "--num-workers", "0")
    line = one_error_line(err)
    assert code == 2 and "Not a directory" in line and "free disk space" not in line


def test_generate_refuses_a_folder_it_cannot_run(monkeypatch, capsys, tmp_path, tiny_qwen_dir):
    code, out, err = in_process(monkeypatch, capsys, "generate", "--model", str(tiny_qwen_dir),
                                "--prompt", "hi")
    line = one_error_line(err)  # a causal LM without a tokenizer
    assert code == 2 and out == "" and "no usable tokenizer" in line and "save_pretrained" in line
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    code, _, err = in_process(monkeypatch, capsys, "generate", "--model", str(bad), "--prompt", "hi")
    assert code == 2 and "not a valid model config" in one_error_line(err)


def test_every_device_error_is_one_line(monkeypatch, capsys, tmp_path, tiny_qwen_dir, qwen_tokenizer_dir,
                                        gsm8k_slice):
    import torch
    from helpers import write_bigram_cache

    if torch.cuda.is_available():
        pytest.skip("checks the messages on a machine without CUDA")

    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text('{"model_type": "causal_stft_fnet"}')
    cache = write_bigram_cache(tmp_path / "cache", n=4)
    runs = {
        "generate": ["generate", "--model", str(student), "--prompt", "hi"],
        "eval": ["eval", "--model", str(tiny_qwen_dir), "--tokenizer", str(qwen_tokenizer_dir),
                 "--dataset", str(gsm8k_slice), "--limit", "1", "--no-progress"],
        "teacher-cache": ["teacher-cache", "--teacher", str(tiny_qwen_dir), "--tokenizer",
                          str(qwen_tokenizer_dir), "--dataset", str(gsm8k_slice), "--limit", "2",
                          "--out", str(tmp_path / "tc"), "--no-progress"],
        "train-student": ["train-student", "--cache", str(cache), "--out", str(tmp_path / "run"),
                          "--no-progress", "--num-workers", "0"],
    }
    for name, args in runs.items():
        for device, needle in [("cuda", "CUDA is not available"), ("cuda:x", "is not a device"),
                               ("meta", "not supported")]:
            code, _, err = in_process(monkeypatch, capsys, *args, "--device", device)
            line = one_error_line(err)
            assert code == 2 and needle in line, (name, line)
            assert f"--device {device}" in line.replace("'", ""), (name, line)


def test_eval_and_generate_refuse_a_folder_that_is_not_a_model(monkeypatch, capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    code, _, err = in_process(monkeypatch, capsys, "eval", "--model", str(tmp_path / "run"))
    assert code == 2 and "not a model folder (no config.json)" in one_error_line(err)
    (tmp_path / "run" / "final").mkdir()
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    code, _, err = in_process(monkeypatch, capsys, "generate", "--model", str(tmp_path / "run"),
                              "--prompt", "x")
    assert code == 2 and f"--model {tmp_path / 'run' / 'final'}" in one_error_line(err)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    code, _, err = in_process(monkeypatch, capsys, "eval", "--model", str(cache))
    assert code == 2 and "is a teacher cache, not a model" in one_error_line(err)
    (tmp_path / "run" / "config.json").write_text("{")
    code, _, err = in_process(monkeypatch, capsys, "eval", "--model", str(tmp_path / "run"))
    assert code == 2 and "not valid JSON" in one_error_line(err)


def test_teacher_cache_reports_a_corrupt_teacher_config(monkeypatch, capsys, tmp_path, gsm8k_slice):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text('{"model_type": "qwen2", ')
    code, _, err = in_process(monkeypatch, capsys, "teacher-cache", "--teacher", str(teacher), "--dataset",
                              str(gsm8k_slice), "--out", str(tmp_path / "c"))
    line = one_error_line(err)
    assert code == 2 and "config.json is not valid JSON" in line and "tokenizer" not in line


def test_cache_info_prints_the_teacher_readably(monkeypatch, capsys, tmp_path):
    from pipeline.commands.cache import _teacher_line

    assert _teacher_line({"kind": "hub", "id": "Qwen/Qwen2-0.5B-Instruct", "revision": "abc123"}) == \
        "Qwen/Qwen2-0.5B-Instruct (Hugging Face Hub, revision abc123)"
    assert _teacher_line({"kind": "local", "hash": "xxh3_128:00ff"}) == \
        "local model folder (hash of config.json and weights xxh3_128:00ff)"
    from helpers import write_bigram_cache

    cache = write_bigram_cache(tmp_path / "cache", n=4)
    code, out, _ = in_process(monkeypatch, capsys, "cache", "info", str(cache))
    teacher = [ln for ln in out.splitlines() if ln.startswith("teacher ")]
    assert code == 0 and teacher and "{" not in teacher[0]


# ------------------------------------------------------------------------------ enumerated options


def test_enumerated_options_match_the_sets_the_code_accepts():
    from cache.schema import ENCODINGS, FORMATS
    from pipeline import commands
    from pipeline.commands import choices as c
    from pipeline.data import DATA_FORMATS, OVERFLOW_POLICIES
    from pipeline.teacher import COMPUTE_DTYPES, LOGPROB_DTYPES
    from pipeline.write import KEEP_POLICIES
    from student.losses import KD_KINDS
    from student.reporting import REPORT_TO
    from student.train_config import PRECISIONS, STUDENTS

    def values(enum):
        return tuple(e.value for e in enum)

    assert values(c.KdKind) == KD_KINDS and values(c.Precision) == PRECISIONS
    assert values(c.ShardFormat) == FORMATS and values(c.Encoding) == ENCODINGS
    assert values(c.Overflow) == OVERFLOW_POLICIES and set(values(c.Keep)) == set(KEEP_POLICIES)
    assert values(c.ComputeDtype) == ("auto", *COMPUTE_DTYPES)
    assert set(values(c.LogprobDtype)) == set(LOGPROB_DTYPES) and c.REPORT_TO == REPORT_TO
    assert values(c.DataFormat) == DATA_FORMATS and values(c.Student) == STUDENTS
    assert commands.choices is c


CHOICES = [  # (command, option, the choices --help lists, a wrong value, the choice it should suggest)
    ("train-student", "--kd", "topk_tail|topk_renorm|sampled|reverse_kl", "topk-tail", "topk_tail"),
    ("train-student", "--precision", "auto|fp32|bf16|fp16", "fp64", None),
    ("train-student", "--student", "fnet|qwen2|llama", "gpt2", None),
    ("train-student", "--report-to", "none|tensorboard|wandb", "tensorbord", "tensorboard"),
    ("teacher-cache", "--format", "arrow|zarr", "parquet", None),
    ("teacher-cache", "--encoding", "exact|compact", "Compact", "compact"),
    ("teacher-cache", "--keep", "auto|reference|majority|all", "majorty", "majority"),
    ("teacher-cache", "--overflow", "drop|truncate", "cut", None),
    ("teacher-cache", "--data-format", "auto|qa|messages|prompt-completion", "prompt_completion",
     "prompt-completion"),
    ("teacher-cache", "--dtype", "auto|float32|bfloat16|float16", "fp16", None),
    ("teacher-cache", "--logprob-dtype", "float16|float32", "float64", None),
    ("eval", "--dtype", "auto|float32|bfloat16|float16", "bf16", None),
]
REQUIRED = {"train-student": ["--cache", "c", "--out", "o"], "eval": ["--model", "m"],
            "teacher-cache": ["--teacher", "t", "--out", "o"]}


def test_enumerated_options_list_their_choices_and_refuse_others_in_one_line(monkeypatch, capsys):
    helps = {}
    for command, option, listed, wrong, near in CHOICES:
        if command not in helps:
            helps[command] = in_process(monkeypatch, capsys, command, "--help")[1]
        assert f"{option} <{listed}>" in helps[command], (command, option)
        code, out, err = in_process(monkeypatch, capsys, command, *REQUIRED[command], option, wrong)
        line = one_error_line(err)
        assert code == 2 and out == "" and f"Invalid value for '{option}': '{wrong}' is not one of" in line
        assert ", ".join(f"'{v}'" for v in listed.split("|")) in line, line
        assert line.endswith(f"{command} --help") and "\n" not in line, line
        if near is None:
            assert "did you mean" not in line and "; see " in line, line
        else:
            assert f"; did you mean '{near}'? See " in line, line
    code, _, err = in_process(monkeypatch, capsys, "train-student", *REQUIRED["train-student"], "--report-to",
                              "none,wandb")
    assert code == 2 and "nor a comma list of trackers such as 'tensorboard,wandb'" in one_error_line(err)


def test_choices_reach_the_configs_as_the_same_plain_strings(monkeypatch, capsys):
    """The Enums stop at the command line: configs (and so train_config.json, manifests and fingerprints)
    get plain str values, the same strings as before."""
    import pipeline.commands.evaluate as eval_command
    import pipeline.teacher_cache
    import student.train

    seen = {}

    def capture(name):  # stands in for the run: keeps what the command passed, ends the command
        def fake(*args, **kwargs):
            seen[name] = args[0] if name != "eval" else kwargs
            raise SystemExit(0)
        return fake

    monkeypatch.setattr(student.train, "train_student", capture("train"))
    monkeypatch.setattr(pipeline.teacher_cache, "run_teacher_cache", capture("teacher"))
    monkeypatch.setattr(eval_command, "evaluate_model", capture("eval"))
    in_process(monkeypatch, capsys, "train-student", "--cache", "c", "--out", "o", "--kd", "reverse_kl",
               "--precision", "fp32", "--report-to", "wandb,tensorboard")
    in_process(monkeypatch, capsys, "teacher-cache", "--teacher", "t", "--out", "o", "--format", "zarr",
               "--encoding", "exact", "--keep", "all", "--overflow", "truncate", "--dtype", "float32",
               "--logprob-dtype", "float32")
    in_process(monkeypatch, capsys, "eval", "--model", "m", "--dtype", "bfloat16")
    train, teacher = seen["train"], seen["teacher"]
    got = {"kd": train.kd, "precision": train.precision, "report_to": train.report_to,
           "format": teacher.format, "encoding": teacher.encoding, "keep": teacher.keep,
           "overflow": teacher.overflow, "dtype": teacher.dtype, "logprob_dtype": teacher.logprob_dtype,
           "eval dtype": seen["eval"]["dtype"]}
    assert got == {"kd": "reverse_kl", "precision": "fp32", "report_to": "tensorboard,wandb",
                   "format": "zarr", "encoding": "exact", "keep": "all", "overflow": "truncate",
                   "dtype": "float32", "logprob_dtype": "float32", "eval dtype": "bfloat16"}
    assert all(type(v) is str for v in got.values())
    assert f"{train.kd}/{teacher.format}" == "reverse_kl/zarr"  # an Enum would format as KdKind.reverse_kl


def test_generate_runs_a_transformers_student_like_transformers_does(monkeypatch, capsys):
    """A transformers causal LM folder (here the demo's shipped Qwen2 teacher, which carries its tokenizer)
    answers through fnet-distill generate with exactly the tokens transformers' own greedy generate gives
    for the chat-formatted prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(__file__).resolve().parents[1] / "pipeline" / "demo" / "pretrained" / "teacher"
    question = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    code, out, err = in_process(monkeypatch, capsys, "generate", "--model", str(folder), "--prompt", question,
                                "--max-new-tokens", "40", "--device", "cpu")
    assert code in (0, None), err
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert expected.strip() and out.strip() == expected.strip()
