"""What a training run reads: the teacher caches, opened and cross-checked (intact, a temperature served
exactly, samples for ``--kd sampled``, a validation set from the same teacher and tokenizer), the train /
validation split, and the student config fitted to the caches' vocabulary."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cache.reader import open_cache
from cache.util import UserError, json_hash
from student.data import CacheDataset, DecodedRecords
from student.modeling import CausalFNetConfig, ModelInputError, compact_ids_from_cache
from student.train_config import TrainConfig


class SequenceSubset(torch.utils.data.Dataset):
    """Some sequences of a cache (a train/validation split), with the index arrays the sampler reads."""

    def __init__(self, reader, indices: np.ndarray):
        self.reader = reader
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.reader[int(self.indices[i])]

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self.reader.lengths, dtype=np.int64)[self.indices]

    @property
    def num_supervised(self) -> np.ndarray:
        return np.asarray(self.reader.num_supervised, dtype=np.int64)[self.indices]


class MixedDataset(torch.utils.data.Dataset):
    """Sequences of several caches in one index space, each cache filling ``counts[i]`` slots.

    Cache i's slots run through one seeded permutation of its sequences, repeated as often as needed: a
    count above its size repeats every sequence (some once more than others), a count below leaves a fixed
    seeded subset out. The slot table is a pure function of (sizes, counts, seed)."""

    def __init__(self, parts: list, counts: list[int], seed: int):
        if len(parts) != len(counts) or any(c < 0 for c in counts):
            raise ValueError(f"one non-negative count per part, got {counts} for {len(parts)} parts")
        self.parts = parts
        part_of, index_in = [], []
        for i, (part, c) in enumerate(zip(parts, counts)):
            perm = np.random.default_rng([seed, 0x313C, i]).permutation(len(part))
            part_of.append(np.full(c, i, dtype=np.int64))
            index_in.append(perm[np.arange(c) % len(part)] if c else np.zeros(0, np.int64))
        self.part_of = np.concatenate(part_of)
        self.index_in = np.concatenate(index_in).astype(np.int64)

    def __len__(self) -> int:
        return len(self.part_of)

    def __getitem__(self, i: int):
        return self.parts[int(self.part_of[i])][int(self.index_in[i])]

    def _per_part(self, name: str) -> np.ndarray:
        cols = [np.asarray(getattr(p, name), dtype=np.int64) for p in self.parts]
        out = np.zeros(len(self), dtype=np.int64)
        for i, col in enumerate(cols):
            sel = self.part_of == i
            out[sel] = col[self.index_in[sel]]
        return out

    @property
    def lengths(self) -> np.ndarray:
        return self._per_part("lengths")

    @property
    def num_supervised(self) -> np.ndarray:
        return self._per_part("num_supervised")


def mixture_counts(sizes: list[int], weights: tuple[float, ...] | None) -> list[int]:
    """Sequences drawn from each cache per epoch: its size without weights, else its weight's share of
    all sizes together (rounded; at least one)."""
    if weights is None:
        return list(sizes)
    total = sum(sizes)
    return [max(1, round(total * w / sum(weights))) for w in weights]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) sequence indices, sorted; a pure function of ``(n, val_fraction, seed)``."""
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise UserError(f"--val-fraction {val_fraction} leaves no training sequences out of {n}; lower it")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@dataclass
class TrainData:
    reader: Any  # CacheReader of the (first) training cache
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    val_reader: Any  # CacheReader the validation sequences come from (None without validation)
    temp_index: int  # temperature column for the KD term
    val_t1_index: int | None  # T = 1 column of the validation cache (None: no KL metric)
    pad_id: int
    eos_id: int | None
    readers: list | None = None  # every training cache's reader (``reader`` first); None: just ``reader``
    mix: dict | None = None  # with several caches: their paths, sizes, counts per epoch and shares

    @property
    def train_readers(self) -> list:
        return self.readers or [self.reader]

    @property
    def fingerprint_digest(self) -> str:
        """The training data's identity for --resume: the cache's fingerprint digest, or for a mixture a hash
        of every cache's digest and its count per epoch."""
        if not self.mix:
            return self.reader.fingerprint_digest
        return json_hash([[r.fingerprint_digest for r in self.train_readers], self.mix["counts"]])

    @property
    def longest(self) -> int:
        """Tokens in the longest sequence of the training and validation caches."""
        val = np.max(self.val_reader.lengths) if self.val_reader is not None else 0
        return int(max(np.max(self.reader.lengths), val))


def tokenizer_info(reader) -> dict[str, Any]:
    return reader.manifest.get("tokenizer") or {}


def _check_same_vocabulary(train, val, flag: str = "--val-cache") -> None:
    """A validation (or mixed-in) cache must come from the same teacher and tokenizer as the training
    cache."""
    ta, tb = tokenizer_info(train), tokenizer_info(val)
    pairs = {
        "teacher vocab_size": (train.vocab_size, val.vocab_size),
        "tokenizer hash": (ta.get("hash"), tb.get("hash")),
        "tokenizer vocab_size": (ta.get("vocab_size"), tb.get("vocab_size")),
        "teacher": (train.fingerprint.get("teacher"), val.fingerprint.get("teacher")),
        "chat_template": (train.fingerprint.get("chat_template"), val.fingerprint.get("chat_template")),
    }
    if pairs["chat_template"][0] != pairs["chat_template"][1]:  # whole templates would fill the screen
        pairs["chat_template"] = tuple(json_hash(t)[:20] + "..." for t in pairs["chat_template"])
    diff = [f"{k}: {a!r} vs {b!r}" for k, (a, b) in pairs.items() if a != b]
    if diff:
        raise UserError(f"{flag} {val.path} was not made with the first --cache's teacher/tokenizer ("
                        + "; ".join(diff) + "); build it with the same teacher and tokenizer")


def _check_mixable(first, other) -> None:
    """Caches read in one batch must store the same rows: top-k, temperatures and samples."""
    a, b = first.settings, other.settings
    keys = ("topk", "temperatures", "samples", "top_p")
    diff = [f"{k} {getattr(a, k)!r} vs {getattr(b, k)!r}" for k in keys if getattr(a, k) != getattr(b, k)]
    if diff:
        raise UserError(f"--cache {other.path} cannot be mixed with --cache {first.path} (" + "; ".join(diff)
                        + "); write both with the same teacher-cache --topk, --temperatures, --samples and "
                        "--top-p")


def open_training_data(cfg: TrainConfig) -> TrainData:
    """Open and check the caches: intact (manifest, index, every shard and attachment hash, as ``cache
    verify`` checks them), a temperature the cache serves exactly, samples for ``--kd sampled``, a validation
    set from the same teacher/tokenizer."""
    readers = [open_cache(p, verify_hashes="all", verify_attachments=True) for p in cfg.caches]
    reader = readers[0]
    for p, r in zip(cfg.caches, readers):
        if len(r) == 0:
            raise UserError(f"the cache {p} holds no sequences; rebuild it with teacher-cache")
    for r in readers[1:]:
        _check_same_vocabulary(reader, r, flag="--cache")
        _check_mixable(reader, r)
    needs_kd = cfg.alpha < 1.0
    if needs_kd and cfg.kd == "sampled":
        if reader.samples <= 0:
            raise UserError(f"--kd sampled needs a cache written with samples, but {cfg.cache} has none; "
                            "rebuild it with teacher-cache --samples N or choose another --kd")
        temp_index = 0  # the sampled loss reads no temperature column
    elif needs_kd:
        if cfg.kd in ("topk_renorm", "reverse_kl") and reader.settings.top_p is not None:
            # Adaptive-k rows are padded to k with the row's top id: exact for topk_tail (the padding carries
            # no mass), but renormalising over the slots would count that id again.
            raise UserError(f"--kd {cfg.kd} cannot read the adaptive-k (--top-p) cache {cfg.cache}; "
                            "use --kd topk_tail or a cache written without --top-p")
        try:
            temp_index = reader.temperature_index(cfg.temperature)
        except UserError as e:
            raise UserError(f"--temperature {cfg.temperature:g} cannot be served exactly: {e}") from None
    else:
        temp_index = 0  # CE only
    val_reader, val = None, None
    budget = cfg.record_cache_mb << 20
    parts = [CacheDataset(DecodedRecords(r, budget)) for r in readers]
    if cfg.val_cache is not None:
        val_reader = open_cache(cfg.val_cache, verify_hashes="all", verify_attachments=True)
        _check_same_vocabulary(reader, val_reader)
        val = CacheDataset(DecodedRecords(val_reader, budget))
    elif cfg.val_fraction > 0:  # held out of the first cache
        tr, va = split_indices(len(reader), cfg.val_fraction, cfg.seed)
        kept = DecodedRecords(reader, budget)
        parts[0], val, val_reader = SequenceSubset(kept, tr), SequenceSubset(kept, va), reader
    mix = None
    if len(parts) > 1 or cfg.cache_weights is not None:
        sizes = [len(p) for p in parts]
        counts = mixture_counts(sizes, cfg.cache_weights)
        train = MixedDataset(parts, counts, cfg.seed)
        mix = {"caches": [str(p) for p in cfg.caches], "sizes": sizes, "counts": counts,
               "shares": [c / sum(counts) for c in counts]}
    else:
        train = parts[0]
    val_t1 = None
    if val_reader is not None:
        try:
            val_t1 = val_reader.temperature_index(1.0)
        except UserError:
            val_t1 = None
    tok = tokenizer_info(reader)
    eos = tok.get("eos_token_id")
    pad = tok.get("pad_token_id")
    pad = pad if pad is not None else (eos if eos is not None else 0)
    return TrainData(reader=reader, train=train, val=val, val_reader=val_reader, temp_index=temp_index,
                     val_t1_index=val_t1, pad_id=int(pad), eos_id=None if eos is None else int(eos),
                     readers=readers, mix=mix)


def cache_token_ids(data: TrainData) -> np.ndarray:
    """Sorted ids used in the training and validation caches plus eos/pad (the compact vocabulary)."""
    special = [i for i in (data.pad_id, data.eos_id) if i is not None]
    ids = compact_ids_from_cache(data.reader, special)
    for r in data.train_readers[1:]:
        ids = np.union1d(ids, compact_ids_from_cache(r, special))
    if data.val_reader is not None and data.val_reader is not data.reader:
        ids = np.union1d(ids, compact_ids_from_cache(data.val_reader, special))
    return ids.astype(np.int64)


def student_model_config(cfg: TrainConfig, data: TrainData) -> CausalFNetConfig:
    """The student's ``CausalFNetConfig`` for this cache, checked against the cache's vocabulary."""
    reader = data.reader
    if cfg.student_config is not None:
        try:
            d = json.loads(cfg.student_config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"--student-config {cfg.student_config} is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise UserError(f"--student-config {cfg.student_config} must hold a JSON object of config fields")
        for k in ("model_type", "architectures", "transformers_version", "auto_map", "dtype", "torch_dtype"):
            d.pop(k, None)
        d.setdefault("vocab_size", reader.vocab_size)
    else:
        d = dict(vocab_size=reader.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                 intermediate_size=cfg.ffn, stft_window_size=cfg.window,
                 max_position_embeddings=cfg.max_positions, hidden_dropout_prob=cfg.dropout)
    d.update(pad_token_id=data.pad_id, eos_token_id=data.eos_id)
    tok_ids = tokenizer_info(reader).get("vocab_size")  # len(tokenizer): ids past it are padded teacher rows
    if tok_ids is not None and int(tok_ids) < reader.vocab_size:
        d["num_tokenizer_ids"] = int(tok_ids)
    if cfg.compact_vocab:
        ids = cache_token_ids(data)
        d.update(vocab_size=len(ids), vocab_map=ids.tolist(), full_vocab_size=reader.vocab_size)
    try:
        mc = CausalFNetConfig(**d)
    except ModelInputError as e:  # the portable model files raise their own ValueError type
        where = "student options" if cfg.student_config is None else f"--student-config {cfg.student_config}"
        raise UserError(f"{where}: {e}") from None
    check_student_vocabulary(mc, data)
    if data.longest > mc.max_position_embeddings:
        raise UserError(f"the cache holds sequences of {data.longest} tokens but the student has "
                        f"max_position_embeddings={mc.max_position_embeddings}; raise --max-positions")
    return mc


def check_student_vocabulary(mc: CausalFNetConfig, data: TrainData) -> None:
    """A full-vocabulary student must have a row for every teacher logit; a compacted one for every id the
    caches use."""
    reader = data.reader
    tok_vocab = tokenizer_info(reader).get("vocab_size")
    if mc.vocab_map is None:
        if mc.vocab_size < reader.vocab_size:
            raise UserError(f"the student's vocab_size {mc.vocab_size} does not cover the cache's vocabulary "
                            f"(teacher logits width {reader.vocab_size}, tokenizer {tok_vocab} tokens); use "
                            f"vocab_size >= {reader.vocab_size} or --compact-vocab")
        return
    if tok_vocab is not None and mc.full_vocab_size < tok_vocab:
        raise UserError(f"the student's full_vocab_size {mc.full_vocab_size} is smaller than the cache's "
                        f"tokenizer ({tok_vocab} tokens); rebuild the student config with --compact-vocab")
    missing = np.setdiff1d(cache_token_ids(data), np.asarray(mc.vocab_map, dtype=np.int64))
    if len(missing):
        raise UserError(f"the student's vocab_map lacks {len(missing)} token ids the cache uses (e.g. "
                        f"{missing[:5].tolist()}); use --compact-vocab to build it from this cache")
