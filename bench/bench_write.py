"""The teacher writing solutions: ``pipeline.write.sample_solutions`` against a plain ``model.generate()``
loop over the same questions, and stage one's scoring pass on written solutions against reference answers.

Writers, side by side in one process on the same prompts (N samples per question, T 0.7, top-p 0.95):

- ``write``: this project's sampler (prefill once per question, KV cache repeated for its samples, finished
  rows leave the batch, one seeded uniform stream per sample);
- ``generate``: ``model.generate(do_sample=True, num_return_sequences=N)`` on left-padded prompts, the loop a
  user would write with transformers (its own sampling, not reproducible across batch shapes).

At batch 1 (one question, N samples), 32 questions, and the default ``--write-batch`` (1024 sequences). Tokens
per second count generated tokens up to and including the stop token; peak memory is the peak RSS above the
loaded model (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA).

Then stage one scores the kept written solutions and, in the same process, the same number of reference
answers: tokens per second of the teacher pass on each.

``python bench/bench_write.py [--model demo|qwen2-small] [--questions 256]`` writes
``bench/results/write.json``. ``demo`` is the shipped 0.85 M-parameter demo teacher on the demo's problems;
``qwen2-small`` a random Qwen2 with the real 151,936-token vocabulary (hidden 256, 4 layers) on GSM8K
questions from ../shared with the real tokenizer (its text is noise; only speed is measured there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from peak_rss import reset_peak_rss, status_mib  # noqa: E402

from cache.device import machine_info  # noqa: E402
from cache.util import UserError  # noqa: E402


def load(kind: str, n: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "demo":
        from pipeline.demo.problems import iter_problems

        path = ROOT / "pipeline" / "demo" / "pretrained" / "teacher"
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        it = iter_problems(123, stream="bench")
        rows = [next(it) for _ in range(n)]
        return model, tok, rows, path
    import os

    shared = Path(os.environ.get("FNET_SHARED", ROOT.parent / "shared"))
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(shared / "tokenizers" / "qwen2")
    torch.manual_seed(0)
    shape = (dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2) if kind == "qwen2-small" else  # Qwen2-0.5B's shape
             dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2))
    cfg = Qwen2Config(vocab_size=151_936, max_position_embeddings=2048, tie_word_embeddings=True,
                      eos_token_id=151645, pad_token_id=151643, **shape)
    model = Qwen2ForCausalLM(cfg).eval()
    with open(shared / "data" / "gsm8k" / "test.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(n)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-write-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return model, tok, rows, tmp


def peak_mib(device: torch.device, base: float) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mib("VmHWM") - base


def reset(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0.0
    return reset_peak_rss()


def run_write(model, prompts, n, ws, stops, pad, per_batch):
    from pipeline.write import sample_solutions

    new = 0
    for lo in range(0, len(prompts), per_batch):
        batch = prompts[lo:lo + per_batch]
        out = sample_solutions(model, batch, list(range(lo, lo + len(batch))), ws, stop_ids=stops, pad_id=pad)
        new += sum(len(ids) + int(stopped) for q in out for ids, stopped in q)
    return new


def run_generate(model, prompts, n, ws, stops, pad, per_batch, device):
    from transformers import GenerationConfig

    from pipeline.evaluate import cut_at_stop, left_pad

    gc = GenerationConfig(do_sample=True, temperature=ws.temperature, top_p=ws.top_p, top_k=0,
                          max_new_tokens=ws.max_new_tokens, num_return_sequences=n, eos_token_id=stops,
                          pad_token_id=pad)
    new = 0
    torch.manual_seed(0)
    for lo in range(0, len(prompts), per_batch):
        ids, mask = left_pad(prompts[lo:lo + per_batch], pad, device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        for row in out[:, ids.shape[1]:].tolist():
            _, used, _ = cut_at_stop(row, stops)
            new += used
    return new


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", choices=("demo", "qwen2-small", "qwen2-0.5b"))
    ap.add_argument("--questions", type=int, default=256)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="default: bench/results/write.json (write_<model>.json for "
                    "the random Qwen2 shapes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from pipeline.prompts import prompt_ids, stop_token_ids
    from pipeline.write import WriteSettings

    device = torch.device(args.device)
    model, tok, rows, model_dir = load(args.model, args.questions)
    model.to(device)
    stops = stop_token_ids(tok, model)
    pad = int(tok.pad_token_id)
    prompts = [prompt_ids(tok, r["question"], "x") for r in rows]
    ws = WriteSettings(samples=args.samples, max_new_tokens=args.max_new_tokens)
    results = []
    for label, per_batch in (("batch 1 question", 1), ("32 questions", 32),
                             ("default --write-batch 1024 sequences", max(1, 1024 // args.samples))):
        qs = prompts if per_batch > 1 else prompts[: max(8, args.questions // 16)]
        for writer in ("write", "generate"):
            base = reset(device)
            t0 = time.perf_counter()
            if writer == "write":
                new = run_write(model, qs, args.samples, ws, stops, pad, per_batch)
            else:
                new = run_generate(model, qs, args.samples, ws, stops, pad, per_batch, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
            row = {"batch": label, "writer": writer, "questions": len(qs), "new_tokens": new,
                   "seconds": round(wall, 3), "tokens_per_s": round(new / wall, 1),
                   "peak_mib": round(peak_mib(device, base), 1)}
            results.append(row)
            print(json.dumps(row), flush=True)

    # Stage one scoring: the kept written solutions against as many reference answers, each scored twice,
    # alternating, into fresh folders (a process's first pass pays for warm-up); the faster pass counts.
    # The written passes reuse the first run's generation/ folder, so they time the scoring only.
    from pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache

    scoring: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-write-") as tmp:
        tmp = Path(tmp)
        q = tmp / "q.jsonl"
        q.write_text("".join(json.dumps({"question": r["question"]}) + "\n" for r in rows))
        common = dict(teacher=str(model_dir), topk=32, temperatures=(1.0,), max_length=512, batch_tokens=8192,
                      device=args.device, unit_size=256, progress=False)
        written = dict(dataset=str(q), write=args.samples, write_max_tokens=args.max_new_tokens, keep="all",
                       **common)
        try:
            first = run_teacher_cache(TeacherCacheConfig(out=tmp / "written", **written))
        except UserError as e:  # a random-weight model rarely ends a solution: nothing to score
            scoring["skipped"] = str(e)
            return finish(args, ws, device, results, scoring)
        kept = first["sequences"]
        refs = (rows * (kept // len(rows) + 1))[:kept]
        r = tmp / "r.jsonl"
        r.write_text("".join(json.dumps({"question": x["question"], "answer": x["answer"]}) + "\n"
                             for x in refs))
        for rep in range(2):
            for name in ("written", "reference"):
                out_dir = tmp / f"{name}-{rep}"
                if name == "written":
                    shutil.copytree(tmp / "written" / "generation", out_dir / "generation")
                    cfg = TeacherCacheConfig(out=out_dir, **written)
                else:
                    cfg = TeacherCacheConfig(dataset=str(r), out=out_dir, **common)
                summ = run_teacher_cache(cfg)
                if name not in scoring or summ["tokens_per_second"] > scoring[name]["tokens_per_s"]:
                    scoring[name] = {"sequences": summ["sequences"], "tokens": summ["tokens"],
                                     "tokens_per_s": summ["tokens_per_second"],
                                     "bytes_per_supervised_token": summ["bytes_per_supervised_token"]}
        print(json.dumps(scoring), flush=True)
    return finish(args, ws, device, results, scoring)


def finish(args, ws, device, results, scoring) -> int:
    report = {"bench": "write", "model": args.model, "device": str(device), "samples": args.samples,
              "max_new_tokens": args.max_new_tokens, "temperature": ws.temperature, "top_p": ws.top_p,
              "threads": args.threads, "machine": machine_info(), "results": results, "scoring": scoring,
              "date": time.strftime("%Y-%m-%d")}
    name = "write.json" if args.model == "demo" else f"write_{args.model}.json"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
