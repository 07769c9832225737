"""One cache, four students: the causal STFT FNet against transformer students, on the demo's assets and
budget, over paired seeds. Writes bench/results/compare.json and bench/results/compare.png (``make compare``).

    nice -n 19 python bench/compare_students.py [--seeds 3] [--steps N] [--eval-limit N] [--quick]

Students (same caches, KD settings, steps, batch and schedule; the teacher is the demo's 4-layer Qwen2):

* ``fnet``: the demo's student (d=32, 3 layers, FFN 128, W=32);
* ``qwen2-shape``: a from-scratch Qwen2 of the same width, depth and FFN (1 head of 32);
* ``qwen2-params``: a from-scratch Qwen2 of 3 layers with the width (FFN 4x) whose parameter count is closest
  to the FNet's;
* ``cut``: the teacher's layers 0 and 3 with its embeddings, norm and head (``student.cut``), FFN narrowed to
  --cut-ffn channels, trained from there (``--init-from``) at --cut-lr (a pretrained start).

Quality (per seed): validation CE and KL to the teacher on the held-out cache, exact answers on the held-out
problems (``pipeline.evaluate``, greedy, the demo's token budget). The demo's own KD runs (``runs/demo``,
same settings and seeds) are reused for ``fnet`` when their train config matches. Speed, side by side in one
process at one thread: training time per optimizer step; decode tokens/s at batch 1 and 32 after 64 prompt
tokens (the trained models); decode tokens/s and state bytes per sequence at longer contexts (untrained models
of the same shapes with more positions: the FNet up to its 1,024, the transformers beyond).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_decode import kv_bytes  # noqa: E402  (one KV-cache byte count)

from cache.util import atomic_write_json, file_hash  # noqa: E402

STUDENTS = ("fnet", "qwen2-shape", "qwen2-params", "cut")
CUT_LAYERS = [0, 3]


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ------------------------------------------------------------------------------------------- the students


def same_params_width(fnet_params: int, vocab: int, layers: int, max_pos: int) -> tuple[int, int, int]:
    """(d, heads, params) of the 3-layer Qwen2 (FFN 4d, heads of 16) closest in parameters to the FNet."""
    from transformers import AutoModelForCausalLM

    from student.any_student import architecture_config

    best = None
    for d in range(16, 257, 16):
        cfg = architecture_config("qwen2", vocab_size=vocab, hidden_size=d, layers=layers, ffn=4 * d,
                                  heads=d // 16, max_positions=max_pos)
        with torch.device("meta"):
            n = count(AutoModelForCausalLM.from_config(cfg))
        if best is None or abs(n - fnet_params) < abs(best[2] - fnet_params):
            best = (d, d // 16, n)
    return best


def student_configs(args, demo, cut_dir: Path) -> dict[str, dict]:
    """TrainConfig overrides of each student on top of the demo's budget."""
    from student.modeling import CausalFNetForCausalLM, student_config

    s = demo.resolved_student()
    vocab = 512
    with torch.device("meta"):
        fnet_params = count(CausalFNetForCausalLM(student_config(
            vocab, hidden_size=s.hidden_size, num_hidden_layers=s.layers, intermediate_size=s.ffn,
            stft_window_size=s.window, max_position_embeddings=s.max_positions)))
    d, heads, _ = same_params_width(fnet_params, vocab, s.layers, s.max_positions)
    return {
        "fnet": {},
        "qwen2-shape": {"student": "qwen2", "heads": max(1, s.hidden_size // 32)},
        "qwen2-params": {"student": "qwen2", "hidden_size": d, "heads": heads, "ffn": 4 * d},
        "cut": {"init_from": cut_dir, "lr": args.cut_lr, "min_lr": args.cut_lr / 10},
    }


def make_cut(teacher_dir: Path, out: Path, ffn: int | None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student.cut import cut_model, parameter_count, write_cut

    source = {"teacher_weights": file_hash(teacher_dir / "model.safetensors"), "layers": list(CUT_LAYERS),
              "ffn": ffn}
    if (out / "cut.json").is_file() and (out / "source.json").is_file():
        if json.loads((out / "source.json").read_text()) == source:
            return json.loads((out / "cut.json").read_text())
        log(f"{out} was cut from another teacher or with other settings: cut again")
    if out.exists():
        shutil.rmtree(out)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    student, kept = cut_model(teacher, CUT_LAYERS, ffn)
    write_cut(student, kept, out, teacher_name=str(teacher_dir),
              teacher_layers=teacher.config.num_hidden_layers, teacher_parameters=parameter_count(teacher),
              tokenizer=AutoTokenizer.from_pretrained(teacher_dir))
    atomic_write_json(out / "source.json", source)
    return json.loads((out / "cut.json").read_text())


# ------------------------------------------------------------------------------------------------ quality


def run_key(tc, demo, init_dir: Path | None) -> dict:
    """What a finished quality run depends on: its train config (less the fields that do not change
    training), the caches' fingerprints and, for a cut student, the cut it starts from. A ``result.json``
    with another key is stale (an earlier teacher, cache or budget) and is trained again."""
    from student.train_config import RESUME_FREE

    caches = {name: json.loads((demo.out / name / "manifest.json").read_text())["fingerprint_digest"]
              for name in ("cache-train", "cache-test")}
    config = {k: v for k, v in tc.to_json().items() if k not in RESUME_FREE}
    cut = json.loads((init_dir / "source.json").read_text()) if init_dir is not None else None
    return json.loads(json.dumps({"config": config, "caches": caches, "cut": cut}, default=str))


def train_config(args, demo, name: str, overrides: dict, seed: int, out: Path, steps: int):
    s = demo.resolved_student().replace(steps=steps)
    eval_every = max(1, steps // max(1, s.eval_points))
    return s.train_config(cache=demo.out / "cache-train", val_cache=demo.out / "cache-test", out=out,
                          eval_every=eval_every, save_every=steps, log_every=max(1, min(10, steps // 20)),
                          seed=seed, device="cpu", num_workers=0, progress=False, **overrides)


def reusable_demo_run(demo, tc, seed: int) -> dict | None:
    """The demo's own KD run of this seed, when it was trained with exactly this config."""
    folder = demo.out / f"student-kd-s{seed}"
    report = demo.out / "report.json"
    try:
        saved = json.loads((folder / "final" / "train_config.json").read_text())["config"]
        run = json.loads(report.read_text())["runs"][f"kd-s{seed}"]
    except (OSError, KeyError, ValueError):
        return None
    from dataclasses import MISSING, fields

    from student.train_config import RESUME_FREE, TrainConfig

    now = tc.to_json()
    saved = {**{f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}, **saved}
    diff = [k for k in now if k not in RESUME_FREE and saved.get(k) != now[k]]
    if diff:
        log(f"the demo's run {folder} differs in {diff}: trained again")
    same = not diff
    if not same or not run.get("exact"):
        return None
    return {"out": str(folder), "final": run["final"], "exact": run["exact"], "reused": str(folder)}


def quality_run(args, demo, assets, name: str, overrides: dict, seed: int) -> dict:
    from pipeline.evaluate import evaluate_model
    from student.train import FINAL, train_student

    out = args.out / f"{name}-s{seed}"
    tc = train_config(args, demo, name, overrides, seed, out, args.steps)
    if name == "fnet" and not args.quick:
        reused = reusable_demo_run(demo, tc, seed)
        if reused is not None:
            log(f"{name} seed {seed}: reusing the demo's run {reused['reused']}")
            return reused
    done = out / "result.json"
    init = overrides.get("init_from")
    key = run_key(tc, demo, Path(init) if init is not None else None)
    if done.is_file():
        previous = json.loads(done.read_text())
        if previous.get("key") == key:
            return previous
        log(f"{name} seed {seed}: {done} was trained with another teacher, cache or settings: trained again")
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    res = train_student(tc)
    train_s = time.perf_counter() - t0
    r = evaluate_model(out / FINAL, str(assets.data_dir), "test", args.eval_limit,
                       max_new_tokens=demo.resolved_max_new_tokens(), batch_size=50, device="cpu",
                       dtype="float32", out=out / "eval.jsonl", progress=False)
    result = {"out": str(out), "final": res.final_metrics, "exact": r.to_json(), "train_wall_s": train_s,
              "key": key}
    atomic_write_json(done, result)
    log(f"{name} seed {seed}: val CE {res.final_metrics.get('val_ce'):.4f}, KL "
        f"{res.final_metrics.get('val_kl'):.4f}, exact {r.strict_acc:.1%} ({train_s:.0f} s)")
    return result


# -------------------------------------------------------------------------------------------------- speed


def step_times(args, demo, name: str, overrides: dict, steps: int) -> list[float]:
    """Seconds per optimizer step of ``steps`` steps (the first 3 dropped) of the real loop."""
    from student.train import TrainHooks, fit, setup

    out = args.out / f"speed-{name}"
    shutil.rmtree(out, ignore_errors=True)
    tc = train_config(args, demo, name, overrides, 0, out, steps)
    tc = replace(tc, eval_every=0, save_every=0, val_cache=None)
    stamps: list[float] = []
    run = setup(tc)
    try:
        fit(run, TrainHooks(after_step=lambda step: stamps.append(time.perf_counter())))
    finally:
        run.close()
        shutil.rmtree(out, ignore_errors=True)
    return [b - a for a, b in zip(stamps[3:], stamps[4:])]


class Decoder:
    """Prefill + one-token decode steps for the FNet (rolling state) and a transformers model (KV cache)."""

    def __init__(self, model):
        self.model = model.eval()
        self.fnet = hasattr(model, "decode_step")

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor):
        if self.fnet:
            logits, state = self.model.prefill(ids)
            return logits.argmax(-1), state
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1), out.past_key_values

    @torch.no_grad()
    def step(self, tok: torch.Tensor, state):
        if self.fnet:
            return self.model.decode_step(tok, state).argmax(-1), state
        out = self.model(tok[:, None], past_key_values=state, use_cache=True)
        return out.logits[:, -1].argmax(-1), out.past_key_values

    def state_bytes(self, state, batch: int) -> int:
        return state.state_bytes_per_sequence() if self.fnet else kv_bytes(state) // batch


def decode_speed(model, vocab: int, context: int, batch: int, steps: int, reps: int) -> dict:
    """Tokens/s of ``steps`` decode steps after a ``context``-token prompt (prefill not timed), and the
    state bytes per sequence at the end."""
    dec = Decoder(model)
    rates, nbytes = [], 0
    for r in range(reps):
        ids = torch.randint(3, vocab, (batch, context), generator=torch.Generator().manual_seed(r))
        tok, state = dec.prefill(ids)
        dec.step(tok, state)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            tok, state = dec.step(tok, state)
        rates.append(batch * steps / (time.perf_counter() - t0))
        nbytes = dec.state_bytes(state, batch)
    return {"context": context, "batch": batch, "tok_s": round(statistics.median(rates), 1),
            "tok_s_all": [round(x, 1) for x in rates], "state_bytes_per_seq": nbytes}


def long_model(name: str, trained_dir: Path, positions: int):
    """An untrained model of ``trained_dir``'s shape with ``positions`` positions (speed and state do not
    depend on the weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from student.modeling import CausalFNetConfig, CausalFNetForCausalLM

    cfg = json.loads((trained_dir / "config.json").read_text())
    torch.manual_seed(0)
    if cfg["model_type"] == CausalFNetConfig.model_type:
        drop = ("auto_map", "architectures", "transformers_version")
        keep = {k: v for k, v in cfg.items() if k not in drop}
        return CausalFNetForCausalLM(CausalFNetConfig(**{**keep, "max_position_embeddings": positions}))
    c = AutoConfig.from_pretrained(trained_dir)
    c.max_position_embeddings = positions
    return AutoModelForCausalLM.from_config(c)


# -------------------------------------------------------------------------------------------------- report


def summarise(quality: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, runs in quality.items():
        def col(get):
            xs = [get(r) for r in runs]
            xs = [x for x in xs if x is not None]
            return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                    "values": xs} if xs else None

        out[name] = {"val_ce": col(lambda r: r["final"].get("val_ce")),
                     "val_kl": col(lambda r: r["final"].get("val_kl")),
                     "exact": col(lambda r: r["exact"]["strict_acc"]),
                     "exact_n": runs[0]["exact"]["n"]}
    return out


def paired(quality: dict[str, list[dict]], a: str, b: str, key) -> dict | None:
    xs = [key(x) - key(y) for x, y in zip(quality[a], quality[b])]
    return {"mean": statistics.mean(xs), "values": xs} if xs else None


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["students"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for name in names:
        q = result["summary"][name]
        st = result["students"][name]
        ax.errorbar(st["parameters"] / 1e3, 100 * q["exact"]["mean"], yerr=100 * q["exact"]["sd"], fmt="o",
                    capsize=3, label=f"{name} (val CE {q['val_ce']['mean']:.3f})")
    ax.set_xlabel("parameters (thousands)")
    ax.set_ylabel("exact answers on held-out problems (%)")
    ax.set_title("quality (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    for ax, batch in zip(axes[1:], (1, 32)):
        for name in names:
            pts = [p for p in result["speed"]["long"][name] if p["batch"] == batch]
            ax.plot([p["context"] for p in pts], [p["tok_s"] for p in pts], "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"decode speed, batch {batch} (1 thread)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, default=REPO / "runs" / "demo", help="demo folder (assets, caches)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "compare", help="work folder for the runs")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "compare.json")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="default: the demo's")
    ap.add_argument("--eval-limit", type=int, default=None, help="held-out problems (default: the demo's)")
    ap.add_argument("--cut-ffn", type=int, default=None,
                    help="FFN channels of the cut student (default: all)")
    ap.add_argument("--cut-lr", type=float, default=1e-3)
    ap.add_argument("--speed-steps", type=int, default=23)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 60 steps, 20 problems, 1 seed")
    ap.add_argument("--only", default=",".join(STUDENTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from pipeline.demo.config import DemoConfig
    from pipeline.demo.stages import embedded_assets, teacher_cache_stage

    demo = DemoConfig(out=args.demo, progress=False)
    s = demo.resolved_student()
    if args.quick:
        args.steps, args.eval_limit, args.seeds, args.speed_steps = 60, 20, 1, 8
    args.steps = args.steps or s.steps
    args.eval_limit = args.eval_limit or demo.resolved_eval_limit()
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    assets = embedded_assets(demo, log)
    temps = tuple(sorted({1.0, float(s.temperature)}))
    for split in ("train", "test"):
        if not (args.demo / f"cache-{split}" / "manifest.json").is_file():
            teacher_cache_stage(demo, assets, split, temps, log)
    cut_info = make_cut(assets.teacher_dir, args.out / "cut-init", args.cut_ffn)
    configs = {k: v for k, v in student_configs(args, demo, args.out / "cut-init").items()
               if k in args.only.split(",")}
    log(f"students: {json.dumps({k: {kk: str(vv) for kk, vv in v.items()} for k, v in configs.items()})}")

    quality = {name: [quality_run(args, demo, assets, name, ov, seed) for seed in range(args.seeds)]
               for name, ov in configs.items()}

    log("speed: training steps, side by side")
    train_speed = {name: [] for name in configs}
    for _ in range(2):  # two rounds, so that a change in load hits every student alike
        for name, ov in configs.items():
            train_speed[name] += step_times(args, demo, name, ov, args.speed_steps)
    students, short, long_ = {}, {}, {}
    vocab = 512
    for name in configs:
        final = Path(quality[name][0]["out"]) / "final"
        from student.sources import load_any_student

        model = load_any_student(final, "compare")
        model = model.lm if hasattr(model, "lm") else model
        students[name] = {"parameters": count(model), "model_type": model.config.model_type,
                          "hidden_size": model.config.hidden_size, "layers": model.config.num_hidden_layers,
                          "ffn": model.config.intermediate_size, "overrides": {k: str(v) for k, v in
                                                                              configs[name].items()},
                          "train_s_per_step": statistics.median(train_speed[name]),
                          "train_s_per_step_all": [round(x, 4) for x in train_speed[name]]}
        log(f"speed: decode of {name} after 64 prompt tokens")
        short[name] = [decode_speed(model, vocab, 64, b, 8 if args.quick else 64, 1 if args.quick else 3)
                       for b in (1, 32)]
        # the FNet decodes up to its 1,024 positions (a 1,000-token context + the timed steps)
        contexts = [64, 256, 1000] if name == "fnet" else [64, 256, 1000, 2048, 4096]
        big = long_model(name, final, 1024 if name == "fnet" else 4096 + 64)
        long_[name] = [decode_speed(big, vocab, c, b, 16 if not args.quick else 4, 2 if not args.quick else 1)
                       for c in contexts for b in (1, 32)]
    result = {
        "what": "one cache, four students: quality over paired seeds and speed side by side (bench/"
                "compare_students.py)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
        "budget": {**s.replace(steps=args.steps).to_json(), "seeds": args.seeds,
                   "eval_problems": args.eval_limit, "cut_lr": args.cut_lr, "quick": args.quick},
        "cut": cut_info, "students": students, "quality": quality, "summary": summarise(quality),
        "paired_exact_vs_fnet": {n: paired(quality, n, "fnet", lambda r: r["exact"]["strict_acc"])
                                 for n in configs if n != "fnet" and "fnet" in configs},
        "speed": {"after_64": short, "long": long_}, "wall_s": time.perf_counter() - t_start,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results, result)
    plot(result, args.results.with_suffix(".png"))
    log(f"wrote {args.results} and {args.results.with_suffix('.png')} ({result['wall_s']:.0f} s)")
    for name in configs:
        q, st = result["summary"][name], students[name]
        log(f"{name:13s} {st['parameters']:>8,} params  val CE {q['val_ce']['mean']:.4f}  KL "
            f"{q['val_kl']['mean']:.4f}  exact {100 * q['exact']['mean']:.1f} ± "
            f"{100 * q['exact']['sd']:.1f}%  "
            f"{1000 * st['train_s_per_step']:.1f} ms/step  decode b1 {short[name][0]['tok_s']:.0f} / b32 "
            f"{short[name][1]['tok_s']:.0f} tok/s")


if __name__ == "__main__":
    main()
