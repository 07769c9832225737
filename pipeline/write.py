"""Stage one as a writer: the teacher samples solutions to questions, and the kept ones become cache rows.

- ``sample_solutions``: batched sampling on the teacher's KV cache. Prompts are left-padded and prefilled
  once per question, the cache is repeated for the question's N samples, finished rows leave the batch once
  they are more than half of it (``DROP_FINISHED``). Each (seed, question, sample) has its own uniform stream
  (``row_uniforms``), so the text of a sample depends on the teacher and that triple only, not on which rows
  share its batch, the rank or a resume.
- ``choose``: which samples to keep (answer equal to the reference; or agreeing with the majority answer of
  the question's N samples, with a minimum vote share; or all), exact duplicates dropped, and the provenance
  of every kept row.
- ``write_units``: units of questions, each written atomically to ``<out>/generation/`` so that a killed
  stage one resumes where it stopped.

The kept solutions are then cached exactly like reference answers (``pipeline.teacher_cache``): the same
tokenization, the same teacher pass, the same encodings.
"""

from __future__ import annotations

import inspect
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cache.schema import FingerprintMismatch
from cache.util import UserError, atomic_write_bytes
from pipeline.answers import strict_answer

KEEP_POLICIES = ("auto", "reference", "majority", "all")
GENERATION_DIR = "generation"
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class WriteSettings:
    """How the teacher writes: ``samples`` solutions per question at ``temperature`` / ``top_p`` (0: greedy),
    at most ``max_new_tokens`` each, kept by ``keep`` (``min_vote``: the least share of the N samples the
    majority answer needs). Everything here is in the cache fingerprint; ``batch_rows`` is not."""

    samples: int
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    keep: str = "auto"
    min_vote: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.samples, int) or self.samples < 1:
            raise UserError(f"--write must be a positive number of solutions per question, got "
                            f"{self.samples}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"--write-temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--write-top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise UserError(f"--write-max-tokens must be at least 1, got {self.max_new_tokens}")
        if self.keep not in KEEP_POLICIES:
            raise UserError(f"--keep must be one of {'|'.join(KEEP_POLICIES)}, got {self.keep!r}")
        if not 0 <= self.min_vote <= 1:
            raise UserError(f"--min-vote must be a share in [0, 1], got {self.min_vote}")
        if self.temperature == 0 and self.samples > 1:
            raise UserError(f"--write {self.samples} with --write-temperature 0 would write the same greedy "
                            "solution every time; use --write 1 or a temperature > 0")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ sampling


def sample_seed(seed: int, question: int, sample: int) -> int:
    return xxhash.xxh64_intdigest(f"write/{seed}/{question}/{sample}".encode()) & ((1 << 63) - 1)


def row_uniforms(seed: int, question: int, sample: int, steps: int) -> torch.Tensor:
    """The uniforms that drive one sample, one per generated token: a pure function of its triple."""
    gen = torch.Generator().manual_seed(sample_seed(seed, question, sample))
    return torch.rand(steps, generator=gen, dtype=torch.float64)


# Most likely ids tried first, in tiers: a row whose nucleus lies inside its first tier is drawn there, else
# inside the next, and a row whose nucleus fits no tier (flat distributions, top_p 1) is sorted whole. Peaked
# rows (a trained teacher at T <= 1) stop at the first tier; a 1024-row step of a 512-id vocabulary costs
# 20 ms with one tier of 256 and 5 ms with (32, 256) (bench/bench_write.py measures the whole writer).
CANDIDATES: tuple[int, ...] = (32, 256)


def _nucleus_pick(p: torch.Tensor, ids: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    """Inverse CDF at ``u`` over probabilities ``p`` (R, n) of ids ``ids`` (R, n) taken in descending order of
    probability, ties by id, cut to the fewest ids whose mass reaches ``top_p``."""
    by_id = torch.argsort(ids, dim=-1)  # ids ascending, so the stable sort below breaks ties by id
    p, ids = p.gather(1, by_id), ids.gather(1, by_id)
    p, order = torch.sort(p, dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)
    if top_p < 1.0:
        before = torch.cumsum(p, dim=-1) - p  # mass of the more likely ids
        p = p.masked_fill(before >= top_p, 0.0)
    cdf = torch.cumsum(p, dim=-1)  # unnormalised after the cut
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
    # u < 1, so the first cdf entry above u * total exists and carries mass (cdf rises only where p > 0)
    idx = idx.clamp_(max=cdf.shape[1] - 1)
    return ids.gather(1, idx).squeeze(1)


def pick_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of ``logits`` (B, V): greedy at temperature 0, else the inverse CDF at ``u`` (B,) of
    softmax(logits / T) over the ids in descending order of probability (ties by id), restricted to the
    fewest most likely ids whose mass reaches ``top_p``.

    Sorting a 151,936-id vocabulary for every row and token would cost more than the teacher's step, so each
    row first tries its most likely ids, ``CANDIDATES`` tier by tier: when a tier's mass reaches ``top_p`` the
    nucleus lies inside it and the draw is the same as over the sorted vocabulary; other rows (flat
    distributions, ``top_p`` 1) are sorted whole. The choice is per row, so a row's token never depends on its
    batch."""
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.double() / temperature  # (B, V)
    u = u.to(z.device)
    logp = torch.log_softmax(z, dim=-1)
    B, V = z.shape
    out = torch.empty(B, dtype=torch.long, device=z.device)
    todo = torch.arange(B, device=z.device)  # rows not drawn yet
    for k in (CANDIDATES if top_p < 1.0 else ()):
        if k >= V or len(todo) == 0:
            break
        top_lp, top_ids = torch.topk(logp[todo], k, dim=-1)  # (R, k)
        top = top_lp.exp()
        # the k-th id may tie with ids outside the set: only the first k - 1 must reach top_p
        inside = (top.sum(-1) - top[:, -1]) >= top_p
        if inside.any():
            sel = inside.nonzero().squeeze(1)
            out[todo[sel]] = _nucleus_pick(top[sel], top_ids[sel], u[todo[sel]], top_p)
            todo = todo[~inside]
    if len(todo):
        ids = torch.arange(V, device=z.device).expand(len(todo), V)
        out[todo] = _nucleus_pick(logp[todo].exp(), ids, u[todo], top_p)
    return out


class _PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in buffers sized for the whole generation (prompt width
    plus the new tokens), written in place. ``DynamicLayer`` concatenates the whole cache at every token, a
    copy that grows with the sequence and was a third of the writer's time on a small teacher. ``keys`` and
    ``values`` (what attention reads, and ``DynamicLayer``'s length) are views of the filled positions, the
    same numbers as the concatenated tensors; rows leaving the batch move to the front of the same buffers."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def _allocate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Empty buffers for the rows and heads of ``k``/``v`` (B, H, T, D), ``capacity`` positions."""
        self._k = k.new_empty(k.shape[0], k.shape[1], self.capacity, k.shape[-1])
        self._v = v.new_empty(v.shape[0], v.shape[1], self.capacity, v.shape[-1])

    def _fill(self, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """Write ``k``/``v`` at positions ``start``.. of the buffers; the views end after them."""
        end = start + k.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions cannot take position {end}")
        self._k[:, :, start: end], self._v[:, :, start: end] = k, v
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._allocate(key_states, value_states)
        self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._fill(key_states, value_states, self.keys.shape[-2])
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        # only the filled positions are copied
        k, v = (t.repeat_interleave(repeats, dim=0) for t in (self.keys, self.values))
        self._allocate(k, v)
        self._fill(k, v)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices``: they move to the front of the same buffers (through a copy of their filled
        positions), so dropping rows never allocates a second full-size cache."""
        if not self.is_initialized:
            return
        k, v = self.keys[indices], self.values[indices]  # (B', H, length, D)
        self._k, self._v = self._k[: len(indices)], self._v[: len(indices)]
        self._fill(k, v)


def _generation_cache(model: Any, capacity: int) -> DynamicCache:
    """A ``DynamicCache`` of ``_PreallocatedLayer``s for ``capacity`` positions (one per decoder layer)."""
    cache = DynamicCache(config=model.config)
    if len(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_PreallocatedLayer(capacity) for _ in cache.layers]
    return cache  # other layer kinds (sliding windows, ...) keep what transformers chose


def _cache_kwarg(model: Any) -> str:
    """The name the model's forward takes its KV cache by (``cache`` in newer transformers releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# Finished rows stay in the batch (their tokens ignored) until they are more than 1/DROP_FINISHED of it:
# dropping rows copies the whole KV cache, which cost more than computing a few finished rows.
DROP_FINISHED = 2


@torch.inference_mode()
def sample_solutions(model: Any, prompts: list[list[int]], questions: list[int], settings: WriteSettings, *,
                     stop_ids: list[int], pad_id: int) -> list[list[tuple[list[int], bool]]]:
    """``settings.samples`` solutions for each prompt; ``questions[i]`` is prompt i's question index (its
    seed). Returns, per prompt and sample, (new token ids before the stop token, whether it stopped)."""
    dev = next(model.parameters()).device
    n, steps = settings.samples, settings.max_new_tokens
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (Q, T) left-padded
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp_(min=0)
    cache = _generation_cache(model, width + steps)
    kw = _cache_kwarg(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{kw: cache})
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)  # (Q*N, V)
    cache.batch_repeat_interleave(n)
    mask = mask.repeat_interleave(n, 0)
    next_pos = pos[:, -1:].repeat_interleave(n, 0) + 1  # (Q*N, 1)
    rows = len(prompts) * n
    uniforms = torch.stack([row_uniforms(settings.seed, q, s, steps) for q in questions for s in range(n)])
    stops = torch.tensor(sorted(set(stop_ids)), device=dev)
    tokens = torch.full((rows, steps), pad_id, dtype=torch.long)  # (R, steps) on the CPU
    length = torch.full((rows,), steps, dtype=torch.long)
    stopped = torch.zeros(rows, dtype=torch.bool)
    active = torch.arange(rows)  # global row of each batch row
    alive = torch.ones(rows, dtype=torch.bool)  # batch rows still writing; finished ones wait to be dropped
    for t in range(steps):
        tok = pick_tokens(logits, uniforms[active, t], settings.temperature, settings.top_p)  # (A,)
        tok_cpu = tok.cpu()
        tokens[active[alive], t] = tok_cpu[alive]
        done = torch.isin(tok_cpu, stops) & alive
        if done.any():
            fin = active[done]
            length[fin], stopped[fin] = t, True
            alive &= ~done
        if t == steps - 1 or not alive.any():
            break
        if int((~alive).sum()) * DROP_FINISHED > len(active):  # finished rows leave the batch (and KV cache)
            sel = alive.nonzero().squeeze(1)
            active, tok, alive = active[sel], tok[sel.to(tok.device)], alive[sel]
            cache.batch_select_indices(sel.to(dev))
            mask, next_pos = mask[sel.to(dev)], next_pos[sel.to(dev)]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], 1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                    **{kw: cache})
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    result = []
    for i in range(len(prompts)):
        rows_i = range(i * n, (i + 1) * n)
        result.append([(tokens[r, : length[r]].tolist(), bool(stopped[r])) for r in rows_i])
    return result


# ----------------------------------------------------------------------------------------------- keeping


@dataclass
class Written:
    """One solution the teacher wrote for question ``question`` (its input row), sample ``sample``."""

    question: int
    sample: int
    text: str
    tokens: int
    stopped: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def written_answer(text: str) -> Decimal | None:
    """The final answer of a written solution: the number after its ``####`` (None without one)."""
    return strict_answer(text)


def choose(written: list[Written], references: dict[int, Decimal | None], settings: WriteSettings
           ) -> tuple[list[Written], list[dict[str, Any]], dict[str, Any]]:
    """(kept solutions, their provenance, totals) for the solutions of every question.

    ``references[q]`` is question q's reference answer (None where the row has none); with keep ``auto`` a
    question with a reference keeps the samples that match it, one without keeps those agreeing with the
    unique most frequent answer of its samples when that answer has at least ``min_vote`` of the N votes (a
    tie for the top keeps nothing). Samples that did not stop (length limit) or repeat an earlier sample's
    text exactly are never kept. A reference is recorded (``correct``) whenever one exists, also when it is
    not used to keep."""
    by_q: dict[int, list[Written]] = {}
    for w in written:
        by_q.setdefault(w.question, []).append(w)
    kept, prov = [], []
    totals = Counter()
    shares = []
    for q in sorted(by_q):
        samples = sorted(by_q[q], key=lambda w: w.sample)
        ref = references.get(q)
        policy = settings.keep
        if policy == "auto":
            policy = "reference" if ref is not None else "majority"
        if policy == "reference" and ref is None:
            raise UserError(f"--keep reference: question row {q + 1} has no reference answer; use --keep "
                            "auto (self-consistency where there is none) or --keep majority")
        answers = [written_answer(w.text) if w.stopped else None for w in samples]
        votes = Counter(a for a in answers if a is not None)
        top = votes.most_common(2)
        majority = None
        share = 0.0
        if top and (len(top) == 1 or top[0][1] > top[1][1]):
            majority, share = top[0][0], top[0][1] / len(samples)
        shares.append(share)
        totals["questions"] += 1
        totals["samples"] += len(samples)
        totals["stopped"] += sum(w.stopped for w in samples)
        totals["with_answer"] += sum(a is not None for a in answers)
        if ref is not None:
            totals["with_reference"] += len(samples)
            totals["correct"] += sum(a == ref for a in answers)
            totals["majority_correct"] += int(majority is not None and majority == ref)
            totals["questions_with_reference"] += 1
        if top and majority is None:
            totals["ties"] += 1
        seen: set[str] = set()
        kept_here = 0
        for w, a in zip(samples, answers):
            if policy == "reference":
                ok = a is not None and a == ref
            elif policy == "majority":
                ok = a is not None and a == majority and share >= settings.min_vote
            else:
                ok = w.stopped
            if not ok:
                continue
            if w.text in seen:
                totals["duplicates"] += 1
                continue
            seen.add(w.text)
            kept.append(w)
            kept_here += 1
            prov.append({"source": "teacher", "row": q, "sample": w.sample,
                         "answer": None if a is None else str(a),
                         "correct": None if ref is None else bool(a == ref),
                         "vote_share": round(votes[a] / len(samples), 6) if a is not None else None,
                         "kept_by": policy})
        totals["kept"] += kept_here
        totals["questions_kept"] += int(kept_here > 0)
    summary = dict(totals)
    for k in ("questions", "samples", "stopped", "with_answer", "kept", "duplicates", "ties", "correct",
              "with_reference", "majority_correct", "questions_with_reference", "questions_kept"):
        summary.setdefault(k, 0)
    summary["teacher_accuracy"] = (summary["correct"] / summary["with_reference"]
                                   if summary["with_reference"] else None)
    summary["majority_accuracy"] = (summary["majority_correct"] / summary["questions_with_reference"]
                                    if summary["questions_with_reference"] else None)
    summary["mean_vote_share"] = float(np.mean(shares)) if shares else None
    summary["keep_rate"] = summary["kept"] / summary["samples"] if summary["samples"] else None
    return kept, prov, summary


# ------------------------------------------------------------------------------------------------- units


def generation_fingerprint(teacher_identity: dict[str, Any], tokenizer_hash: str, questions_hash: str,
                           settings: WriteSettings, unit_size: int) -> dict[str, Any]:
    s = settings.to_json()
    s.pop("keep"), s.pop("min_vote")  # keeping happens after writing: other choices reuse the same samples
    return {"teacher": teacher_identity, "tokenizer_hash": tokenizer_hash, "questions": questions_hash,
            "sampling": s, "unit_size": unit_size}


def unit_file(folder: Path, unit: int) -> Path:
    return folder / f"unit-{unit:06d}.jsonl"


def open_generation_dir(out: Path, fingerprint: dict[str, Any]) -> Path:
    """``<out>/generation``, created with the fingerprint, or checked against it when it exists."""
    folder = out / GENERATION_DIR
    path = folder / SETTINGS_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path} is corrupt; delete the folder {folder} and rerun") from None
        if old != json.loads(json.dumps(fingerprint)):
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise FingerprintMismatch(f"{folder} holds solutions written with other settings (differs: "
                                      f"{', '.join(diff)}); use another --out or delete the folder {out}")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(fingerprint, indent=1).encode())
    return folder


def write_unit(folder: Path, unit: int, written: list[Written]) -> None:
    body = "".join(json.dumps(w.to_json(), ensure_ascii=False) + "\n" for w in written)
    atomic_write_bytes(unit_file(folder, unit), body.encode("utf-8"))


def read_units(folder: Path, num_units: int) -> list[Written]:
    out = []
    for u in range(num_units):
        path = unit_file(folder, u)
        if not path.exists():
            raise UserError(f"{path} is missing: a rank did not finish writing; rerun the same command")
        for line in path.read_text(encoding="utf-8").splitlines():
            out.append(Written(**json.loads(line)))
    return out
