"""``fnet-distill cache info DIR`` and ``fnet-distill cache verify DIR``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer


def _bytes_on_disk(path: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def cache_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The numbers ``cache info`` prints (reads the manifest and index only, no records)."""
    from cache.reader import open_cache

    r = open_cache(path, verify_hashes="none")
    m = r.manifest
    shard_bytes = sum(s["bytes"] for s in m["shards"])
    n_sup = int(m["num_supervised"])
    return {
        "path": str(Path(path)),
        "format": m["format"],
        "format_version": m["format_version"],
        "code_version": m.get("code_version"),
        "sequences": int(m["num_sequences"]),
        "supervised_tokens": n_sup,
        "total_tokens": int(m["num_tokens"]),
        "shards": len(m["shards"]),
        "shard_bytes": shard_bytes,
        "bytes_on_disk": _bytes_on_disk(Path(path)),
        "bytes_per_supervised_token": shard_bytes / n_sup if n_sup else None,
        "topk": r.topk,
        "samples": r.samples,
        "temperatures": list(r.temperatures),
        "logprob_dtype": m.get("logprob_dtype"),
        "encoding": m.get("encoding"),
        "top_p": m.get("top_p"),
        "fidelity": (m.get("stats") or {}).get("fidelity"),
        "vocab_size": r.vocab_size,
        "teacher": r.fingerprint.get("teacher"),
        "fingerprint_digest": r.fingerprint_digest,
        "tokenizer_dir": str(r.tokenizer_dir) if r.tokenizer_dir else None,
        "sources": (m.get("stats") or {}).get("sources"),
        "written": (m.get("stats") or {}).get("written"),
        "write_settings": r.fingerprint.get("write"),
        "scored_from_file": (m.get("stats") or {}).get("scored_from_file"),
    }


def _sources_line(s: dict[str, Any]) -> str:
    names = {"reference": "reference answers", "teacher": "teacher-written", "file": "scored from a file"}
    src = s.get("sources")
    if not src:
        return "reference answers (a cache written before provenance was recorded)"
    return ", ".join(f"{n:,} {names.get(k, k)}" for k, n in src.items())


def _encoding_line(s: dict[str, Any]) -> str:
    """``compact, adaptive top-p 0.9 (mean 5.1 ids kept), decoded KL mean/max at T=1: ..., T=2: ...``."""
    out = str(s.get("encoding"))
    fid = s.get("fidelity")
    if s.get("top_p") is not None:
        out += f", adaptive top-p {s['top_p']:g}"
        if fid:
            out += f" (mean {fid['mean_kept_ids']:.1f} ids kept)"
    if fid:
        per_t = zip(fid["temperatures"], fid["mean_kl"], fid["max_kl"])
        out += ", decoded KL mean/max " + ", ".join(f"T={t:g}: {a:.1e}/{b:.1e}" for t, a, b in per_t)
    return out


def _teacher_line(t: Any) -> str:
    """The fingerprint's teacher identity for people: ``Qwen/Qwen2-0.5B-Instruct (Hugging Face Hub, revision
    …)`` or ``local model folder (hash of config.json and weights xxh3_128:…)``."""
    if not isinstance(t, dict):
        return str(t)
    if t.get("kind") == "hub":
        rev = t.get("revision")
        return f"{t.get('id')} (Hugging Face Hub" + (f", revision {rev}" if rev else "") + ")"
    if t.get("kind") == "local":
        return f"local model folder (hash of config.json and weights {t.get('hash')})"
    return ", ".join(f"{k} {v}" for k, v in t.items())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def register(app: typer.Typer) -> None:
    @app.command(
        "info",
        help="Summarise a finished teacher cache: sequences, supervised and total tokens, shards, bytes on "
             "disk and per supervised token, top-k, encoding (with the compact encoding's decoded KL to the "
             "exact teacher rows, mean and max per temperature, measured when it was written), samples, "
             "temperatures, teacher and fingerprint digest; where its rows came from (reference answers, "
             "teacher-written, scored from a file) and, for teacher-written rows, the writing settings, "
             "how many were written and kept, the teacher's accuracy and its vote agreement. "
             "Reads only the manifest and the index (no shard is opened or hashed).",
    )
    def info(
        path: Path = typer.Argument(..., help="Cache folder written by `fnet-distill teacher-cache --out`."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    ) -> None:
        s = cache_summary(path)
        if as_json:
            typer.echo(json.dumps(s, indent=2))
            return
        bps = s["bytes_per_supervised_token"]
        rows = [
            ("cache", f"{s['path']} ({s['format']}, format v{s['format_version']}, "
                      f"code {s['code_version']})"),
            ("teacher", _teacher_line(s["teacher"])),
            ("sequences", f"{s['sequences']:,}"),
            ("supervised tokens", f"{s['supervised_tokens']:,}"),
            ("total tokens", f"{s['total_tokens']:,}"),
            ("shards", f"{s['shards']:,}"),
            ("bytes on disk", f"{_human(s['bytes_on_disk'])} (shards {_human(s['shard_bytes'])})"),
            ("bytes/supervised token", f"{bps:.1f}" if bps is not None else "n/a"),
            ("top-k", f"{s['topk']} ({s['logprob_dtype']} log-probs, teacher vocab {s['vocab_size']:,})"),
            ("encoding", _encoding_line(s)),
            ("samples", str(s["samples"])),
            ("temperatures", ", ".join(f"{t:g}" for t in s["temperatures"])),
            ("fingerprint", s["fingerprint_digest"]),
            ("tokenizer", s["tokenizer_dir"] or "none"),
            ("rows", _sources_line(s)),
        ]
        w = s.get("write_settings")
        if w is not None:
            vote = f" (min vote {w['min_vote']:g})" if w["keep"] in ("auto", "majority") else ""
            rows.append(("writing", f"{w['samples']} samples per question at T {w['temperature']:g}, "
                                    f"top-p {w['top_p']:g}, <= {w['max_new_tokens']} tokens, seed "
                                    f"{w['seed']}; kept by {w['keep']}{vote}"))
        if s.get("written") or s.get("scored_from_file"):
            from pipeline.teacher_cache import written_lines  # loads torch: only for caches that need it

            for line in written_lines(s.get("written"), s.get("scored_from_file")):
                key, _, rest = line.strip().partition(": ")
                rows.append((key if rest else "", rest or line.strip()))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            typer.echo(f"{k:<{width}}  {v}")

    @app.command(
        "verify",
        help="Check a finished teacher cache end to end: the content hash of every shard and attachment "
             "against the manifest, then every record (shapes, loss_mask vs. rows, token ids within the "
             "vocabulary, top-k log-probs finite, <= 0 and sorted, tail mass in [0, 1], finite shifts, "
             "sample counts summing to the number of draws). Prints each defect and exits 1 if there is "
             "any, else one line starting with OK.",
    )
    def verify(
        path: Path = typer.Argument(..., help="Cache folder written by `fnet-distill teacher-cache --out`."),
    ) -> None:
        from cache.verify import verify_cache

        defects = verify_cache(path)
        if defects:
            for d in defects:
                typer.echo(d)
            typer.echo(f"{len(defects)} defect(s) in {path}", err=True)
            raise typer.Exit(1)
        m = json.loads((Path(path) / "manifest.json").read_text())
        typer.echo(f"OK {path}: {m['num_sequences']} sequences, {m['num_supervised']} supervised tokens, "
                   f"{len(m['shards'])} shards verified")
