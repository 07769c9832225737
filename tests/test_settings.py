"""One declaration per setting: each command-line option of ``train-student``, ``teacher-cache`` and
``demo`` is the config-dataclass field of the same name, with the same type and default (so a default
changed in one place and not the other fails here), and the option list and the field list differ only
where a test below says why. Also: the run configs (``--config FILE.yaml``) and the shipped configs/."""

from __future__ import annotations

import inspect
import re
import types
import typing
from dataclasses import MISSING, fields
from enum import Enum
from pathlib import Path

import pytest
import typer
import yaml

REPO = Path(__file__).resolve().parents[1]


def options(command) -> dict[str, tuple[object, object]]:
    """name -> (annotated type, default) of every option of a typer command function."""
    hints = typing.get_type_hints(command)
    out = {}
    for name, p in inspect.signature(command).parameters.items():
        if name == "ctx":
            continue
        out[name] = (hints[name], getattr(p.default, "default", p.default))
    return out


def config_fields(cls) -> dict[str, tuple[object, object]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.default if f.default is not MISSING else MISSING) for f in fields(cls)}


def strip_optional(tp):
    """``int`` for ``int | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def check_same(opts, flds, names, choices: dict[str, tuple[str, ...]]) -> list[str]:
    """Every difference of type or default between option and field, one line each."""
    bad = []
    for name in sorted(names):
        (otype, odefault), (ftype, fdefault) = opts[name], flds[name]
        ftype = strip_optional(ftype)
        if isinstance(otype, type) and issubclass(otype, Enum):
            values = tuple(m.value for m in otype)
            if ftype is not str:
                bad.append(f"{name}: a choice option for a {ftype} field")
            if name in choices and values != choices[name]:
                bad.append(f"{name}: choices {values} != the config's {choices[name]}")
        elif otype != ftype:
            bad.append(f"{name}: option type {otype} != field type {ftype}")
        if odefault is not ... and fdefault is not MISSING and odefault != fdefault:
            bad.append(f"{name}: option default {odefault!r} != field default {fdefault!r}")
    return bad


def test_the_check_sees_a_difference():
    assert check_same({"a": (int, 1)}, {"a": (int | None, 2)}, {"a"}, {}) == \
        ["a: option default 1 != field default 2"]
    assert check_same({"a": (float, 1)}, {"a": (int, 1)}, {"a"}, {})[0].startswith("a: option type")
    choice = Enum("C", [("x", "x")], type=str)
    assert "choices" in check_same({"a": (choice, "x")}, {"a": (str, "x")}, {"a"}, {"a": ("x", "y")})[0]


def test_train_student_options_are_train_config_fields():
    from pipeline.commands.train_student import train_student_command
    from student.losses import KD_KINDS
    from student.train_config import PRECISIONS, STUDENTS, TrainConfig

    opts, flds = options(train_student_command), config_fields(TrainConfig)
    # config: the file itself; cache (repeatable) is TrainConfig's cache + mix_caches; cache_weights is a
    # comma list on the command line; schedule_steps is set by --resume --extend from the checkpoint
    assert set(opts) - set(flds) == {"config"}
    assert set(flds) - set(opts) == {"mix_caches", "schedule_steps"}
    assert opts["cache"][0] == list[Path] and opts["cache_weights"][0] is str
    same = set(opts) & set(flds) - {"cache", "cache_weights"}
    assert check_same(opts, flds, same, {"kd": KD_KINDS, "precision": PRECISIONS, "student": STUDENTS}) == []


def test_teacher_cache_options_are_teacher_cache_config_fields():
    from pipeline.commands.teacher_cache import parse_temperatures, teacher_cache
    from pipeline.data import DATA_FORMATS, OVERFLOW_POLICIES
    from pipeline.teacher_cache import FORMATS, TeacherCacheConfig

    opts, flds = options(teacher_cache), config_fields(TeacherCacheConfig)
    # --field CANON=COLUMN (repeatable) fills `fields`; --temperatures is a comma list; chunk_positions is
    # the teacher's internal chunking (no result depends on it)
    assert set(opts) - set(flds) == {"config", "field"}
    assert set(flds) - set(opts) == {"fields", "chunk_positions"}
    assert parse_temperatures(opts["temperatures"][1]) == flds["temperatures"][1]
    same = set(opts) & set(flds) - {"temperatures"}
    assert check_same(opts, flds, same, {"format": FORMATS, "data_format": DATA_FORMATS,
                                          "overflow": OVERFLOW_POLICIES}) == []


def test_demo_options_are_demo_config_fields():
    from pipeline.commands.demo import demo_command
    from pipeline.demo.budget import BUDGET_FIELDS
    from pipeline.demo.config import DemoConfig

    opts, flds = options(demo_command), config_fields(DemoConfig)
    # alpha/temperature/lr (None: the tuned value) override the student budget; threads is num_threads
    # (0 there: torch's default); rebuild_teacher is an action
    budget = {"alpha", "temperature", "lr"}
    assert set(opts) - set(flds) == {"config", "threads", "rebuild_teacher"} | budget
    assert set(flds) - set(opts) == {"num_threads", "topk", "student"}
    assert opts["threads"][1] == flds["num_threads"][1]
    assert all(opts[k][1] is None and k in BUDGET_FIELDS for k in budget)
    assert check_same(opts, flds, set(opts) & set(flds), {}) == []


def test_loss_and_schedule_defaults_are_declared_once():
    from student.losses import LossConfig
    from student.schedule import ScheduleConfig
    from student.train_config import TrainConfig

    cfg = TrainConfig(cache=Path("c"), out=Path("o"))
    assert cfg.loss_config() == LossConfig()
    s = cfg.schedule_config()
    assert (s.lr, s.min_lr, s.total_steps) == (ScheduleConfig.lr, ScheduleConfig.min_lr,
                                               ScheduleConfig.total_steps)
    # written once: TrainConfig's source names LossConfig's / ScheduleConfig's defaults, no literal
    src = inspect.getsource(TrainConfig)
    for name, where in [("alpha", "LossConfig"), ("temperature", "LossConfig"), ("kd", "LossConfig"),
                        ("chunk_size", "LossConfig"), ("lr", "ScheduleConfig"), ("min_lr", "ScheduleConfig"),
                        ("steps", "ScheduleConfig")]:
        assert re.search(rf"^    {name}: \w+ = {where}\.", src, re.M), name


def test_the_demo_student_is_an_override_of_train_config():
    """StudentBudget's settings are TrainConfig's, and it writes only those it changes (every other one is
    TrainConfig's default); configs/demo-student.yaml is that student, as a train-student config."""
    from pipeline.demo.budget import DEMO_STUDENT, StudentBudget
    from student.train_config import TrainConfig

    tc = {f.name: f.default for f in fields(TrainConfig)}
    settings = StudentBudget().to_json()
    own = set(settings) - set(tc)
    assert own == {"eval_points"}
    assert set(StudentBudget().overrides) == set(DEMO_STUDENT)
    assert [k for k, v in DEMO_STUDENT.items() if v == tc[k]] == []  # an override repeating a default
    inherited = set(settings) - set(DEMO_STUDENT) - own
    assert {k: settings[k] for k in inherited} == {k: tc[k] for k in inherited}
    got = yaml.safe_load((REPO / "configs" / "demo-student.yaml").read_text())
    b = StudentBudget()
    expect = b.train_config(cache=Path("c"), out=Path("o"))
    for name, v in got.items():
        if name in ("cache", "out"):
            continue
        assert getattr(expect, name) == v, name


# ------------------------------------------------------------------------------------------- config files


def run_cli(monkeypatch, capsys, *args):
    import sys

    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["fnet-distill", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("text, needle", [
    ("stepz: 3\n", "unknown key 'stepz'; did you mean 'steps'?"),
    ("steps: 2.5\n", "steps must be an integer (got 2.5"),
    ("steps: true\n", "steps must be an integer (got True"),
    ("lr: fast\n", "lr must be a number (got 'fast'"),
    ("kd: topk-tail\n", "kd must be one of topk_tail|topk_renorm|sampled|reverse_kl"),
    ("compact_vocab: 1\n", "compact_vocab must be true or false"),
    ("cache: {a: 1}\n", "cache must be a path"),
    ("- steps\n", "must be a mapping"),
    ("steps: [1\n", "not valid YAML at line"),
    ("config: other.yaml\n", "unknown key 'config'"),
])
def test_bad_config_files_are_refused_in_one_line(monkeypatch, capsys, tmp_path, text, needle):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    code, err = run_cli(monkeypatch, capsys, "train-student", "--config", str(f), "--cache", "c",
                        "--out", str(tmp_path / "o"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0] and str(f) in lines[0], err
    assert not (tmp_path / "o").exists()


def test_a_required_option_may_come_from_the_file_only(monkeypatch, capsys, tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("steps: 3\n")
    code, err = run_cli(monkeypatch, capsys, "train-student", "--config", str(f), "--out", "o")
    assert code == 2 and "Missing option '--cache'" in err and "run.yaml" in err
    code, err = run_cli(monkeypatch, capsys, "teacher-cache", "--out", "o")
    assert code == 2 and "Missing option '--teacher'" in err


def test_merge_flags_win_over_the_file_and_the_file_over_defaults(tmp_path):
    from typer.testing import CliRunner

    from pipeline.config_file import merge_config

    seen = {}

    def cmd(ctx: typer.Context, config: Path = typer.Option(None, "--config"),
            steps: int = typer.Option(10), lr: float = typer.Option(1.0), name: str = typer.Option("a"),
            temperatures: str = typer.Option("1"), paths: list[Path] = typer.Option(None, "--path")):
        seen.update(merge_config(ctx, cmd, {k: v for k, v in locals().items() if k != "ctx"}, config))

    app = typer.Typer()
    app.command()(cmd)
    f = tmp_path / "c.yaml"
    f.write_text("steps: 20\nlr: 1e-3\nname: b\ntemperatures: [1, 2.5]\npaths: [x, y]\n")
    res = CliRunner().invoke(app, ["--config", str(f), "--steps", "10"])
    assert res.exit_code == 0, res.output
    # --steps 10 equals the default but was given: it wins; YAML's 1e-3 (a string to YAML 1.1) is a number
    assert seen == {"config": f, "steps": 10, "lr": 1e-3, "name": "b", "temperatures": "1,2.5",
                    "paths": [Path("x"), Path("y")]}


def test_shipped_configs_load_and_validate(monkeypatch):
    """configs/*.yaml: every key an option of its command with the right type, and the settings build
    the stage's config object (not run). The real run's files match the Makefile's paths."""
    from pipeline.commands.choices import value
    from pipeline.commands.teacher_cache import parse_temperatures, teacher_cache
    from pipeline.commands.train_student import train_student_command
    from pipeline.config_file import check_value, option_types, read_config
    from pipeline.teacher_cache import TeacherCacheConfig
    from student.train_config import TrainConfig

    monkeypatch.chdir(REPO)
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert {f.name for f in files} >= {"train-student-qwen2-0.5b-gsm8k.yaml",
                                       "teacher-cache-qwen2-0.5b-gsm8k.yaml", "demo-student.yaml"}
    makefile = (REPO / "Makefile").read_text()
    for f in files:
        # demo-student.yaml: the demo's student, as a train-student run
        command = teacher_cache if f.name.startswith("teacher-cache") else train_student_command
        kinds = option_types(command)
        assert set(read_config(f)) <= set(kinds) - {"config"}, f.name
        got = {k: value(check_value(f, k, kinds[k], v)) for k, v in read_config(f).items()}
        if command is train_student_command:
            caches = got.pop("cache")
            w = got.pop("cache_weights", None)
            TrainConfig(cache=caches[0], mix_caches=tuple(caches[1:]),
                        cache_weights=None if w is None else tuple(map(float, w.split(","))), **got)
        elif command is teacher_cache:
            temps = parse_temperatures(got.pop("temperatures", "1,2"))
            TeacherCacheConfig(**got, temperatures=temps)
        if "qwen2-0.5b-gsm8k" in f.name:
            key = "CACHE_CONFIG" if command is teacher_cache else "TRAIN_CONFIG"
            assert f"{key} ?= configs/{f.name}" in makefile
    tc = read_config(REPO / "configs" / "teacher-cache-qwen2-0.5b-gsm8k.yaml")
    ts = read_config(REPO / "configs" / "train-student-qwen2-0.5b-gsm8k.yaml")
    assert f"CACHE_DIR ?= {tc['out']}" in makefile and ts["cache"] == [tc["out"]]
    assert f"STUDENT_OUT ?= {ts['out']}" in makefile
    assert f"TEACHER ?= {tc['teacher']}" in makefile and f"DATASET ?= {tc['dataset']}" in makefile


def test_train_student_reruns_from_its_config_yaml_bit_for_bit(monkeypatch, capsys, tmp_path):
    """A tiny CPU run with a config file and flags; OUT/config.yaml holds the merged settings, and
    ``--config OUT/config.yaml --out NEW`` trains the same weights, bit for bit."""
    from helpers import write_bigram_cache
    from safetensors.torch import load_file

    cache = write_bigram_cache(tmp_path / "cache", n=12)
    f = tmp_path / "run.yaml"
    f.write_text(f"cache: [{cache}]\nhidden_size: 16\nlayers: 1\nffn: 32\nwindow: 4\nmax_positions: 64\n"
                 "steps: 50\nbatch_tokens: 96\nlr: 3e-3\nkd: topk_tail\nalpha: 0.5\n")
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--num-workers", "0", "--no-progress", "--device", "cpu", "--eval-every", "0")
    code, err = run_cli(monkeypatch, capsys, "train-student", "--config", str(f), "--out", str(a),
                        "--steps", "3", "--seed", "2", *common)
    assert code == 0, err
    saved = yaml.safe_load((a / "config.yaml").read_text())
    assert saved["steps"] == 3 and saved["seed"] == 2 and saved["lr"] == 3e-3 and saved["alpha"] == 0.5
    assert saved["cache"] == [str(cache)] and saved["hidden_size"] == 16 and saved["dropout"] == 0.1
    assert "config" not in saved and "resume" not in saved
    code, err = run_cli(monkeypatch, capsys, "train-student", "--config", str(a / "config.yaml"),
                        "--out", str(b))
    assert code == 0, err
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
    # the file names the run's folder: --resume continues it (here: already finished)
    code, err = run_cli(monkeypatch, capsys, "train-student", "--config", str(a / "config.yaml"), "--resume")
    assert code == 0 and "already reached step 3" in err
    # a refused run leaves an existing run's config.yaml alone
    before = (a / "config.yaml").read_text()
    code, err = run_cli(monkeypatch, capsys, "train-student", "--config", str(a / "config.yaml"),
                        "--steps", "9")
    assert code == 2 and "already holds a training run" in err
    assert (a / "config.yaml").read_text() == before


def test_teacher_cache_reruns_from_its_config_yaml(monkeypatch, capsys, tmp_path, tiny_qwen_dir,
                                                   qwen_tokenizer_dir, gsm8k_slice):
    from cache.reader import open_cache
    from cache.verify import verify_cache

    f = tmp_path / "tc.yaml"
    f.write_text(f"teacher: {tiny_qwen_dir}\ntokenizer: {qwen_tokenizer_dir}\ndataset: {gsm8k_slice}\n"
                 "limit: 2\nmax_length: 128\noverflow: truncate\ntopk: 4\ntemperatures: [1, 2]\n"
                 "device: cpu\nprogress: false\n")
    a, b = tmp_path / "a", tmp_path / "b"
    code, err = run_cli(monkeypatch, capsys, "teacher-cache", "--config", str(f), "--out", str(a),
                        "--topk", "3")
    assert code == 0, err
    saved = yaml.safe_load((a / "config.yaml").read_text())
    assert saved["topk"] == 3 and saved["temperatures"] == "1,2" and saved["out"] == str(a)
    assert verify_cache(a) == []  # the extra file is no defect
    code, err = run_cli(monkeypatch, capsys, "teacher-cache", "--config", str(a / "config.yaml"),
                        "--out", str(b))
    assert code == 0, err
    assert open_cache(a).fingerprint_digest == open_cache(b).fingerprint_digest
    assert open_cache(a).topk == 3


def test_demo_takes_a_config_file(monkeypatch, capsys, tmp_path):
    """The demo's options from a file (checked before anything runs) and OUT/config.yaml written."""
    f = tmp_path / "demo.yaml"
    f.write_text("tiny: true\nseeds: 1\njobs: 0\n")
    code, err = run_cli(monkeypatch, capsys, "demo", "--config", str(f), "--out", str(tmp_path / "d"))
    assert code == 2 and "--jobs must be at least 1" in err
    f.write_text("tiny: yes please\n")
    code, err = run_cli(monkeypatch, capsys, "demo", "--config", str(f))
    assert code == 2 and "tiny must be true or false" in err
