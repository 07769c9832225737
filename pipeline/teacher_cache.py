"""Stage one, start to finish: tokenize, split into units, run the teacher over the units this rank owns
(skipping committed ones), then rank 0 finalises the cache with the tokenizer attached.

Units are fixed-size ranges of the length-ordered sequence list, so they are the same for every run with
the same fingerprint whatever the batch size, device or number of ranks; a killed run resumes by rerunning
the same command. Under ``torchrun`` units go round-robin to ranks, each rank with its own writer/journal.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import torch

from cache.device import Dist, resolve_device
from cache.interrupt import Interrupted, StopSignals, command_line, signal_name
from cache.progress import Progress
from cache.schema import CacheRecord, CacheSettings
from cache.util import UserError
from cache.writer import CacheWriter
from pipeline.answers import extract_reference, parse_number, strict_answer
from pipeline.data import (
    DataConfig,
    TokenizedDataset,
    TokenizedSeq,
    load_tokenizer,
    special_ids,
    tokenize_examples,
    tokenizer_hash,
)
from pipeline.prompts import example_prompt_ids, stop_token_ids
from pipeline.rows import Example, dataset_hash, load_examples
from pipeline.teacher import (
    TargetSettings,
    Teacher,
    check_teacher_source,
    check_token_ids,
    load_teacher,
    teacher_targets,
    token_budget_batches,
)
from pipeline.write import (
    GENERATION_DIR,
    WriteSettings,
    Written,
    choose,
    generation_fingerprint,
    open_generation_dir,
    read_units,
    sample_solutions,
    unit_file,
    write_unit,
)

FORMATS = ("arrow", "zarr")
PROVENANCE_ROWS = "rows.jsonl"  # in the cache's provenance/ attachment: one line per cached sequence


@dataclass(frozen=True)
class TeacherCacheConfig:
    teacher: str
    dataset: str
    out: Path
    split: str = "train"
    dataset_config: str | None = None  # Hub config; None: 'main' for GSM8K, else the dataset's default
    data_format: str = "auto"  # row format (pipeline.data.DATA_FORMATS)
    fields: tuple[tuple[str, str], ...] = ()  # --field CANON=COLUMN mapping
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
    write: int = 0
    write_temperature: float = WriteSettings.temperature  # the writing defaults live in WriteSettings
    write_top_p: float = WriteSettings.top_p
    write_max_tokens: int = WriteSettings.max_new_tokens
    keep: str = WriteSettings.keep
    min_vote: float = WriteSettings.min_vote
    write_batch: int = 1024

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
        object.__setattr__(self, "fields", self.data_config().fields)  # parsed, identities dropped
        self.target_settings()
        if self.write < 0:
            raise UserError(f"--write must be 0 (score the given answers) or a number of solutions per "
                            f"question, got {self.write}")
        self.write_settings()
        if self.write_batch < 1:
            raise UserError(f"--write-batch must be a positive number of sequences, got {self.write_batch}")

    def write_settings(self) -> WriteSettings | None:
        """The teacher's writing settings (None without ``--write``)."""
        if not self.write:
            return None
        return WriteSettings(samples=self.write, temperature=self.write_temperature, top_p=self.write_top_p,
                             max_new_tokens=self.write_max_tokens, keep=self.keep, min_vote=self.min_vote,
                             seed=self.seed)

    def data_config(self) -> DataConfig:
        return DataConfig(dataset=self.dataset, split=self.split, config_name=self.dataset_config,
                          limit=self.limit, max_length=self.max_length, overflow=self.overflow,
                          data_format=self.data_format, fields=self.fields)

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
                      input_hash: str, row_format: str = "qa") -> dict[str, Any]:
    """Everything that determines the cache content; not the device, batch size, rank count or paths.
    ``input_hash`` is the input rows' ``dataset_hash``; with ``--write`` the cached text follows from it and
    the writing settings (``write``). ``row_format`` is the rows' format as read (detected or given); it and
    the ``--field`` mapping are recorded unless they are the defaults (qa rows, no mapping), so the
    fingerprints of such caches stay what they were."""
    w = cfg.write_settings()
    dataset: dict[str, Any] = {"hash": input_hash, "split": cfg.split, "limit": cfg.limit}
    if row_format != "qa":
        dataset["format"] = row_format
    if cfg.fields:
        dataset["fields"] = dict(cfg.fields)
    fp = {
        "teacher": teacher.identity,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "dataset": dataset,
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
    if w is not None:  # absent without --write, so caches of given answers keep their fingerprint
        fp["write"] = w.to_json()
    return fp


def row_reference(ex: Example) -> Decimal | None:
    """The reference answer of a row: its ``reference`` field (a number, or a whole GSM8K answer ending in
    '#### N'), else its ``answer`` when that is the dataset's own GSM8K answer (not one written by another
    model); None when it has neither."""
    text = ex.reference if ex.reference is not None else (ex.answer if ex.written_by is None else None)
    if text is None:
        return None
    if "####" in text:
        return extract_reference(text)
    return parse_number(text) if ex.reference is not None else None


def given_provenance(examples: list[Example]) -> list[dict[str, Any]]:
    """Provenance of rows whose answers are given: the dataset's reference answers, or answers someone
    else wrote (``written_by``), scored against their ``reference`` when the row has one."""
    out = []
    for ex in examples:
        if ex.written_by is None:
            out.append({"source": "reference", "row": ex.row})
            continue
        ans = strict_answer(ex.answer or "")
        ref = row_reference(ex)
        out.append({"source": "file", "row": ex.row, "written_by": ex.written_by,
                    "answer": None if ans is None else str(ans),
                    "correct": None if ref is None else bool(ans is not None and ans == ref)})
    return out


def file_summary(prov: list[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [p for p in prov if p["source"] == "file"]
    if not scored:
        return None
    judged = [p["correct"] for p in scored if p["correct"] is not None]
    return {"rows": len(scored), "writers": sorted({p["written_by"] for p in scored}),
            "with_reference": len(judged), "correct": sum(judged),
            "accuracy": sum(judged) / len(judged) if judged else None}


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
    manifest totals). SIGINT/SIGTERM stop it at once with ``Interrupted``, whose line says how many units
    are committed (and kept) and the command that goes on from them; a second signal exits at once."""
    dist = Dist.from_env()
    counts: dict[str, int] = {}  # filled as they become known: examples, units, done (committed units)
    stop = StopSignals(lambda signum: interrupted_line(cfg, signum, counts, second=True) if dist.rank == 0
                       else "", distributed=dist.distributed)
    try:
        with stop:
            return _run_teacher_cache(cfg, dist, counts)
    except Interrupted as e:
        raise Interrupted(e.signum, interrupted_line(cfg, e.signum, counts)) from None


def interrupted_line(cfg: TeacherCacheConfig, signum: int, counts: dict[str, int],
                     second: bool = False) -> str:
    """The one line for a SIGINT/SIGTERM: what is kept and the command that continues from it."""
    rerun = command_line("teacher-cache")
    rerun = (f"rerun the same command to go on from there: {rerun}" if rerun is not None else
             "run it again with the same TeacherCacheConfig to go on from there")
    head = (f"teacher-cache: second {signal_name(signum)}, stopped at once" if second else
            f"teacher-cache: stopped by {signal_name(signum)}")
    if "units" in counts and "done" in counts:
        kept = f"{counts['done']} of {counts['units']} units are committed in {cfg.out} and kept"
    elif cfg.write and "examples" in counts:
        folder = cfg.out / GENERATION_DIR
        units = math.ceil(counts["examples"] / cfg.unit_size)
        written = sum(unit_file(folder, u).exists() for u in range(units))
        kept = f"{written} of {units} units of teacher-written solutions are kept in {folder}"
    else:
        kept = f"units committed in {cfg.out} are kept"
    return f"{head}; {kept}; {rerun}"


def _run_teacher_cache(cfg: TeacherCacheConfig, dist: Dist, counts: dict[str, int]) -> dict[str, Any]:
    t0 = time.time()
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
        dc = cfg.data_config()
        examples = load_examples(dc.dataset, dc.split, config_name=dc.config_name, limit=dc.limit,
                                 require_answer=not cfg.write, data_format=dc.data_format, fields=dc.fields)
        counts["examples"] = len(examples)
        data = None
        if not cfg.write:  # a row that cannot be cached fails before the teacher loads
            data = tokenize_examples(tokenizer, examples, max_length=cfg.max_length, overflow=cfg.overflow)
            check_lengths(data, cfg)
        teacher = load_teacher(cfg.teacher, device=str(device), dtype=cfg.dtype)
        settings = cfg.target_settings()
        settings.check_vocab(teacher.vocab_size)
        fingerprint = build_fingerprint(cfg, teacher, tokenizer, dataset_hash(examples), examples[0].kind)
        cache_settings = cfg.cache_settings(teacher.vocab_size)
        writer = CacheWriter(cfg.out, fingerprint, cache_settings, rank=dist.rank, world_size=dist.world_size)
        written_summary = None
        if cfg.write:
            scored, prov, written_summary = write_solutions(cfg, teacher, tokenizer, examples, dist)
            data = tokenize_examples(tokenizer, scored, max_length=cfg.max_length, overflow=cfg.overflow)
            check_lengths(data, cfg)
        else:
            prov = given_provenance(examples)
        check_token_ids(len(tokenizer), max(int(s.input_ids.max()) for s in data.seqs), teacher.vocab_size)
        units = unit_ranges(len(data.seqs), cfg.unit_size)
        done = writer.done_units()
        counts.update(units=len(units), done=len(done))
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
            counts["done"] += 1
        bar.close()
        compute_s = time.time() - t_compute
        summary: dict[str, Any] = {
            "rank": dist.rank, "world_size": dist.world_size, "units_total": len(units),
            "units_written": len(todo), "units_skipped": len(done),
            "tokens_computed": total_tokens, "compute_seconds": round(compute_s, 3),
            "tokens_per_second": round(total_tokens / compute_s, 1) if total_tokens and compute_s else None,
            "dropped": data.dropped, "truncated": data.truncated,
            "written": written_summary, "scored_from_file": file_summary(prov),
        }
        dist.barrier()
        if dist.rank == 0:
            rows = [{"seq_id": s.seq_id, **prov[s.row]} for s in data.seqs]
            summary.update(_finalize(writer, tokenizer, eos_id, pad_id, len(units), data, summary, t0, rows))
        dist.barrier()
        return summary
    except Interrupted:
        if writer is not None and "units" in counts:  # every rank's committed units, from the journals
            counts["done"] = len(writer.done_units())
        raise
    finally:
        if writer is not None:
            writer.close()
        if dist.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def check_lengths(data: TokenizedDataset, cfg: TeacherCacheConfig) -> None:
    """Every row too long (one line), a --batch-tokens below the longest sequence, and a notice for
    dropped or truncated rows."""
    if not data.seqs:
        raise UserError(f"all {data.dropped} rows are longer than --max-length {cfg.max_length}; raise "
                        "--max-length or use --overflow truncate")
    longest = len(data.seqs[0])
    if cfg.batch_tokens < longest:
        raise UserError(f"--batch-tokens {cfg.batch_tokens} is smaller than the longest sequence ({longest} "
                        f"tokens); pass at least --batch-tokens {longest}")
    if data.dropped or data.truncated:
        total = len(data.seqs) + data.dropped
        what = (f"{data.dropped} of {total} rows are longer than --max-length {cfg.max_length} and are left "
                "out" if data.dropped else
                f"{data.truncated} of {total} rows are cut at --max-length {cfg.max_length}")
        print(f"note: {what}; raise --max-length to keep them whole", file=sys.stderr, flush=True)


def write_solutions(cfg: TeacherCacheConfig, teacher: Teacher, tokenizer: Any, examples: list[Example],
                    dist: Dist) -> tuple[list[Example], list[dict[str, Any]], dict[str, Any]]:
    """The teacher writes ``cfg.write`` solutions per question (units of questions, round-robin over the
    ranks, each unit kept in ``<out>/generation/`` once written), then every rank reads them all and keeps
    the same ones. Returns (kept solutions as examples, their provenance, the totals)."""
    ws = cfg.write_settings()
    gfp = generation_fingerprint(writer_identity(teacher), tokenizer_hash(tokenizer),
                                 dataset_hash([e.without_answer() for e in examples]), ws, cfg.unit_size)
    folder = open_generation_dir(cfg.out, gfp) if dist.rank == 0 else None
    dist.barrier()
    folder = folder or open_generation_dir(cfg.out, gfp)
    units = unit_ranges(len(examples), cfg.unit_size)
    todo = [u for u in units_for_rank(len(units), dist.rank, dist.world_size)
            if not unit_file(folder, u).exists()]
    stop_ids = stop_token_ids(tokenizer, teacher.model)
    pad_id = int(tokenizer.pad_token_id)
    prompts = {}
    limit = getattr(teacher.model.config, "max_position_embeddings", None)
    for u in todo:
        for q in units[u]:
            prompts[q] = example_prompt_ids(tokenizer, examples[q])
            if limit is not None and len(prompts[q]) + ws.max_new_tokens > limit:
                where = examples[q].where or f"row {q + 1}"
                raise UserError(f"{where}: a {len(prompts[q])}-token prompt plus --write-max-tokens "
                                f"{ws.max_new_tokens} exceeds the teacher's {limit} positions; lower "
                                "--write-max-tokens")
    per_batch = max(1, cfg.write_batch // ws.samples)
    bar = Progress(sum(len(units[u]) for u in todo), desc="write", unit="q",
                   enabled=cfg.progress and dist.rank == 0)
    for u in todo:
        qs = sorted(units[u], key=lambda q: (-len(prompts[q]), q))  # similar lengths share a batch
        written: list[Written] = []
        for lo in range(0, len(qs), per_batch):
            batch = qs[lo: lo + per_batch]
            out = sample_solutions(teacher.model, [prompts[q] for q in batch], batch, ws, stop_ids=stop_ids,
                                   pad_id=pad_id)
            new_tokens = 0
            for q, samples in zip(batch, out):
                for s, (ids, stopped) in enumerate(samples):
                    written.append(Written(q, s, tokenizer.decode(ids, skip_special_tokens=True), len(ids),
                                           stopped))
                    new_tokens += len(ids) + int(stopped)
            bar.update(len(batch), tokens=new_tokens)
        written.sort(key=lambda w: (w.question, w.sample))
        write_unit(folder, u, written)
    bar.close()
    dist.barrier()
    all_written = read_units(folder, len(units))
    kept, prov, totals = choose(all_written, {ex.row: row_reference(ex) for ex in examples}, ws)
    scored = [examples[w.question].answered(i, w.text) for i, w in enumerate(kept)]
    totals["new_tokens"] = sum(w.tokens for w in all_written)
    if not scored:
        raise UserError(f"the teacher wrote {totals['samples']} solutions and none was kept (--keep "
                        f"{ws.keep}, --min-vote {ws.min_vote}); lower --min-vote, raise --write or use "
                        "--keep all")
    return scored, prov, totals


def writer_identity(teacher: Teacher) -> dict[str, Any]:
    return {**teacher.identity, "dtype": str(teacher.dtype).removeprefix("torch.")}


def _finalize(writer: CacheWriter, tokenizer: Any, eos_id: int, pad_id: int, num_units: int,
              data: TokenizedDataset, summary: dict[str, Any], t0: float,
              rows: list[dict[str, Any]]) -> dict[str, Any]:
    stats = {"dropped": data.dropped, "truncated": data.truncated,
             "wall_seconds_last_run": round(time.time() - t0, 3),
             "tokens_per_second_last_run": summary["tokens_per_second"]}
    sources = dict(Counter(r["source"] for r in rows))
    stats["sources"] = sources
    if summary.get("written") is not None:
        stats["written"] = summary["written"]
    if summary.get("scored_from_file") is not None:
        stats["scored_from_file"] = summary["scored_from_file"]
    tok_info = {"vocab_size": len(tokenizer), "eos_token_id": eos_id, "pad_token_id": pad_id,
                "hash": writer.fingerprint["tokenizer_hash"]}
    with tempfile.TemporaryDirectory(prefix="fnet-tokenizer-") as tmp, \
            tempfile.TemporaryDirectory(prefix="fnet-provenance-") as ptmp:
        tokenizer.save_pretrained(tmp)
        ordered = sorted(rows, key=lambda r: r["seq_id"])
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered)
        Path(ptmp, PROVENANCE_ROWS).write_text(body, encoding="utf-8")
        manifest = writer.finalize(num_units, attachments={"tokenizer": tmp, "provenance": ptmp}, stats=stats,
                                   tokenizer=tok_info)
    return {
        "out": str(writer.path), "sequences": manifest["num_sequences"], "tokens": manifest["num_tokens"],
        "supervised_tokens": manifest["num_supervised"], "shards": len(manifest["shards"]),
        "bytes": manifest["stats"]["shard_bytes"], "bytes_per_token": manifest["stats"]["bytes_per_token"],
        "bytes_per_supervised_token": manifest["stats"]["bytes_per_supervised_token"],
        "wall_seconds": round(time.time() - t0, 3), "sources": sources,
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
    lines += written_lines(s.get("written"), s.get("scored_from_file"))
    return "\n".join(lines)


def written_lines(w: dict[str, Any] | None, f: dict[str, Any] | None) -> list[str]:
    """Summary lines for teacher-written solutions and for answers scored from a file."""
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    lines = []
    if w is not None:
        lines.append(f"  written: {w['samples']:,} solutions to {w['questions']:,} questions "
                     f"({w['new_tokens']:,} tokens), {w['stopped']:,} stopped, {w['with_answer']:,} with a "
                     f"'#### N' answer; kept {w['kept']:,} ({pct(w['keep_rate'])}) covering "
                     f"{w['questions_kept']:,} questions, {w['duplicates']:,} duplicates dropped, "
                     f"{w['ties']:,} tied votes")
        lines.append(f"  teacher accuracy on its samples {pct(w['teacher_accuracy'])}, majority answer "
                     f"accuracy {pct(w['majority_accuracy'])} (where the rows have references), mean "
                     f"majority vote share {pct(w['mean_vote_share'])}")
    if f is not None:
        lines.append(f"  scored from file: {f['rows']:,} answers by {', '.join(f['writers'])}; correct "
                     f"{f['correct']:,}/{f['with_reference']:,} ({pct(f['accuracy'])})")
    return lines
