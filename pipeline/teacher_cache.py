"""Stage one, start to finish: tokenize, split into units, run the teacher over the units this rank owns
(skipping committed ones), then rank 0 finalises the cache with the tokenizer attached.

Units are fixed-size ranges of the length-ordered sequence list, so they are the same for every run with
the same fingerprint whatever the batch size, device or number of ranks; a killed run resumes by rerunning
the same command. Under ``torchrun`` units go round-robin to ranks, each rank with its own writer/journal.
"""

from __future__ import annotations

import datetime
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cache.format import CacheRecord, CacheSettings, CacheWriter
from cache.util import UserError
from pipeline.data import (
    DataConfig,
    TokenizedDataset,
    TokenizedSeq,
    load_tokenized,
    load_tokenizer,
    special_ids,
    tokenizer_hash,
)
from pipeline.teacher import (
    TargetSettings,
    Teacher,
    check_teacher_source,
    check_token_ids,
    load_teacher,
    teacher_targets,
    token_budget_batches,
)
from student.device import Dist, resolve_device
from student.progress import Progress

FORMATS = ("arrow", "zarr")


@dataclass(frozen=True)
class TeacherCacheConfig:
    teacher: str
    dataset: str
    out: Path
    split: str = "train"
    dataset_config: str = "main"
    tokenizer: str | None = None
    topk: int = 64
    samples: int = 0
    temperatures: tuple[float, ...] = (1.0, 2.0)
    max_length: int = 512
    overflow: str = "drop"
    batch_tokens: int = 16384
    limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    logprob_dtype: str = "float16"
    format: str = "arrow"
    encoding: str = "compact"
    top_p: float | None = None
    lp_step: float = 1.0 / 16
    unit_size: int = 256
    seed: int = 0
    chunk_positions: int = 128
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
        if self.batch_tokens <= 0:
            raise UserError(f"--batch-tokens must be a positive number of tokens, got {self.batch_tokens}")
        if self.unit_size <= 0:
            raise UserError(f"--unit-size must be a positive number of sequences, got {self.unit_size}")
        if self.format not in FORMATS:
            raise UserError(f"--format must be one of {'|'.join(FORMATS)}, got {self.format!r}")
        self.cache_settings(self.topk)  # one-line errors for --encoding, --top-p and --lp-step
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} exists and is not a folder; pass a folder path")
        self.data_config()
        self.target_settings()

    def data_config(self) -> DataConfig:
        return DataConfig(dataset=self.dataset, split=self.split, config_name=self.dataset_config,
                          limit=self.limit, max_length=self.max_length, overflow=self.overflow)

    def target_settings(self) -> TargetSettings:
        # the compact encoder quantises float32 log-probs itself; the exact encoding stores --logprob-dtype
        lp_dtype = "float32" if self.encoding == "compact" else self.logprob_dtype
        return TargetSettings(topk=self.topk, temperatures=self.temperatures, samples=self.samples,
                              seed=self.seed, logprob_dtype=lp_dtype, chunk_positions=self.chunk_positions)

    def cache_settings(self, vocab_size: int) -> CacheSettings:
        try:
            return CacheSettings(topk=self.topk, vocab_size=vocab_size, samples=self.samples,
                                 temperatures=self.temperatures, dtype=self.logprob_dtype, format=self.format,
                                 encoding=self.encoding, top_p=self.top_p, lp_step=self.lp_step)
        except UserError as e:
            msg = str(e)
            for name in ("encoding", "top_p", "lp_step"):
                msg = msg.replace(f"{name} must", f"--{name.replace('_', '-')} must")
            raise UserError(msg) from None


def unit_ranges(num_seqs: int, unit_size: int) -> list[range]:
    return [range(lo, min(lo + unit_size, num_seqs)) for lo in range(0, num_seqs, unit_size)]


def units_for_rank(num_units: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, num_units, world_size))


def build_fingerprint(cfg: TeacherCacheConfig, teacher: Teacher, tokenizer: Any,
                      data: TokenizedDataset) -> dict[str, Any]:
    """Everything that determines the cache content; not the device, batch size, rank count or paths."""
    return {
        "teacher": teacher.identity,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "dataset": {"hash": data.dataset_hash, "split": cfg.split, "limit": cfg.limit},
        "chat_template": tokenizer.chat_template,
        "max_length": cfg.max_length,
        "overflow": cfg.overflow,
        "topk": cfg.topk,
        "samples": cfg.samples,
        "temperatures": list(cfg.temperatures),
        "dtypes": {"teacher_compute": str(teacher.dtype).removeprefix("torch."),
                   "logprobs": cfg.target_settings().logprob_dtype},
        "encoding": {"name": cfg.encoding, "top_p": cfg.top_p,
                     "lp_step": cfg.lp_step if cfg.encoding == "compact" else None},
        "seed": cfg.seed,
        "unit_size": cfg.unit_size,
    }


def unit_records(teacher: Teacher, seqs: list[TokenizedSeq], settings: TargetSettings, pad_id: int,
                 batch_tokens: int, on_batch: Any = None) -> list[CacheRecord]:
    records = []
    for batch in token_budget_batches([len(s) for s in seqs], batch_tokens):
        chunk = [seqs[i] for i in batch]
        for s, t in zip(chunk, teacher_targets(teacher, chunk, settings, pad_id)):
            records.append(CacheRecord(
                seq_id=s.seq_id, input_ids=s.input_ids, loss_mask=s.loss_mask,
                assistant_start=s.assistant_start,
                topk_ids=t.topk_ids, topk_logprobs=t.topk_logprobs, topk_shift=t.topk_shift,
                tail_mass=t.tail_mass, sample_offsets=t.sample_offsets, sample_ids=t.sample_ids,
                sample_counts=t.sample_counts,
            ))
        if on_batch is not None:
            on_batch(chunk)
    return records


def run_teacher_cache(cfg: TeacherCacheConfig) -> dict[str, Any]:
    """Build (or resume) the cache in ``cfg.out``; returns the closing summary (rank 0's includes the
    manifest totals)."""
    t0 = time.time()
    dist = Dist.from_env()
    if dist.distributed and not torch.distributed.is_initialized():
        use_nccl = torch.cuda.is_available() and cfg.device != "cpu"
        if use_nccl:
            torch.cuda.set_device(dist.local_rank)
        torch.distributed.init_process_group("nccl" if use_nccl else "gloo",
                                             timeout=datetime.timedelta(hours=6))
    writer = None
    try:
        device = resolve_device(cfg.device, dist)  # a bad --device fails before any loading
        check_teacher_source(cfg.teacher)
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.teacher,
                                   flag="--tokenizer" if cfg.tokenizer else "--teacher")
        eos_id, pad_id = special_ids(tokenizer)
        data = load_tokenized(tokenizer, cfg.data_config())
        if not data.seqs:
            raise UserError(f"all {data.dropped} rows are longer than --max-length {cfg.max_length}; raise "
                            "--max-length or use --overflow truncate")
        teacher = load_teacher(cfg.teacher, device=str(device), dtype=cfg.dtype)
        check_token_ids(len(tokenizer), max(int(s.input_ids.max()) for s in data.seqs), teacher.vocab_size)
        settings = cfg.target_settings()
        settings.check_vocab(teacher.vocab_size)
        fingerprint = build_fingerprint(cfg, teacher, tokenizer, data)
        cache_settings = cfg.cache_settings(teacher.vocab_size)
        writer = CacheWriter(cfg.out, fingerprint, cache_settings, rank=dist.rank, world_size=dist.world_size)
        units = unit_ranges(len(data.seqs), cfg.unit_size)
        done = writer.done_units()
        todo = [u for u in units_for_rank(len(units), dist.rank, dist.world_size) if u not in done]
        todo_seqs = [[data.seqs[i] for i in units[u]] for u in todo]
        total_tokens = sum(len(s) for seqs in todo_seqs for s in seqs)
        total_seqs = sum(len(seqs) for seqs in todo_seqs)
        bar = Progress(total_seqs, desc="teacher", unit="seq", enabled=cfg.progress and dist.rank == 0)

        def advance(chunk: list[TokenizedSeq]) -> None:
            bar.update(len(chunk), tokens=sum(len(s) for s in chunk))

        t_compute = time.time()
        for u, seqs in zip(todo, todo_seqs):
            writer.write_unit(u, unit_records(teacher, seqs, settings, pad_id, cfg.batch_tokens, advance))
        bar.close()
        compute_s = time.time() - t_compute
        summary: dict[str, Any] = {
            "rank": dist.rank, "world_size": dist.world_size, "units_total": len(units),
            "units_written": len(todo), "units_skipped": len(done),
            "tokens_computed": total_tokens, "compute_seconds": round(compute_s, 3),
            "tokens_per_second": round(total_tokens / compute_s, 1) if total_tokens and compute_s else None,
            "dropped": data.dropped, "truncated": data.truncated,
        }
        dist.barrier()
        if dist.rank == 0:
            summary.update(_finalize(writer, tokenizer, eos_id, pad_id, len(units), data, summary, t0))
        dist.barrier()
        return summary
    finally:
        if writer is not None:
            writer.close()
        if dist.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _finalize(writer: CacheWriter, tokenizer: Any, eos_id: int, pad_id: int, num_units: int,
              data: TokenizedDataset, summary: dict[str, Any], t0: float) -> dict[str, Any]:
    stats = {"dropped": data.dropped, "truncated": data.truncated,
             "wall_seconds_last_run": round(time.time() - t0, 3),
             "tokens_per_second_last_run": summary["tokens_per_second"]}
    tok_info = {"vocab_size": len(tokenizer), "eos_token_id": eos_id, "pad_token_id": pad_id,
                "hash": writer.fingerprint["tokenizer_hash"]}
    with tempfile.TemporaryDirectory(prefix="fnet-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        manifest = writer.finalize(num_units, attachments={"tokenizer": tmp}, stats=stats, tokenizer=tok_info)
    return {
        "out": str(writer.path), "sequences": manifest["num_sequences"], "tokens": manifest["num_tokens"],
        "supervised_tokens": manifest["num_supervised"], "shards": len(manifest["shards"]),
        "bytes": manifest["stats"]["shard_bytes"], "bytes_per_token": manifest["stats"]["bytes_per_token"],
        "bytes_per_supervised_token": manifest["stats"]["bytes_per_supervised_token"],
        "wall_seconds": round(time.time() - t0, 3),
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"teacher cache written to {s['out']}",
             f"  sequences {s['sequences']:,}  tokens {s['tokens']:,}  "
             f"supervised tokens {s['supervised_tokens']:,}",
             f"  shards {s['shards']} ({s['units_written']} written now, {s['units_skipped']} resumed)  "
             f"bytes {s['bytes']:,}  bytes/token {s['bytes_per_token']:.1f}  "
             f"bytes/supervised token {s['bytes_per_supervised_token']:.1f}",
             f"  dropped {s['dropped']}  truncated {s['truncated']}  wall time {s['wall_seconds']:.1f}s"
             + (f"  ({s['tokens_per_second']:,.0f} tok/s on rank 0)" if s.get("tokens_per_second") else "")]
    return "\n".join(lines)
