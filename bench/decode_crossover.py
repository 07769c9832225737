"""Where the FNet's constant-cost decode overtakes a transformer's: decode tokens/s of the default student
(d=256, 4 layers, FFN 1024, W=32) and a Qwen2 of the same width, depth and FFN (4 heads of 64, 2 key/value
heads, KV cache) after contexts of 64 .. 4,096 tokens (batch 1; up to 2,048 at batch 32), in fp32 and with
both models' weights in bf16 (applied to both alike). Writes bench/results/decode_crossover.json.

    nice -n 19 python bench/decode_crossover.py [--quick] [--threads 1]

Each point: prefill the context (not timed), then ``--steps`` greedy one-token steps (timed), median of
``--reps``; the FNet gets a position table long enough for every context (its cost per token does not depend
on the position). The crossover is the first context where the FNet decodes at least as fast, interpolated
between the measured lengths on a log scale. The FNet's definition is unchanged.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from compare_students import decode_speed  # noqa: E402  (the same prefill + timed decode steps)

from cache.util import atomic_write_json  # noqa: E402

VOCAB = 8192
CONTEXTS = [64, 128, 256, 512, 1024, 2048, 4096]


def models(max_pos: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from student.modeling import CausalFNetForCausalLM, student_config

    torch.manual_seed(0)
    fnet = CausalFNetForCausalLM(student_config(VOCAB, max_position_embeddings=max_pos)).eval()
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4,
                                        intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=max_pos, tie_word_embeddings=True)).eval()
    return {"fnet": fnet, "qwen2": qwen}


def crossover(points: list[tuple[int, float, float]]) -> float | None:
    """First context where fnet >= qwen2 tok/s, log-interpolated; None when never within the lengths."""
    prev = None
    for n, f, q in points:
        r = math.log(f / q)
        if r >= 0:
            if prev is None:
                return float(n)
            (n0, r0) = prev
            t = -r0 / (r - r0)
            return float(math.exp(math.log(n0) + t * (math.log(n) - math.log(n0))))
        prev = (n, r)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "decode_crossover.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [64, 256, 1024] if args.quick else CONTEXTS
    steps, reps = (4, 1) if args.quick else (args.steps, args.reps)
    out = {"what": "decode tokens/s after a context, FNet (rolling state) vs Qwen2 (KV cache), same shape",
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "threads": args.threads}, "vocab": VOCAB, "steps": steps, "reps": reps, "runs": {}}
    for dtype in ("float32", "bfloat16"):
        ms = {k: m.to(getattr(torch, dtype)) for k, m in models(max(contexts) + steps + 8).items()}
        for batch in (1, 32):
            rows = []
            for n in contexts:
                if batch > 1 and n > 2048:  # a 32 x 4,096-token prefill takes minutes on one thread
                    continue
                f = decode_speed(ms["fnet"], VOCAB, n, batch, steps, reps)
                q = decode_speed(ms["qwen2"], VOCAB, n, batch, steps, reps)
                rows.append({"context": n, "fnet_tok_s": f["tok_s"], "qwen2_tok_s": q["tok_s"],
                             "fnet_state_bytes": f["state_bytes_per_seq"],
                             "qwen2_kv_bytes": q["state_bytes_per_seq"],
                             "fnet_vs_qwen2": round(f["tok_s"] / q["tok_s"], 3)})
                print(dtype, batch, rows[-1], flush=True)
            pts = [(r["context"], r["fnet_tok_s"], r["qwen2_tok_s"]) for r in rows]
            out["runs"][f"{dtype}-b{batch}"] = {"points": rows, "crossover_context": crossover(pts)}
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    atomic_write_json(args.out, out)
    print("wrote", args.out, {k: v["crossover_context"] for k, v in out["runs"].items()})


if __name__ == "__main__":
    main()
