"""``fnet-distill demo``: the whole pipeline offline (assets, the caches, students trained with KD on
reference answers, with KD on teacher-written solutions and with labels only over several seeds, eval), then a
report in ``--out`` (``pipeline.demo.run``)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.config_file import CONFIG_HELP, merge_config, write_run_config


def demo_command(
    ctx: typer.Context,
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    out: Path = typer.Option(Path("runs/demo"), help="Folder for every stage's output and the report "
                             "(assets/, cache-train/, cache-test/, student-{kd,ce}-s<seed>/, eval-*.jsonl, "
                             "report.md, report.json, curves.png, config.yaml: the demo's settings)."),
    scale: float = typer.Option(1.0, help="DEMO_SCALE: multiplies training problems (1000), student steps "
                                "(9600), held-out problems (600) and validation problems (300); 1 = the "
                                "default budget: about 11 minutes on 2 CPU cores."),
    gsm8k: bool = typer.Option(False, "--gsm8k", help="Run on a GSM8K slice with the real Qwen2 tokenizer "
                               "and a small random-init Qwen2 teacher (a smoke test of the real path; needs "
                               "--shared)."),
    shared: Path = typer.Option(None, help="Folder holding tokenizers/qwen2/ and "
                                "data/gsm8k/{train,test}.jsonl for --gsm8k (default: $FNET_SHARED or "
                                "../shared beside the repository)."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny sizes for a test run (seconds, not a meaningful "
                              "comparison)."),
    steps: int = typer.Option(None, help="Student optimizer steps for both runs (default: the tuned budget "
                              "times --scale)."),
    batch_tokens: int = typer.Option(None, help="Most tokens (padding included) in one student step, for "
                                     "every run; at least the longest sequence a demo cache may hold (256, "
                                     "640 with --gsm8k). Default: the tuned budget, 512 (2048 with --tiny, "
                                     "4096 with --gsm8k)."),
    seed: int = typer.Option(0, help="Seed of the assets and the teacher cache sampling, and the first "
                             "student seed (per seed, KD and CE share initialisation and data order)."),
    seeds: int = typer.Option(None, help="Student seeds per method (seed, seed+1, ...); default 3 (2 with "
                              "--tiny or --gsm8k)."),
    alpha: float = typer.Option(None, help="Label-CE weight of the KD run (the CE-only run uses 1); default: "
                                "the tuned value."),
    temperature: float = typer.Option(None, help="KD temperature of the KD run; default: the tuned value."),
    lr: float = typer.Option(None, help="Peak learning rate of both runs; default: the tuned value."),
    eval_limit: int = typer.Option(None, help="Test problems for the exact-answer evaluation of each model "
                                   "(0 skips it); default: every held-out problem (600 x --scale)."),
    curve_problems: int = typer.Option(None, help="Test problems answered at every evaluation point for the "
                                       "accuracy curves (0: none); default 100."),
    max_new_tokens: int = typer.Option(64, help="Generation budget per problem in the exact-answer eval."),
    rebuild_teacher: bool = typer.Option(False, "--rebuild-teacher", help="Retrain the shipped demo teacher "
                                         "from its seed into pipeline/demo/pretrained/ (minutes) and exit; "
                                         "what `make demo-teacher` runs after a generator or tokenizer "
                                         "change."),
    write_questions: int = typer.Option(None, help="New questions (no reference answer used) the teacher "
                                        "writes solutions for, for the 'KD + teacher-written' students "
                                        "(default 10000 x --scale; 48 with --tiny; 0 leaves those runs out, "
                                        "as --gsm8k does)."),
    write_samples: int = typer.Option(4, help="Solutions the teacher writes per question."),
    write_temperature: float = typer.Option(0.7, help="Sampling temperature of the teacher's solutions "
                                            "(top-p 0.95)."),
    write_min_vote: float = typer.Option(0.75, help="Least share of a question's solutions that must agree "
                                         "on its final answer for the agreeing ones to be kept."),
    threads: int = typer.Option(1, help="torch CPU threads; 1 is robust on a shared machine (the demo's "
                                "models are tiny), 0 keeps torch's default."),
    jobs: int = typer.Option(None, help="Students trained at the same time, one process each (default: one "
                             "per usable core, at most 2; 1 trains them one after the other)."),
    progress: bool = typer.Option(True, help="Progress on stderr: bars on a terminal, else a line every "
                                  "30 s (FNET_PROGRESS_SECONDS); stage lines and the report print anyway."),
) -> None:
    """Run the whole pipeline offline and write a KD-vs-CE report over student seeds (exact-answer accuracy,
    validation CE, KL to the teacher, top-1 agreement: per seed, mean and spread, paired differences; gap
    closed; wall time per stage; cache bytes/token) and curves.png. Assets and finished caches are reused
    between runs; the students are always retrained."""
    o = merge_config(ctx, demo_command, {k: v for k, v in locals().items() if k != "ctx"}, config)
    from transformers.utils import logging as hf_logging

    from pipeline.demo.budget import StudentBudget
    from pipeline.demo.config import DemoConfig
    from pipeline.demo.run import run_demo

    hf_logging.disable_progress_bar()
    if o["rebuild_teacher"]:
        from pipeline.demo.assets import SHIPPED_DIR, ship_teacher

        stats = ship_teacher(SHIPPED_DIR, log=typer.echo)
        typer.echo(f"shipped teacher: {SHIPPED_DIR} ({stats['parameters']:,} parameters, val CE "
                   f"{stats['val']['ce']:.4f})")
        return
    budget = StudentBudget()
    overrides = {k: o[k] for k in ("alpha", "temperature", "lr") if o[k] is not None}
    same = ("out", "scale", "seed", "gsm8k", "tiny", "shared", "steps", "batch_tokens", "seeds", "eval_limit",
            "curve_problems", "max_new_tokens", "jobs", "progress", "write_questions", "write_samples",
            "write_min_vote", "write_temperature")
    cfg = DemoConfig(**{k: o[k] for k in same}, num_threads=o["threads"] or None,
                     student=budget.replace(**overrides))
    out = cfg.out
    report = run_demo(cfg)
    # beside report.json, once the run (which holds the folder's lock) is done
    write_run_config(out, "demo", o, leave_out=("rebuild_teacher",))
    typer.echo("")
    typer.echo(report["markdown"])
    typer.echo(f"report: {out / 'report.md'}, {out / 'report.json'}; curves: {out / 'curves.png'}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
