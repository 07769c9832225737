"""``README.md`` of a saved student folder: the model card a user (or the Hub) reads first.

``render_model_card`` builds it from what the folder and its run already record: ``config.json``,
``train_config.json`` and ``provenance.json`` in the folder, the teacher cache's ``manifest.json`` (teacher,
data, fingerprint) and the run's ``metrics.jsonl`` (the last validation). Every field is optional, so a folder
written by hand (``save_pretrained`` only) still gets a card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cache.util import atomic_write_bytes
from student.any_student import render_card
from student.configuration_causal_fnet import CausalFNetConfig
from student.modeling_causal_fnet import CausalFNetForCausalLM

CARD = "README.md"


def _read_json(path: Path | None) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}


def last_eval(metrics_file: Path | None) -> dict[str, Any]:
    """The last ``"event": "eval"`` record of a ``metrics.jsonl`` ({} when there is none)."""
    last: dict[str, Any] = {}
    try:
        lines = metrics_file.read_text().splitlines() if metrics_file is not None else []
    except OSError:
        return last
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "eval":
            last = rec
    return last


def parameter_count(config: CausalFNetConfig) -> int:
    """Unique parameters of the student this config describes (tied weights once), without allocating it."""
    with torch.device("meta"):
        model = CausalFNetForCausalLM(config)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _fmt(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items() if x is not None)
    return str(v)


HASH_DIGITS = 16  # of a 128-bit content hash: enough to tell two models or datasets apart by eye


def short_hash(h: str) -> str:
    """``xxh3_128:809a4ec9...`` -> its first ``HASH_DIGITS`` hex digits."""
    return str(h).rpartition(":")[2][:HASH_DIGITS]


def teacher_text(teacher: Any) -> str | None:
    """The teacher as a reader wants it: a Hub id (and revision) or a local model's content hash."""
    if not isinstance(teacher, dict):
        return None if teacher is None else str(teacher)
    if teacher.get("id"):
        rev = teacher.get("revision")
        return teacher["id"] + (f" (revision {str(rev)[:12]})" if rev else "")
    if teacher.get("hash"):
        return f"a local model (content hash {short_hash(teacher['hash'])})"
    return _fmt(teacher)


def dataset_text(dataset: Any) -> str | None:
    """``train split, all rows, content hash fe741bdcb015ddf7`` and any other recorded field."""
    if not isinstance(dataset, dict):
        return None if dataset is None else str(dataset)
    d = dict(dataset)
    parts = []
    if d.get("split"):
        parts.append(f"{d.pop('split')} split")
    if "limit" in d:
        limit = d.pop("limit")
        parts.append("all rows" if limit is None else f"first {limit:,} rows")
    if d.get("hash"):
        parts.append(f"content hash {short_hash(d.pop('hash'))}")
    rest = _fmt({k: v for k, v in d.items()})
    return ", ".join(parts + ([rest] if rest else []))


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    rows = [(k, v) for k, v in rows if v is not None]
    return ["| | |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in rows]] if rows else ["(not recorded)"]


def render_model_card(config: dict[str, Any], *, train_config: dict[str, Any] | None = None,
                      provenance: dict[str, Any] | None = None, cache_manifest: dict[str, Any] | None = None,
                      metrics: dict[str, Any] | None = None, name: str | None = None) -> str:
    """The card's Markdown. ``config`` is the student's ``config.json``; ``train_config`` the ``"config"``
    part of ``train_config.json``; ``provenance`` its ``provenance.json``; ``cache_manifest`` the teacher
    cache's ``manifest.json``; ``metrics`` the last validation record."""
    train_config, provenance = train_config or {}, provenance or {}
    cache_manifest, metrics = cache_manifest or {}, metrics or {}
    if config.get("model_type", CausalFNetConfig.model_type) != CausalFNetConfig.model_type:
        return render_card(config, train_config=train_config, provenance=provenance,
                           cache_manifest=cache_manifest, metrics=metrics, name=name)
    cfg = CausalFNetConfig(**{k: v for k, v in config.items() if k not in ("auto_map", "architectures")})
    fp = cache_manifest.get("fingerprint") or {}
    teacher_name = teacher_text(fp.get("teacher"))
    if isinstance(fp.get("teacher"), dict) and fp["teacher"].get("id"):
        teacher_name = fp["teacher"]["id"]  # the title names the model; the table gives the revision
    compact = cfg.vocab_map is not None
    batch_tokens = train_config.get("batch_tokens")
    micro = provenance.get("micro_batches_per_step")
    val_fraction = train_config.get("val_fraction") or 0
    held_out = None
    if val_fraction and not train_config.get("val_cache") and not provenance.get("val_cache"):
        source = "the first training cache's" if provenance.get("mix") else "the training cache's"
        held_out = (f"{val_fraction:.1%} of {source} sequences, held out before training (never trained on, "
                    "but the same teacher and data as training: not an independent test set)")
    n_ids = cfg.num_tokenizer_ids
    emits = len([i for i in cfg.vocab_map if n_ids is None or i < n_ids]) if compact else None
    vocab = f"{cfg.vocab_size:,} rows, compacted from {cfg.full_vocab_size:,} tokenizer ids" if compact \
        else f"{cfg.vocab_size:,}"
    reach = cfg.num_hidden_layers * (cfg.stft_window_size - 1) + 1
    out = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [knowledge-distillation, causal-stft-fnet, attention-free, custom_code]",
        "---",
        "",
        f"# {name + ': c' if name else 'C'}ausal STFT FNet student"
        + (f" distilled from {teacher_name}" if teacher_name else ""),
        "",
        "An attention-free causal language model: each layer mixes the last W positions with the real part "
        "of a 2-D FFT and a linear projection (a causal convolution), then an FFN. Trained by offline "
        "knowledge distillation from a cache of the teacher's sparse next-token distributions, with "
        "fnet-distill"
        + (f" {provenance['code_version']}." if provenance.get("code_version") else "."),
        "",
        "## Model",
        *_table([("parameters", parameter_count(cfg)), ("vocabulary", vocab),
                 ("hidden size d", cfg.hidden_size), ("layers", cfg.num_hidden_layers),
                 ("FFN size", cfg.intermediate_size), ("window W", cfg.stft_window_size),
                 ("positions", cfg.max_position_embeddings), ("dropout", cfg.hidden_dropout_prob),
                 ("dtype", config.get("dtype") or config.get("torch_dtype"))]),
        "",
        "## Teacher and data",
        *_table([("teacher", teacher_text(fp.get("teacher"))), ("cache", provenance.get("cache")),
                 ("cache fingerprint digest", provenance.get("cache_fingerprint_digest")
                  or cache_manifest.get("fingerprint_digest")),
                 ("dataset", dataset_text(fp.get("dataset"))), ("tokenizer hash", fp.get("tokenizer_hash")),
                 ("sequences", cache_manifest.get("num_sequences")),
                 ("tokens", cache_manifest.get("num_tokens")),
                 ("supervised tokens", cache_manifest.get("num_supervised")),
                 ("teacher top-k", cache_manifest.get("topk")), ("samples", cache_manifest.get("samples")),
                 ("temperatures", cache_manifest.get("temperatures")),
                 ("mixed caches (sequences per epoch)", _mix_text(provenance.get("mix"))),
                 ("validation", held_out),
                 ("validation cache", provenance.get("val_cache")),
                 ("validation cache fingerprint digest", provenance.get("val_cache_fingerprint_digest"))]),
        "",
        "## Training budget",
        *_table([("optimizer steps", provenance.get("step")), ("tokens seen", provenance.get("tokens")),
                 ("supervised tokens seen", provenance.get("supervised_tokens")),
                 ("loss", train_config.get("kd")), ("alpha (CE weight)", train_config.get("alpha")),
                 ("KD temperature", train_config.get("temperature")),
                 ("learning rate", train_config.get("lr")),
                 ("micro-batch size (padded tokens, --batch-tokens)", batch_tokens),
                 ("micro-batches per step (all processes)", micro),
                 ("padded tokens per step (at most)", None if None in (batch_tokens, micro)
                  else batch_tokens * micro),
                 ("precision", provenance.get("precision")), ("processes", provenance.get("world_size")),
                 ("seed", train_config.get("seed")), ("torch", provenance.get("torch"))]),
        "",
        "The full resolved settings are in `train_config.json`, the origin in `provenance.json`.",
        "",
        "## Validation",
        *([f"The run's last validation before this folder was written (step {metrics.get('step')})"
           + (f", on {held_out}:" if held_out else ":"), ""] if metrics else []),
        *(_table([(k, v) for k, v in metrics.items() if k not in ("event",)]) if metrics
          else ["No validation was run for this folder (no `--val-cache` / `--val-fraction`)."]),
        "",
        "## Use",
        "The folder carries its own model code (`modeling_causal_fnet.py` and the files it imports), so it "
        "needs only `torch` and `transformers`:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)",
        "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).eval()",
        "messages = [{\"role\": \"user\", \"content\": \"What is 12 * 7?\"}]",
        "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
        "                                 return_dict=True)",
        "out = model.generate(**inputs, max_new_tokens=256, do_sample=False)",
        "print(tok.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "(`trust_remote_code=True` on the tokenizer too: transformers reads the model's config to pick the "
        "tokenizer and would otherwise ask before running the folder's config code.)",
        "",
        "`generate()` carries a rolling window state: each new token costs the same whatever the length so "
        "far, and the state per sequence has a fixed size. `pipeline(\"text-generation\", model=DIR, "
        "trust_remote_code=True)` and lm-evaluation-harness (`pip install \"lm-eval[hf]\"`, then "
        "`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True ...`) work on the folder; "
        "`model(ids).logits` are over tokenizer ids" + (" (ids outside the compacted vocabulary at -inf)."
                                                          if compact else "."),
        *(["", f"Ids from {n_ids:,} on (the teacher's padded embedding rows; no token of the tokenizer's "
           f"{n_ids:,} decodes to them) have -inf logits: the model never emits them."]
          if n_ids is not None and n_ids < cfg.output_vocab_size else []),
        "",
        "A model loaded from this folder writes this card, `train_config.json` and `provenance.json` again "
        "with `save_pretrained` / `push_to_hub`.",
        "",
        "## Limits",
        f"- At most {cfg.max_position_embeddings:,} positions (prompt + generated); longer inputs are an "
        "error.",
        f"- Each layer sees the last {cfg.stft_window_size} positions; through {cfg.num_hidden_layers} "
        f"layers a token can depend on at most the previous {reach - 1} tokens; nothing further back "
        "reaches it.",
        *(["- Compacted vocabulary: the model reads any tokenizer id (ids outside the map count as zero "
           "vectors) but can only produce the "
           f"{emits:,} tokens of its map; text needing other tokens cannot be generated."] if compact
          else []),
        "- A small student trained on the teacher's answers to one task's data: expect it to follow that "
        "task's format, not to be a general assistant; check the validation numbers above.",
        "- No assisted (speculative) generation; beam search and sampling work.",
        "",
    ]
    return "\n".join(out)


def write_model_card(folder: Path, *, cache_dir: Path | None = None, metrics_file: Path | None = None,
                     name: str | None = None) -> Path:
    """Render the card from the files in ``folder`` (and the cache's manifest, the run's metrics) and write
    ``folder/README.md`` atomically."""
    folder = Path(folder)
    train = _read_json(folder / "train_config.json")
    text = render_model_card(
        _read_json(folder / "config.json"), train_config=train.get("config"),
        provenance=_read_json(folder / "provenance.json"),
        cache_manifest=_read_json(Path(cache_dir) / "manifest.json" if cache_dir is not None else None),
        metrics=last_eval(metrics_file), name=name)
    atomic_write_bytes(folder / CARD, text.encode())
    return folder / CARD


def _mix_text(mix: dict[str, Any] | None) -> str | None:
    """``cache-a: 1,000 of 1,000 (4.8%), cache-b: 20,000 of 20,000 (95.2%)`` for a run on several caches."""
    if not mix:
        return None
    return ", ".join(f"{c}: {n:,} of {size:,} ({share:.1%})"
                     for c, size, n, share in zip(mix["caches"], mix["sizes"], mix["counts"], mix["shares"]))

