"""Decoding and training cost of the default student against the transformer a user would otherwise pick: a
``Qwen2ForCausalLM`` of the same width, depth and FFN size with its KV cache, side by side in one run.
Writes bench/results/decode.json.

    nice -n 5 python bench/bench_decode.py [--quick] [--threads 1] [--reps 2] [--reps32 1] [--out FILE]

* generation: a 64-token prompt + 256 new tokens (greedy, no eos), batch 1 and batch 32, tokens/s over the
  whole call (prefill included) for the student's ``generate_fast``, the student's ``generate()`` (rolling
  state through transformers' loop) and Qwen2's ``generate()`` (DynamicCache); full Qwen2 vocabulary
  (151,936, the default student) and a compacted 8,192-id head (same for both models);
* aten operations dispatched per generated token (``TorchDispatchMode`` count; kernel launches on a GPU);
* one training step (forward + backward through the trainer's loss: hidden states, chunked fused head +
  top-k KD loss, the student inside ``shared_kernels``), batch 8 x 256 tokens, 8,192-id head;
* state memory per sequence after 256 / 1,024 / 2,048 tokens: the student's rolling state vs Qwen2's KV cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_student import synthetic_targets  # noqa: E402  (the same synthetic teacher targets)

from cache.util import atomic_write_json  # noqa: E402
from student.chunked_loss import chunked_distill_loss  # noqa: E402
from student.losses import combine_loss  # noqa: E402
from student.modeling import CausalFNetForCausalLM, count_parameters, student_config  # noqa: E402

FULL_VOCAB = 151_936
COMPACT_VOCAB = 8_192  # bench_student's VOCAB: synthetic_targets draws top-k ids below it
PROMPT, NEW = 64, 256
D, LAYERS, FFN, W = 256, 4, 1024, 32


def student(vocab: int, max_pos: int = 1024) -> CausalFNetForCausalLM:
    torch.manual_seed(0)
    return CausalFNetForCausalLM(student_config(vocab, max_position_embeddings=max_pos)).eval()


def qwen2(vocab: int, max_pos: int = 4096):
    """The same width, depth and FFN; 4 heads of 64, 2 key/value heads (grouped like Qwen2's), tied head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=D, num_hidden_layers=LAYERS, intermediate_size=FFN,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def tokens_per_s(fn, tokens: int, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(tokens / (time.perf_counter() - t0))
    return out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def bench_generation(vocab: int, batch: int, new: int, reps: int) -> dict:
    fnet, qwen = student(vocab), qwen2(vocab)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, PROMPT), generator=gen)

    def kw(n):
        return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)

    runs = {
        "student_generate_fast": lambda n: fnet.generate_fast(ids, max_new_tokens=n),
        "student_generate": lambda n: fnet.generate(ids, **kw(n)),
        "qwen2_generate": lambda n: qwen.generate(ids, **kw(n)),
    }
    with torch.no_grad():
        a, b = runs["student_generate_fast"](16), runs["student_generate"](16)  # warm-up, and a check
        assert torch.equal(a, b), "generate() and generate_fast() disagree"
        runs["qwen2_generate"](16)
        res = {name: [] for name in runs}
        for _ in range(reps):  # interleaved, so that a change in machine load hits all three alike
            for name, fn in runs.items():
                res[name] += tokens_per_s(lambda fn=fn: fn(new), batch * new, 1)
    out = {"vocab": vocab, "batch": batch, "prompt": PROMPT, "new_tokens": new,
           **{f"{k}_tok_s": round(median(v), 1) for k, v in res.items()},
           **{f"{k}_tok_s_all": [round(x, 1) for x in v] for k, v in res.items()}}
    out["generate_vs_fast"] = round(out["student_generate_tok_s"] / out["student_generate_fast_tok_s"], 3)
    out["student_fast_vs_qwen2"] = round(out["student_generate_fast_tok_s"] / out["qwen2_generate_tok_s"], 3)
    out["student_generate_vs_qwen2"] = round(out["student_generate_tok_s"] / out["qwen2_generate_tok_s"], 3)
    print("generation", json.dumps(out), flush=True)
    return out


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_per_token(vocab: int) -> dict:
    """aten operations per generated token (batch 1): the student's decode step alone, and per token of
    ``generate()`` (difference between 33 and 1 new tokens, / 32) for both models."""
    fnet, qwen = student(vocab), qwen2(vocab)
    ids = torch.randint(3, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    out = {}
    with torch.no_grad():
        logits, state = fnet.prefill(ids)
        fnet.decode_step(logits.argmax(-1), state)
        with CountOps() as c:
            fnet.decode_step(logits.argmax(-1), state)
        out["student_decode_step"] = c.n
        for name, model in (("student_generate", fnet), ("qwen2_generate", qwen)):
            counts = []
            for new in (1, 33):
                with CountOps() as c:
                    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)
                counts.append(c.n)
            out[name] = round((counts[1] - counts[0]) / 32, 1)
    out["per_layer_student_decode_step"] = None  # filled below from a 1-layer vs 4-layer difference
    with torch.no_grad():
        one = CausalFNetForCausalLM(student_config(vocab, num_hidden_layers=1)).eval()
        logits, state = one.prefill(ids)
        with CountOps() as c:
            one.decode_step(logits.argmax(-1), state)
        out["per_layer_student_decode_step"] = round((out["student_decode_step"] - c.n) / (LAYERS - 1), 1)
    print("ops", json.dumps(out), flush=True)
    return out


def training_loss(hidden: torch.Tensor, head: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    sums = chunked_distill_loss(hidden.flatten(0, 1), head, synthetic_targets(ids), kind="topk_tail",
                                temperature=2.0, chunk_size=1024)
    return combine_loss(sums, alpha=0.5, temperature=2.0, normalizer=hidden.shape[0] * hidden.shape[1])


def bench_training(batch: int, T: int, reps: int) -> dict:
    fnet, qwen = student(COMPACT_VOCAB).train(), qwen2(COMPACT_VOCAB).train()
    ids = torch.randint(3, COMPACT_VOCAB, (batch, T), generator=torch.Generator().manual_seed(3))

    def fnet_step():
        with fnet.shared_kernels(max_len=T):
            training_loss(fnet.hidden_states(ids), fnet.get_output_embeddings().weight, ids).backward()
        fnet.zero_grad(set_to_none=True)

    def qwen_step():
        hidden = qwen.model(input_ids=ids, use_cache=False).last_hidden_state
        training_loss(hidden, qwen.get_output_embeddings().weight, ids).backward()
        qwen.zero_grad(set_to_none=True)

    times = {"student": [], "qwen2": []}
    fnet_step(), qwen_step()  # warm-up
    for _ in range(reps):
        for name, fn in (("student", fnet_step), ("qwen2", qwen_step)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    out = {"vocab": COMPACT_VOCAB, "batch": batch, "tokens": T,
           "student_step_s": round(median(times["student"]), 3),
           "qwen2_step_s": round(median(times["qwen2"]), 3),
           "student_step_s_all": [round(x, 3) for x in times["student"]],
           "qwen2_step_s_all": [round(x, 3) for x in times["qwen2"]],
           "student_parameters": count_parameters(fnet), "qwen2_parameters": count_parameters(qwen)}
    out["qwen2_vs_student_time"] = round(out["qwen2_step_s"] / out["student_step_s"], 3)
    print("training", json.dumps(out), flush=True)
    return out


def kv_bytes(cache) -> int:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values)
                   if t is not None)
    return sum(t.numel() * t.element_size() for kv in cache for t in kv)


def bench_state_memory(lengths: list[int]) -> dict:
    fnet, qwen = student(COMPACT_VOCAB, max_pos=max(lengths)), qwen2(COMPACT_VOCAB, max_pos=max(lengths))
    out = {"lengths": lengths, "student_bytes": [], "qwen2_kv_bytes": []}
    with torch.no_grad():
        for n in lengths:
            ids = torch.randint(3, COMPACT_VOCAB, (1, n), generator=torch.Generator().manual_seed(4))
            state = fnet(ids, use_cache=True, logits_to_keep=1).cache
            out["student_bytes"].append(state.state_bytes_per_sequence())
            out["qwen2_kv_bytes"].append(kv_bytes(qwen(ids, use_cache=True, logits_to_keep=1).cache))
    print("memory", json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few tokens and one repetition (a smoke test)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine a second thread mostly waits)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions per generation measurement (median)")
    ap.add_argument("--reps32", type=int, default=1, help="repetitions at batch 32 (default 1)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "decode.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    new, reps = (8, 1) if args.quick else (NEW, args.reps)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": args.threads,
                    "load_average_start": load_average()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": {"d": D, "layers": LAYERS, "ffn": FFN, "window": W,
                   "qwen2": "4 heads x 64, 2 kv heads, SwiGLU FFN, tied head, DynamicCache"},
        "generation": [], "ops_per_token": ops_per_token(COMPACT_VOCAB),
    }
    for vocab in (COMPACT_VOCAB, FULL_VOCAB):
        for batch in (1, 32):
            n_reps = reps if batch == 1 else args.reps32
            result["generation"].append(bench_generation(vocab, batch, new, n_reps))
    result["training"] = bench_training(8 if not args.quick else 2, 256 if not args.quick else 64,
                                        1 if args.quick else 3)
    result["state_memory"] = bench_state_memory([256, 1024, 2048] if not args.quick else [64, 128])
    result["machine"]["load_average_end"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
