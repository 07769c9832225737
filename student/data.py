"""Stage-two data: the cache as a torch Dataset, token-budget batches, and collation into padded tensors.

Order is decided by ``TokenBudgetBatchSampler`` alone, from sequence lengths (``reader.lengths``) and
``(seed, epoch)``; DataLoader workers only load and collate, so the batches do not depend on
``num_workers``. One epoch is planned as:

1. permute all sequences with ``rng(seed, epoch)``; cut the permutation into windows of ``sort_window``;
2. sort each window by length and pack it greedily into micro-batches with ``B * Lmax <= max_tokens``;
3. shuffle the micro-batch order; group consecutive micro-batches into global steps of
   ``micro_batches_per_step`` (one optimizer step = the whole accumulation window over all ranks);
4. rank ``r`` of ``world_size`` takes micro-batches ``r, r + world_size, ...`` of every step.

The plan does not depend on ``world_size`` (except that a short last step is split so every rank gets at
least one micro-batch), so 2 ranks see exactly the sequences 1 rank sees in each step. Resuming at
``(epoch, batches_consumed)`` (global steps done in that epoch) slices the plan; no record is read.

Alignment (docs/cache-spec.md): teacher row j of a sequence predicts ``input_ids[t_j]`` from position
``t_j - 1``; the batch carries these rows flattened in batch order, with ``pred_pos`` pointing at
``b * Lmax + t_j - 1`` in the flattened (B * Lmax) positions and ``labels = input_ids[b, t_j]``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from cache.util import UserError


def record_nbytes(rec) -> int:
    """Bytes held by a record's arrays."""
    return sum(v.nbytes for v in vars(rec).values() if isinstance(v, np.ndarray))


class DecodedRecords:
    """A cache reader that keeps the records it has decoded in memory, up to ``budget_bytes``.

    Decoding a compact-encoded record (bit-unpacking ids, dequantizing log-probs) costs about as much as a
    small student's training step, and a training run reads every record once per epoch. The first
    ``budget_bytes`` worth of records read are kept (no eviction: with shuffled epochs a fixed subset saves
    the same share of decodes as any policy) and returned again on later reads; their arrays are made
    read-only, so a consumer that writes into a record fails loudly instead of corrupting the next epoch.
    Values are identical to the reader's, so training results do not depend on the budget. Pickling (to a
    DataLoader worker) drops the kept records: every worker keeps its own.
    """

    def __init__(self, reader, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 (got {budget_bytes})")
        self.reader = reader
        self.budget_bytes = int(budget_bytes)
        self._kept: dict[int, Any] = {}
        self.kept_bytes = 0

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        i = int(i)
        rec = self._kept.get(i)
        if rec is not None:
            return rec
        rec = self.reader[i]
        if self.budget_bytes:
            n = record_nbytes(rec)
            if self.kept_bytes + n <= self.budget_bytes:
                for v in vars(rec).values():
                    if isinstance(v, np.ndarray):
                        v.flags.writeable = False
                self._kept[i] = rec
                self.kept_bytes += n
        return rec

    def __getattr__(self, name: str):  # lengths, num_supervised, settings, ...: the reader's
        if name in ("reader", "_kept"):  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.reader, name)

    def __getstate__(self) -> dict[str, Any]:
        return {"reader": self.reader, "budget_bytes": self.budget_bytes, "_kept": {}, "kept_bytes": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class CacheDataset(Dataset):
    """Random access by sequence over an open cache (``cache.reader.open_cache``); records stay memory-mapped.

    Items are ``CacheRecord`` objects (numpy views). The reader is picklable, so DataLoader workers reopen
    shards lazily in their own process.
    """

    def __init__(self, reader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        return self.reader[int(i)]

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self.reader.lengths, dtype=np.int64)

    @property
    def num_supervised(self) -> np.ndarray:
        return np.asarray(self.reader.num_supervised, dtype=np.int64)


@dataclass
class Batch:
    """One collated micro-batch. B sequences, padded to Lmax; N = total supervised rows; k = top-k;
    nT = cached temperatures; S = most sampled ids in any row (sample fields None without samples)."""

    seq_ids: Tensor  # (B,) int64
    lengths: Tensor  # (B,) int64
    input_ids: Tensor  # (B, Lmax) int64, padded with pad_id
    attention_mask: Tensor  # (B, Lmax) bool, True on real tokens
    loss_mask: Tensor  # (B, Lmax) bool, True on supervised target tokens t_j
    pred_pos: Tensor  # (N,) int64, b * Lmax + t_j - 1: where the student predicts row j
    labels: Tensor  # (N,) int64, input_ids[b, t_j]
    topk_ids: Tensor  # (N, k) int64
    topk_logprobs: Tensor  # (N, k) float32, log p at T = 1
    topk_shift: Tensor  # (N, nT) float32
    tail_mass: Tensor  # (N, nT) float32
    sample_ids: Tensor | None = None  # (N, S) int64, padded with 0
    sample_counts: Tensor | None = None  # (N, S) float32, padded with 0 (a zero weight)

    @property
    def num_supervised(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def _map(self, fn) -> Batch:
        return replace(self, **{f.name: None if (v := getattr(self, f.name)) is None else fn(v)
                                for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) on custom batch types."""
        return self._map(lambda t: t.pin_memory())


def gather_rows(hidden: Tensor, pred_pos: Tensor) -> Tensor:
    """Hidden states at the prediction positions: (B, Lmax, d) -> (N, d), row order = batch order."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, pred_pos)


def _pad_ragged(offsets: np.ndarray, values: np.ndarray, dtype) -> np.ndarray:
    """CSR (offsets (n+1,), values (m,)) -> (n, max row length) padded with 0."""
    sizes = np.diff(offsets)
    out = np.zeros((len(sizes), int(sizes.max(initial=0))), dtype=dtype)
    rows = np.repeat(np.arange(len(sizes)), sizes)
    cols = np.arange(len(values)) - np.repeat(offsets[:-1], sizes)
    out[rows, cols] = values
    return out


@dataclass(frozen=True)
class Collator:
    """Turns a list of cache records into a ``Batch`` (runs inside DataLoader workers)."""

    pad_id: int

    @classmethod
    def from_reader(cls, reader, pad_id: int | None = None) -> Collator:
        """Pad with the tokenizer's pad id from the manifest (eos, then 0, when it has none)."""
        if pad_id is None:
            tok = reader.manifest.get("tokenizer") or {}
            pad_id = tok.get("pad_token_id")
            if pad_id is None:
                pad_id = tok.get("eos_token_id", 0)
        return cls(pad_id=int(pad_id))

    def __call__(self, records: Sequence) -> Batch:
        if not records:
            raise ValueError("cannot collate an empty list of records")
        B = len(records)
        lengths = np.array([r.input_ids.shape[0] for r in records], dtype=np.int64)
        Lmax = int(lengths.max())
        input_ids = np.full((B, Lmax), self.pad_id, dtype=np.int64)
        attention = np.zeros((B, Lmax), dtype=bool)
        loss_mask = np.zeros((B, Lmax), dtype=bool)
        pred_pos, labels = [], []
        for b, r in enumerate(records):
            L = lengths[b]
            input_ids[b, :L] = r.input_ids
            attention[b, :L] = True
            loss_mask[b, :L] = r.loss_mask
            t = np.flatnonzero(r.loss_mask)
            if len(t) != r.topk_ids.shape[0] or (len(t) and t[0] < 1):
                raise UserError(f"cache record seq_id={r.seq_id} breaks the alignment convention "
                                f"({len(t)} supervised positions, {r.topk_ids.shape[0]} teacher rows, first "
                                f"at {t[:1].tolist()}); check it with `fnet-distill cache verify`")
            pred_pos.append(b * Lmax + t - 1)
            labels.append(r.input_ids[t])
        batch = Batch(
            seq_ids=torch.tensor([int(r.seq_id) for r in records], dtype=torch.int64),
            lengths=torch.from_numpy(lengths),
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention),
            loss_mask=torch.from_numpy(loss_mask),
            pred_pos=torch.from_numpy(np.concatenate(pred_pos).astype(np.int64)),
            labels=torch.from_numpy(np.concatenate(labels).astype(np.int64)),
            topk_ids=torch.from_numpy(np.concatenate([r.topk_ids for r in records]).astype(np.int64)),
            topk_logprobs=torch.from_numpy(np.concatenate([r.topk_logprobs for r in records])
                                           .astype(np.float32)),
            topk_shift=torch.from_numpy(np.concatenate([r.topk_shift for r in records]).astype(np.float32)),
            tail_mass=torch.from_numpy(np.concatenate([r.tail_mass for r in records]).astype(np.float32)),
        )
        if records[0].sample_offsets is not None:
            offsets, ids, counts, base = [np.zeros(1, np.int64)], [], [], 0
            for r in records:
                offsets.append(np.asarray(r.sample_offsets[1:], dtype=np.int64) + base)
                base += int(r.sample_offsets[-1])
                ids.append(r.sample_ids)
                counts.append(r.sample_counts)
            off = np.concatenate(offsets)
            batch.sample_ids = torch.from_numpy(_pad_ragged(off, np.concatenate(ids), np.int64))
            batch.sample_counts = torch.from_numpy(_pad_ragged(off, np.concatenate(counts), np.float32))
        return batch


def plan_micro_batches(lengths: np.ndarray, max_tokens: int, *, seed: int, epoch: int,
                       sort_window: int = 4096, max_batch_size: int | None = None) -> list[np.ndarray]:
    """One epoch's micro-batches (arrays of sequence indices), a pure function of its arguments."""
    lengths = np.asarray(lengths, dtype=np.int64)
    too_long = np.flatnonzero(lengths > max_tokens)
    if len(too_long):
        raise UserError(f"sequence {int(too_long[0])} has {int(lengths[too_long[0]])} tokens, more than "
                        f"the batch token budget {max_tokens}; raise the token budget (e.g. --batch-tokens) "
                        f"to at least {int(lengths.max())}")
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    cap = max_batch_size or len(lengths) or 1
    batches: list[np.ndarray] = []
    for w in range(0, len(perm), sort_window):
        window = perm[w:w + sort_window]
        window = window[np.argsort(lengths[window], kind="stable")]
        start = 0
        for i in range(1, len(window) + 1):
            # window is sorted by length, so window[i - 1] is the longest of window[start:i]
            if i == len(window) or (i + 1 - start) * lengths[window[i]] > max_tokens or i - start >= cap:
                batches.append(window[start:i])
                start = i
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step as one rank sees it."""

    index: int  # step number within the epoch
    micro_batches: list[list[int]]  # this rank's micro-batches (sequence indices), in order
    num_supervised: int  # supervised tokens in the WHOLE step (all ranks): the loss normalizer
    num_sequences: int  # sequences in the whole step (all ranks)


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Length-bucketed micro-batches under a padded-token budget, deterministic in ``(seed, epoch)``,
    partitioned across ranks, resumable without reading data. Use as ``DataLoader(batch_sampler=...)``.

    ``max_tokens`` bounds ``B * Lmax`` of every micro-batch. ``micro_batches_per_step`` is the number of
    micro-batches in one optimizer step over ALL ranks (a multiple of ``world_size``; each rank accumulates
    ``micro_batches_per_step / world_size`` of them). With ``drop_last`` a short last step is dropped;
    otherwise it is kept (every sequence seen once per epoch) and, with several ranks, its micro-batches are
    split until every rank has the same count (only if the step holds fewer sequences than ranks is it
    dropped).
    """

    def __init__(self, lengths: Sequence[int] | np.ndarray, max_tokens: int, *,
                 num_supervised: Sequence[int] | np.ndarray | None = None, seed: int = 0,
                 micro_batches_per_step: int = 1, world_size: int = 1, rank: int = 0, sort_window: int = 4096,
                 max_batch_size: int | None = None, drop_last: bool = False):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.num_sup = (np.asarray(num_supervised, dtype=np.int64) if num_supervised is not None
                        else np.zeros_like(self.lengths))
        if self.num_sup.shape != self.lengths.shape:
            raise ValueError("num_supervised and lengths must have the same length")
        if max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1 (got {max_tokens})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank must be in [0, world_size) (got rank={rank}, world_size={world_size})")
        if micro_batches_per_step < 1 or micro_batches_per_step % world_size:
            raise UserError(f"micro_batches_per_step={micro_batches_per_step} must be a positive multiple of "
                            f"world_size={world_size} (each rank accumulates the same number)")
        if sort_window < 1 or (max_batch_size is not None and max_batch_size < 1):
            raise UserError("sort_window and max_batch_size must be >= 1")
        self.max_tokens, self.seed = int(max_tokens), int(seed)
        self.micro_batches_per_step, self.world_size, self.rank = micro_batches_per_step, world_size, rank
        self.sort_window, self.max_batch_size, self.drop_last = sort_window, max_batch_size, drop_last
        self.epoch, self.batches_consumed = 0, 0
        self._cache: tuple[int, list[list[np.ndarray]]] | None = None

    @classmethod
    def from_dataset(cls, dataset: CacheDataset, max_tokens: int, **kwargs) -> TokenBudgetBatchSampler:
        return cls(dataset.lengths, max_tokens, num_supervised=dataset.num_supervised, **kwargs)

    def set_epoch(self, epoch: int, batches_consumed: int = 0) -> None:
        """Iterate epoch ``epoch`` from global step ``batches_consumed`` (steps already done in it)."""
        if epoch < 0 or batches_consumed < 0:
            raise ValueError("epoch and batches_consumed must be >= 0")
        n = self.num_steps(epoch)
        if batches_consumed > n:
            raise UserError(f"resume position {batches_consumed} is past the end of epoch {epoch} ({n} "
                            f"steps); the data, seed or batch settings differ from the interrupted run")
        self.epoch, self.batches_consumed = epoch, batches_consumed

    def global_steps(self, epoch: int) -> list[list[np.ndarray]]:
        """Every step of ``epoch`` as its list of micro-batches over all ranks (rank r takes [r::world])."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        micro = plan_micro_batches(self.lengths, self.max_tokens, seed=self.seed, epoch=epoch,
                                   sort_window=self.sort_window, max_batch_size=self.max_batch_size)
        M = self.micro_batches_per_step
        steps = [micro[i:i + M] for i in range(0, len(micro), M)]
        if steps and len(steps[-1]) < M:
            if self.drop_last:
                steps.pop()
            else:
                last = _split_to_multiple(steps[-1], self.world_size)
                if last is None:
                    steps.pop()
                else:
                    steps[-1] = last
        self._cache = (epoch, steps)
        return steps

    def num_steps(self, epoch: int | None = None) -> int:
        return len(self.global_steps(self.epoch if epoch is None else epoch))

    def steps(self) -> list[StepPlan]:
        """This rank's steps of the current epoch from the resume position: what ``__iter__`` yields,
        grouped by optimizer step, with the whole-step supervised-token count for loss normalisation."""
        out = []
        start = self.batches_consumed
        for s, step in enumerate(self.global_steps(self.epoch)[start:], start):
            out.append(StepPlan(
                index=s,
                micro_batches=[mb.tolist() for mb in step[self.rank::self.world_size]],
                num_supervised=int(sum(self.num_sup[mb].sum() for mb in step)),
                num_sequences=int(sum(len(mb) for mb in step)),
            ))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.steps():
            yield from step.micro_batches

    def __len__(self) -> int:
        steps = self.global_steps(self.epoch)[self.batches_consumed:]
        return sum(len(step[self.rank::self.world_size]) for step in steps)


def _split_to_multiple(step: list[np.ndarray], world_size: int) -> list[np.ndarray] | None:
    """Split the largest micro-batches in two until their count is a multiple of ``world_size``."""
    step = list(step)
    while len(step) % world_size:
        i = max(range(len(step)), key=lambda j: len(step[j]))
        if len(step[i]) < 2:
            return None
        half = len(step[i]) // 2
        step[i:i + 1] = [step[i][:half], step[i][half:]]
    return step


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_parent(parent_pid: int, _worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the worker is killed as soon as the training process dies, even by
    ``kill -9`` (Linux parent-death signal; PyTorch's own watchdog would take up to 5 s, or hang while a
    worker flushes a full queue). If the parent is already gone, exit now."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(0)


def make_dataloader(dataset: CacheDataset, sampler: TokenBudgetBatchSampler, collator: Collator, *,
                    num_workers: int = 0, device: torch.device | str | None = None,
                    persistent_workers: bool = False, generator: torch.Generator | None = None) -> DataLoader:
    """DataLoader that takes its order from ``sampler`` and pins memory when the target device is CUDA.
    ``generator`` (optional) supplies the workers' base seed instead of the global torch RNG. Workers die
    with the process that made the loader (``exit_with_parent``)."""
    pin = device is not None and torch.device(device).type == "cuda"
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                      pin_memory=pin, persistent_workers=persistent_workers and num_workers > 0,
                      generator=generator,
                      worker_init_fn=partial(exit_with_parent, os.getpid()) if num_workers > 0 else None)
