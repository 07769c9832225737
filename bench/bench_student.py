"""Student speed and memory: reference STFT formulation vs the fast path, kernel cost, conv/FFT crossover,
and generation with full recompute vs the rolling state. Writes bench/results/student.json.

    python bench/bench_student.py [--quick] [--out bench/results/student.json]

Activation memory is the total size of the distinct tensor storages autograd saves for backward during one
forward pass (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded; ``kernel_bytes`` is
the part that depends on the weights only (the STFT kernels), the rest grows with batch x tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peak_rss import reset_peak_rss, status_mib  # noqa: E402  (this folder)

import student.modeling as modeling  # noqa: E402
from cache.util import atomic_write_json  # noqa: E402
from student.chunked_loss import chunked_distill_loss  # noqa: E402
from student.losses import DistillTargets, combine_loss  # noqa: E402
from student.modeling import (  # noqa: E402
    CausalFNetConfig,
    CausalFNetForCausalLM,
    causal_stft_mix,
    stft_kernel,
    stft_kernel_grad,
)

VOCAB = 8192  # a compacted-vocabulary-sized head (same for both formulations), so the mixing layers dominate
THREADS = 2
TOPK = 32  # synthetic teacher top-k per position for the training loss
TEMPERATURE = 2.0


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: line.split()[1] for line in f}
    return int(info["MemAvailable"]) * 1024


def reference_stft_mix(x: torch.Tensor, projection: torch.nn.Linear, window: int) -> torch.Tensor:
    """The research formulation, the baseline timed here: zero-pad, strided (B, T, W, d) windows, Re fftn,
    flatten, linear (tests/test_modeling.py holds the same formula as its reference and checks this one)."""
    B, T, d = x.shape
    xp = torch.nn.functional.pad(x, (0, 0, window - 1, 0))  # (B, T + W - 1, d)
    s = xp.stride()
    windows = xp.as_strided((B, T, window, d), (s[0], s[1], s[1], s[2]))  # (B, T, W, d)
    return projection(torch.fft.fftn(windows, dim=(-2, -1)).real.reshape(B, T, window * d))


_TARGETS: dict[tuple, DistillTargets] = {}


def synthetic_targets(ids: torch.Tensor) -> DistillTargets:
    """Teacher targets for every position of ``ids`` (B, T): the next id as label, a random top-k."""
    key = (tuple(ids.shape), ids.device)
    if key not in _TARGETS:
        gen = torch.Generator().manual_seed(0)
        n = ids.numel()
        logp = (torch.randn(n, TOPK, generator=gen).sort(-1, descending=True).values - 3.0).half()
        _TARGETS[key] = DistillTargets(
            labels=ids.roll(-1, 1).flatten(),
            topk_ids=torch.randint(0, VOCAB, (n, TOPK), generator=gen).to(ids.device),
            topk_logprobs=logp.to(ids.device), shift=(torch.randn(n, generator=gen) * 0.1).to(ids.device),
            tail=(torch.rand(n, generator=gen) * 0.2).to(ids.device))
    return _TARGETS[key]


def training_loss(model: CausalFNetForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The trainer's loss path: hidden states, then the chunked fused head + top-k KD loss (alpha 0.5, tau 2)
    over every position; without its gradient-ahead option, so every tensor held for backward is visible
    to the saved-tensor hooks. The same on both formulations."""
    hidden = model.hidden_states(ids).flatten(0, 1)  # (B*T, d)
    sums = chunked_distill_loss(hidden, model.get_output_embeddings().weight, synthetic_targets(ids),
                                kind="topk_tail", temperature=TEMPERATURE, chunk_size=1024)
    return combine_loss(sums, alpha=0.5, temperature=TEMPERATURE, normalizer=hidden.shape[0])


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def make_model(d: int, layers: int, ffn: int, W: int, max_pos: int, vocab: int = VOCAB
               ) -> CausalFNetForCausalLM:
    torch.manual_seed(0)
    cfg = CausalFNetConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, intermediate_size=ffn,
                           stft_window_size=W, max_position_embeddings=max_pos, hidden_dropout_prob=0.1)
    return CausalFNetForCausalLM(cfg)


def set_mixer(model: CausalFNetForCausalLM, kind: str) -> None:
    """kind: 'reference' (research formulation), or a fast impl 'auto' | 'conv' | 'fft'."""
    for block in model.encoder:
        m = block.causal_stft
        if kind == "reference":
            m.forward = lambda x, m=m: reference_stft_mix(x, m.projection, m.window)
        else:
            m.__dict__.pop("forward", None)
            m.impl = kind
    model._bench_fast = kind != "reference"


def saved_bytes(model, ids, blocks_only: bool) -> tuple[int, int]:
    """(saved non-parameter bytes, of which STFT-kernel bytes) for one forward pass, distinct storages.
    blocks_only: the embeddings + blocks (``hidden_states``), without the LM head and loss; otherwise the
    whole training loss (``training_loss``)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kernels: set[int] = set()
    seen: dict[int, int] = {}
    original = modeling.stft_kernel

    def tracked(*args):
        k = original(*args)
        kernels.add(k.untyped_storage().data_ptr())
        return k

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    modeling.stft_kernel = tracked
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), step_context(model, ids):
            if blocks_only:
                out = model.hidden_states(ids)
            else:
                out = training_loss(model, ids)
            del out
    finally:
        modeling.stft_kernel = original
    return sum(seen.values()), sum(v for p, v in seen.items() if p in kernels)


def step_context(model, ids):
    """The fast path runs as the trainer should use it: kernels built once per optimizer step, only the
    taps the step's longest sequence reaches (``max_len``)."""
    if getattr(model, "_bench_fast", False):
        return model.shared_kernels(max_len=ids.shape[1])
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> float:
    """Restart the peak-memory counter of ``device`` (CPU: VmHWM, CUDA: the allocator's peak); returns the
    baseline in MiB for ``peak_growth``."""
    if device.type != "cuda":
        return reset_peak_rss()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**20


def peak_growth(device: torch.device, base: float) -> float:
    """Peak memory (MiB) since ``reset_peak`` above its baseline."""
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else status_mib("VmHWM")
    return peak - base


def fwd_bwd_seconds(model, ids, reps: int, warmup: int, amp: torch.dtype | None = None
                    ) -> tuple[list[float], float, float]:
    """Times of ``reps`` training steps (forward + backward of ``training_loss``, under autocast to ``amp``
    if given) after ``warmup`` untimed ones; the peak memory growth (MiB) over the timed steps (CPU: RSS,
    CUDA: allocated): activations, temporaries and the parameter gradients (set to None before every step, so
    each step allocates them again; the same on both sides); the last step's loss."""
    device = ids.device
    times = []
    base = float("nan")
    loss = torch.tensor(float("nan"))
    for i in range(warmup + reps):
        model.zero_grad(set_to_none=True)
        if i == warmup:
            base = reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with step_context(model, ids):
            with autocast:
                loss = training_loss(model, ids)
            loss.backward()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, peak_growth(device, base), float(loss)


def bench_training(name, d, layers, ffn, W, T, batches, reps, ref_reps,
                   kinds=("reference", "auto", "conv", "fft")) -> list[dict]:
    """Each kind: median of ``reps`` timed steps after one warm-up step (the reference: ``ref_reps``, and
    no warm-up when one step of it takes minutes)."""
    model = make_model(d, layers, ffn, W, max_pos=max(T, 8)).train()
    rows = []
    for B in batches:
        ids = torch.randint(0, VOCAB, (B, T))
        row = {"config": name, "d": d, "layers": layers, "ffn": ffn, "W": W, "T": T, "batch": B,
               "vocab": VOCAB}
        window = B * T * W * d  # elements of one (B, T, W, d) window tensor
        # The reference keeps each layer's real fp32 windows for its linear and briefly holds a complex
        # fftn output and its gradient (8 bytes per element each).
        ref_bytes = layers * window * 4 + 2 * window * 8
        row["reference_peak_MB_estimate"] = ref_bytes / 2**20
        for kind in kinds:
            if kind == "reference" and ref_bytes > 0.8 * available_bytes():
                print(name, B, "reference skipped: needs", ref_bytes / 2**30, "GiB", flush=True)
                row["reference_skipped"] = (f"needs ~{ref_bytes / 2**30:.1f} GiB, "
                                            f"{available_bytes() / 2**30:.1f} GiB available")
                continue
            set_mixer(model, kind)
            big = kind == "reference" and ref_bytes > 4 * 2**30
            n = ref_reps if kind == "reference" else reps
            times, peak, _ = fwd_bwd_seconds(model, ids, n, warmup=0 if big else 1)
            model.zero_grad(set_to_none=True)
            row[f"{kind}_s"], row[f"{kind}_s_all"] = median(times), times
            row[f"{kind}_peak_rss_MB"] = peak
            for scope in ("model", "blocks"):
                total, kern = saved_bytes(model, ids, blocks_only=scope == "blocks")
                row[f"{kind}_{scope}_act_MB"] = (total - kern) / 2**20
                row[f"{kind}_{scope}_kernel_MB"] = kern / 2**20
            print(name, B, kind, f"{row[f'{kind}_s']:.2f}s", f"peak +{peak:.0f}MB",
                  f"{row[f'{kind}_model_act_MB']:.1f}MB",
                  f"blocks {row[f'{kind}_blocks_act_MB']:.1f}MB",
                  f"kernels {row[f'{kind}_model_kernel_MB']:.1f}MB", flush=True)
        if "reference_s" in row:
            row["speedup"] = row["reference_s"] / row["auto_s"]
            row["act_ratio_model"] = row["reference_model_act_MB"] / row["auto_model_act_MB"]
            row["act_ratio_blocks"] = row["reference_blocks_act_MB"] / row["auto_blocks_act_MB"]
            row["peak_ratio"] = row["reference_peak_rss_MB"] / row["auto_peak_rss_MB"]
        w = model.encoder[0].causal_stft.projection.weight
        for label, taps in (("all_taps", None), ("reachable_taps", min(W, T))):
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                for block in model.encoder:
                    stft_kernel(block.causal_stft.projection.weight.detach(), W, taps)
                times.append(time.perf_counter() - t0)
            row[f"kernel_build_{label}_all_layers_s"] = median(times)
        times = []
        grad = torch.randn(d, min(W, T), d)  # a kernel gradient with the reachable taps
        for _ in range(3):  # the gradient map at the end of shared_kernels: all W taps of the weight out
            t0 = time.perf_counter()
            for _block in model.encoder:
                stft_kernel_grad(grad, W)
            times.append(time.perf_counter() - t0)
        row["kernel_grad_map_all_layers_s"] = median(times)
        row["projection_params_per_layer"] = w.numel()
        rows.append(row)
    return rows


def bench_crossover(d: int, B: int, T: int, lengths: list[int], device: torch.device | None = None
                    ) -> list[dict]:
    """Fast layer alone, fwd+bwd: direct conv1d vs block FFT convolution for effective windows L = min(W, T);
    median of 3 after a warm-up, the two interleaved so that load changes hit both."""
    device = device or torch.device("cpu")
    rows = []
    x = torch.randn(B, T, d, device=device, requires_grad=True)
    for L in lengths:
        k = torch.randn(d, L, d, device=device, requires_grad=True)
        row = {"d": d, "B": B, "T": T, "L": L}
        times: dict[str, list[float]] = {"conv": [], "fft": []}
        for i in range(4):
            for impl in ("conv", "fft"):
                sync(device)
                t0 = time.perf_counter()
                causal_stft_mix(x, k, None, impl).sum().backward()
                sync(device)
                if i:
                    times[impl].append(time.perf_counter() - t0)
                x.grad = k.grad = None
        for impl in ("conv", "fft"):
            row[f"{impl}_s"] = median(times[impl])
        crossover = modeling.FFT_CROSSOVER.get(device.type) or 10**9
        row["auto_picks"] = "fft" if (L >= crossover and B * T >= max(
            modeling.FFT_MIN_TOKENS, modeling.FFT_MIN_TOKENS_PER_TAP * L)) else "conv"
        print("crossover", row, flush=True)
        rows.append(row)
    return rows


def bench_layer(d: int, W: int, T: int, B: int, reps: int) -> dict:
    """One mixing layer alone, forward + backward into x and the projection: the reference formulation vs
    the fast path with its kernel built from the weight inside the timed call (build + its gradient map
    included, as in a step without shared_kernels) and with the kernel given (its cost amortised over a
    step). Medians of ``reps`` after a warm-up, the three interleaved."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(W * d, d)
    x = torch.randn(B, T, d, requires_grad=True)
    kern = stft_kernel(proj.weight.detach(), W, min(W, T)).requires_grad_()
    runs = {
        "reference": lambda: reference_stft_mix(x, proj, W),
        "fast_with_kernel_build": lambda: causal_stft_mix(x, stft_kernel(proj.weight, W, min(W, T)),
                                                          proj.bias),
        "fast_kernel_given": lambda: causal_stft_mix(x, kern, proj.bias),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(reps + 1):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn().square().mean().backward()
            if i:
                times[name].append(time.perf_counter() - t0)
            x.grad = proj.weight.grad = proj.bias.grad = kern.grad = None
    row = {"d": d, "W": W, "T": T, "B": B, **{f"{k}_s": median(v) for k, v in times.items()}}
    row["speedup_with_kernel_build"] = row["reference_s"] / row["fast_with_kernel_build_s"]
    row["speedup_kernel_given"] = row["reference_s"] / row["fast_kernel_given_s"]
    print("layer", row, flush=True)
    return row


@torch.no_grad()
def bench_generation(prompt: int, new: int) -> dict:
    """Batch 1, greedy, one thread (tiny per-token ops only lose to thread hand-offs on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = make_model(256, 4, 1024, 32, max_pos=1024).eval()
    ids = torch.randint(0, VOCAB, (1, prompt))
    out = {"config": "d256 L4 FFN1024 W32", "vocab": VOCAB, "prompt": prompt, "new_tokens": new, "threads": 1}
    model.generate_fast(ids, max_new_tokens=2)  # builds the cached kernels once, as after loading
    rolling = []

    def run_rolling():
        for _ in range(3):
            t0 = time.perf_counter()
            model.generate_fast(ids, max_new_tokens=new)
            rolling.append(new / (time.perf_counter() - t0))

    run_rolling()
    for kind in ("reference", "auto"):
        set_mixer(model, kind)
        seq = ids
        t0 = time.perf_counter()
        for _ in range(new):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        out[f"recompute_{kind}_tok_s"] = new / (time.perf_counter() - t0)
    set_mixer(model, "auto")
    run_rolling()  # before and after the (minutes-long) recompute runs: the load may change in between
    out["rolling_tok_s"], out["rolling_tok_s_all"] = median(rolling), rolling
    out["speedup_vs_reference_recompute"] = out["rolling_tok_s"] / out["recompute_reference_tok_s"]
    out["speedup_vs_fast_recompute"] = out["rolling_tok_s"] / out["recompute_auto_tok_s"]
    print("generation", out, flush=True)
    torch.set_num_threads(threads)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "student.json"))
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    ap.add_argument("--layer-only", action="store_true",
                    help="only the single-layer comparison, added to an existing --out file")
    ap.add_argument("--training-only", action="store_true",
                    help="only the whole-model training comparison, replacing it in an existing --out file")
    ap.add_argument("--token-crossover", action="store_true",
                    help="d=512/W=512 reference vs fast at batch 1 and 4 too (where the per-step kernel cost "
                         "is amortised), added to an existing --out file")
    args = ap.parse_args()
    if args.token_crossover:
        torch.set_num_threads(THREADS)
        res = json.loads(Path(args.out).read_text())
        res["token_crossover"] = bench_training("d512-W512-T128", 512, 4, 256, 512, 128, [1, 4], 3, 3,
                                                kinds=("reference", "auto"))
        atomic_write_json(args.out, res)
        return
    if args.training_only:
        torch.set_num_threads(THREADS)
        res = json.loads(Path(args.out).read_text())
        res["training"] = bench_training("d256-W32-T256", 256, 4, 1024, 32, 256, [8], 5, 3)
        res["training"] += bench_training("d512-W512-T128", 512, 4, 256, 512, 128, [2, 8], 3, 3)
        atomic_write_json(args.out, res)
        return
    if args.layer_only:
        torch.set_num_threads(THREADS)
        res = json.loads(Path(args.out).read_text())
        res["layer"] = [bench_layer(256, 32, 256, 8, 3), bench_layer(512, 512, 128, 2, 3)]
        atomic_write_json(args.out, res)
        return
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    res = {"machine": machine,
           "memory_method": "activation memory: distinct saved-for-backward tensor storages in one forward "
                            "(saved_tensors_hooks), parameters excluded; *_act_MB excludes and *_kernel_MB "
                            "counts the weight-only STFT kernels; 'model' = the trainer's loss path (hidden "
                            "states + chunked fused head/top-k KD loss), 'blocks' = embeddings + blocks; "
                            "*_peak_rss_MB = peak RSS growth over the timed steps (VmHWM), parameter "
                            "gradients included"}
    if args.quick:
        res["training"] = bench_training("quick", 32, 2, 64, 8, 32, [2], 1, 1)
        res["layer"] = [bench_layer(32, 8, 32, 2, 1)]
        res["crossover"] = bench_crossover(32, 2, 64, [4, 16, 32])
        res["generation"] = bench_generation(8, 16)
    else:
        res["generation"] = bench_generation(64, 256)
        atomic_write_json(args.out, res)
        res["training"] = bench_training("d256-W32-T256", 256, 4, 1024, 32, 256, [8], 5, 3)
        atomic_write_json(args.out, res)
        res["training"] += bench_training("d512-W512-T128", 512, 4, 256, 512, 128, [2, 8], 3, 3)
        atomic_write_json(args.out, res)
        res["layer"] = [bench_layer(256, 32, 256, 8, 3), bench_layer(512, 512, 128, 2, 3)]
        atomic_write_json(args.out, res)
        res["crossover"] = (bench_crossover(256, 8, 256, [8, 16, 32, 64, 128])
                            + bench_crossover(256, 1, 128, [16, 32, 64])
                            + bench_crossover(512, 2, 128, [16, 32, 64, 128])
                            + bench_crossover(512, 8, 128, [32, 128]))
    res["total_s"] = time.perf_counter() - t0
    atomic_write_json(args.out, res)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
