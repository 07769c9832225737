"""The cache as a data product: the reading code in docs/cache-format.md runs as written on a real cache
(``datasets.load_dataset("arrow")`` and the pyarrow reader with k per row), and agrees with the project's
reader."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
from helpers import write_bigram_cache  # tests/ is on sys.path under pytest

from cache.reader import open_cache
from cache.writer import CacheWriter

DOC = Path(__file__).resolve().parents[1] / "docs" / "cache-format.md"
SECTION = "## Reading a cache outside this project"


def doc_snippets() -> list[str]:
    text = DOC.read_text()
    section = text[text.index(SECTION):]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_datasets_and_pyarrow_open_a_shard_as_documented(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    cache = write_bigram_cache(tmp_path / "cache", n=6, k=5)
    first, second = doc_snippets()
    ns: dict = {}
    exec(first.replace('"runs/cache/qwen2-0.5b-gsm8k-train"', repr(str(cache))), ns)  # noqa: S102

    reader = open_cache(cache)
    ds = ns["ds"]
    assert len(ds) == len(reader) == 6
    by_seq = {int(r.seq_id): r for r in reader}
    for row in ds:
        rec = by_seq[row["seq_id"]]
        np.testing.assert_array_equal(row["input_ids"], rec.input_ids)
        np.testing.assert_array_equal(np.array(row["topk_ids"]).reshape(-1, 5), rec.topk_ids)

    # the pyarrow lines: first row of the first shard, reshaped with k from the manifest
    first_row = next(r for r in reader if r.seq_id == min(by_seq))
    assert ns["k"] == 5 and ns["topk_ids"].shape == (first_row.num_supervised, 5)
    np.testing.assert_array_equal(ns["topk_ids"], first_row.topk_ids)
    np.testing.assert_allclose(ns["topk_logprobs"], first_row.topk_logprobs)

    # the compact encoding (the CLI's default): the same records written compact, opened with datasets
    # and decoded row by row as documented
    compact = tmp_path / "compact"
    settings = dataclasses.replace(reader.settings, encoding="compact")
    with CacheWriter(compact, fingerprint=reader.fingerprint, settings=settings) as w:
        w.write_unit(0, list(reader))
        w.finalize(1, tokenizer=reader.manifest["tokenizer"])
    shards = sorted(str(p) for p in compact.glob("unit-*.arrow"))
    ds_compact = datasets.load_dataset("arrow", data_files=shards, split="train")
    assert "record" in ds_compact.column_names
    ns2: dict = {"ds": ds_compact}
    exec(second.replace('"runs/cache/qwen2-0.5b-gsm8k-train"', repr(str(compact))), ns2)  # noqa: S102
    rec = by_seq[ds_compact[0]["seq_id"]]
    np.testing.assert_array_equal(ns2["rec"].topk_ids, rec.topk_ids)
    np.testing.assert_array_equal(ns2["rec"].input_ids, rec.input_ids)
