"""The teacher pass: load a causal LM, then turn its next-token distributions at supervised positions into
sparse targets (top-k log-probs, temperature shifts, exact tail mass, optional sampled ids with counts).

The (batch x seq x vocab) logits never exist whole: the base model gives hidden states, and the output head,
the fp32 log-softmax and the top-k run on chunks of the gathered supervised positions only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from transformers import AutoModelForCausalLM

from cache.device import resolve_device
from cache.util import UserError, file_hash, json_hash
from pipeline.data import TokenizedSeq
from pipeline.hub import hub_local_only

LOGPROB_DTYPES = {"float32": np.float32, "float16": np.float16}
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


@dataclass(frozen=True)
class TargetSettings:
    topk: int = 64
    temperatures: tuple[float, ...] = (1.0, 2.0)
    samples: int = 0
    seed: int = 0
    logprob_dtype: str = "float32"
    chunk_positions: int = 32

    def __post_init__(self) -> None:
        if self.topk <= 0:
            raise UserError(f"--topk must be a positive number of ids, got {self.topk}")
        if not self.temperatures or any(not (t > 0) for t in self.temperatures):
            raise UserError(f"--temperatures must be positive numbers, e.g. 1,2; got {self.temperatures}")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise UserError(f"--temperatures has duplicates: {self.temperatures}")
        if self.samples < 0:
            raise UserError(f"--samples must be 0 (off) or a positive number of draws, got {self.samples}")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise UserError(f"--logprob-dtype must be one of {'|'.join(LOGPROB_DTYPES)}, "
                            f"got {self.logprob_dtype!r}")
        if self.chunk_positions <= 0:
            raise UserError(f"chunk_positions must be positive, got {self.chunk_positions}")

    def check_vocab(self, vocab_size: int) -> None:
        if self.topk > vocab_size:
            raise UserError(f"--topk {self.topk} is larger than the teacher's vocabulary ({vocab_size}); "
                            f"use at most {vocab_size}")


@dataclass
class SeqTargets:
    """Sparse teacher targets of one sequence; row j predicts the j-th supervised token."""

    topk_ids: np.ndarray  # int32 [n, k]
    topk_logprobs: np.ndarray  # float32|float16 [n, k]
    topk_shift: np.ndarray  # float32 [n, nT]
    tail_mass: np.ndarray  # float32 [n, nT]
    sample_offsets: np.ndarray | None = None  # int64 [n+1]
    sample_ids: np.ndarray | None = None  # int32 [m]
    sample_counts: np.ndarray | None = None  # int32 [m]


@dataclass
class Teacher:
    model: Any
    identity: dict[str, Any]
    vocab_size: int
    device: torch.device
    dtype: torch.dtype


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in COMPUTE_DTYPES:
        raise UserError(f"--dtype must be auto or one of {'|'.join(COMPUTE_DTYPES)}, got {dtype!r}")
    return COMPUTE_DTYPES[dtype]


def looks_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~", "."))


def local_model_identity(folder: Path) -> dict[str, Any]:
    """A local teacher is identified by the hashes of its config.json and weight files (not its path)."""
    files = sorted(p for p in folder.iterdir() if p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES))
    return {"kind": "local", "hash": json_hash({p.name: file_hash(p) for p in files})}


def check_teacher_source(name: str) -> None:
    """Fail early, with one line, when a local teacher folder is missing or not a model folder."""
    if looks_local(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise UserError(f"teacher folder {folder} does not exist; pass a model folder or a Hub id")
        if not (folder / "config.json").exists():
            raise UserError(f"teacher folder {folder} has no config.json; pass a save_pretrained folder")
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"teacher {folder / 'config.json'} is not valid JSON ({e}); restore or re-save "
                            "the model with save_pretrained") from None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
            raise UserError(f"teacher {folder / 'config.json'} has no model_type; restore or re-save the "
                            "model with save_pretrained")
    else:
        hub_local_only(name, flag="--teacher", what="teacher")


def load_teacher(name: str, *, device: str = "auto", dtype: str = "auto") -> Teacher:
    """Load any causal LM from a local folder or a Hub id, in eval mode, on ``device`` in ``dtype``."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    check_teacher_source(name)
    try:
        local_only = not looks_local(name) and hub_local_only(name, flag="--teacher", what="teacher")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, local_files_only=local_only)
    except OSError as e:
        if looks_local(name):
            raise UserError(f"cannot load the teacher from {name} ({str(e).splitlines()[0]})") from None
        raise UserError(
            f"could not load teacher {name!r} from the Hugging Face Hub ({str(e).splitlines()[0]}); if the "
            "Hub is unreachable (offline, HF_HUB_OFFLINE=1), pass a local model folder with --teacher"
        ) from None
    model.to(dev).eval()
    if looks_local(name):
        identity = local_model_identity(Path(name).expanduser())
    else:
        identity = {"kind": "hub", "id": name, "revision": getattr(model.config, "_commit_hash", None)}
    vocab = int(model.get_output_embeddings().weight.shape[0])
    return Teacher(model, identity, vocab, dev, torch_dtype)


def check_token_ids(tokenizer_len: int, max_id: int, vocab_size: int) -> None:
    if max_id >= vocab_size or tokenizer_len > vocab_size:
        raise UserError(f"the tokenizer has {tokenizer_len} tokens (largest id used {max_id}) but the "
                        f"teacher's vocabulary has only {vocab_size} rows; pass the teacher's own tokenizer "
                        "with --tokenizer")


def sparse_from_logits(z: torch.Tensor, topk: int, temperatures: tuple[float, ...],
                       buf: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From fp32 logits ``z`` (P, V): top-k ids (P, k) by descending probability, their log p_1 (P, k), the
    temperature shifts (P, nT), the exact tail masses (P, nT) and the row maxima (P, 1).

    With m the row max, S_T = sum_v exp((z_v - m) / T) over the vocabulary and S_T,tail the same sum over the
    ids outside the top-k: LSE(z/T) = m/T + log S_T and tail_T = S_T,tail / S_T = exp(LSE_tail(z/T) -
    LSE(z/T)), with no cancellation. ``buf`` is scratch space of at least z's shape."""
    top_z, top_ids = torch.topk(z, topk, dim=-1, sorted=True)  # (P, k)
    m = top_z[:, :1]  # (P, 1)
    buf = torch.empty_like(z) if buf is None else buf[: z.shape[0]]
    lse = torch.empty_like(m)
    shifts, tails = {}, {}
    for t in (1.0, *(t for t in temperatures if t != 1.0)):
        torch.sub(z, m, out=buf)
        if t != 1.0:
            buf.div_(t)
        total = buf.exp_().sum(-1, keepdim=True)  # (P, 1)
        tail = buf.scatter_(1, top_ids, 0.0).sum(-1, keepdim=True) / total
        lse_t = m / t + total.log()
        if t == 1.0:
            lse = lse_t
        shifts[t], tails[t] = lse / t - lse_t, tail
    shift = torch.cat([shifts[t] for t in temperatures], 1)  # (P, nT)
    tail = torch.cat([tails[t] for t in temperatures], 1)  # (P, nT)
    return top_ids, top_z - lse, shift, tail, m


def sample_seed(seed: int, seq_id: int, position: int) -> int:
    return xxhash.xxh64_intdigest(f"{seed}/{seq_id}/{position}".encode()) & ((1 << 63) - 1)


def draw_samples(z: torch.Tensor, m: torch.Tensor, seeds: list[int], n: int, buf: torch.Tensor | None = None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` draws with replacement from each row of softmax(``z``) (P, V); ``m`` (P, 1) is the row max.

    Inverse CDF (cumulative sums in fp64) on uniforms from a CPU generator seeded per row: the draws depend
    on the row's distribution and seed only, not on batching, rank or device. Returns (unique ids ascending,
    counts) per row."""
    uniforms = torch.empty(len(seeds), n, dtype=torch.float64)
    gen = torch.Generator()
    for r, s in enumerate(seeds):
        gen.manual_seed(s)
        uniforms[r] = torch.rand(n, generator=gen, dtype=torch.float64)
    buf = torch.empty_like(z) if buf is None else buf[: z.shape[0]]
    cdf = torch.cumsum(torch.sub(z, m, out=buf).exp_(), dim=-1, dtype=torch.float64)  # (P, V), unnormalised
    targets = uniforms.to(cdf.device) * cdf[:, -1:]  # (P, n)
    draws = torch.searchsorted(cdf, targets, right=True).clamp_(max=cdf.shape[1] - 1).cpu()  # (P, n)
    out = []
    for row in draws:
        ids, counts = torch.unique(row, sorted=True, return_counts=True)
        out.append((ids.numpy().astype(np.int32), counts.numpy().astype(np.int32)))
    return out


def _softcap(model: Any, z: torch.Tensor) -> torch.Tensor:
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(z / cap) * cap if cap else z


@torch.inference_mode()
def teacher_targets(teacher: Teacher, seqs: list[TokenizedSeq], settings: TargetSettings,
                    pad_id: int) -> list[SeqTargets]:
    """Run one right-padded batch through the teacher and return the sparse targets of every sequence."""
    model, dev = teacher.model, teacher.device
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, L)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, seeds = [], [], []
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.from_numpy(s.input_ids.astype(np.int64))
        attn[b, : len(s)] = 1
        targets = np.flatnonzero(s.loss_mask)
        rows.append(np.full(len(targets), b))
        cols.append(targets - 1)
        if settings.samples:
            seeds.extend(sample_seed(settings.seed, s.seq_id, int(t)) for t in targets)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = base(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False).last_hidden_state
    r = torch.from_numpy(np.concatenate(rows)).to(dev)
    c = torch.from_numpy(np.concatenate(cols)).to(dev)
    h = hidden[r, c]  # (P, d): the positions that predict supervised tokens
    del hidden
    head = model.get_output_embeddings()
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    samples: list[tuple[np.ndarray, np.ndarray]] = []
    buf = None
    for lo in range(0, h.shape[0], settings.chunk_positions):
        z = _softcap(model, head(h[lo: lo + settings.chunk_positions]).float())  # (p, V) fp32
        buf = torch.empty_like(z) if buf is None else buf
        top_ids, top_logp, shift, tail, m = sparse_from_logits(z, settings.topk, settings.temperatures, buf)
        for acc, x in zip(parts, (top_ids, top_logp, shift, tail)):
            acc.append(x.cpu())
        if settings.samples:
            rows_seeds = seeds[lo: lo + settings.chunk_positions]
            samples.extend(draw_samples(z, m, rows_seeds, settings.samples, buf))
    top_ids, top_logp, shift, tail = (torch.cat(p) for p in parts)
    out, lo = [], 0
    for s in seqs:
        n = int(s.loss_mask.sum())
        st = SeqTargets(
            topk_ids=top_ids[lo: lo + n].numpy().astype(np.int32),
            topk_logprobs=top_logp[lo: lo + n].numpy().astype(LOGPROB_DTYPES[settings.logprob_dtype]),
            topk_shift=shift[lo: lo + n].numpy().astype(np.float32),
            tail_mass=tail[lo: lo + n].numpy().astype(np.float32),
        )
        if settings.samples:
            rows_s = samples[lo: lo + n]
            st.sample_offsets = np.concatenate([[0], np.cumsum([len(i) for i, _ in rows_s])]).astype(np.int64)
            st.sample_ids = np.concatenate([i for i, _ in rows_s]).astype(np.int32)
            st.sample_counts = np.concatenate([c for _, c in rows_s]).astype(np.int32)
        out.append(st)
        lo += n
    return out


def token_budget_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group consecutive indices (sequences already length-ordered) so that each batch's padded size
    ``len(batch) * max_len`` stays within ``batch_tokens``; a sequence longer than the budget goes alone."""
    batches: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i, n in enumerate(lengths):
        w = max(width, n)
        if cur and (len(cur) + 1) * w > batch_tokens:
            batches.append(cur)
            cur, w = [], n
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches
