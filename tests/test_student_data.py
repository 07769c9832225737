"""student.data on a tiny cache written by the real cache.writer.CacheWriter: collation against the
records (and the alignment convention through the loss), batch plans (coverage, budget, determinism, ranks,
resume) and DataLoader worker independence."""

from __future__ import annotations

from collections import Counter
from dataclasses import fields

import numpy as np
import pytest
import torch
from helpers import random_samples  # tests/ is on sys.path under pytest

from cache.reader import open_cache
from cache.schema import CacheRecord, CacheSettings
from cache.util import UserError
from cache.writer import CacheWriter
from student.chunked_loss import chunked_distill_loss
from student.data import (
    Batch,
    CacheDataset,
    Collator,
    TokenBudgetBatchSampler,
    gather_rows,
    make_dataloader,
)
from student.losses import DistillTargets, distill_loss_sums

VOCAB, K, PAD = 97, 4, 96


def make_record(rng: np.random.Generator, seq_id: int, samples: int) -> CacheRecord:
    L = int(rng.integers(5, 30))
    start = int(rng.integers(1, L - 1))
    mask = np.zeros(L, dtype=bool)
    mask[start:] = rng.random(L - start) < 0.7  # holes, as in multi-turn chats
    mask[start] = True
    n = int(mask.sum())
    logits = rng.normal(size=(n, VOCAB))
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-lp, axis=1)[:, :K]
    rec = dict(
        seq_id=seq_id, input_ids=rng.integers(0, PAD, L).astype(np.int32), loss_mask=mask,
        assistant_start=start, topk_ids=ids.astype(np.int32),
        topk_logprobs=np.take_along_axis(lp, ids, 1).astype(np.float32),
        topk_shift=rng.normal(size=(n, 2)).astype(np.float32),
        tail_mass=rng.random((n, 2)).astype(np.float32),
    )
    if samples:
        rec.update(random_samples(rng, n, VOCAB, samples))
    return CacheRecord(**rec)


def write_tiny_cache(path, samples: int, num_units: int = 3, per_unit: int = 7):
    rng = np.random.default_rng(samples)
    s = CacheSettings(topk=K, vocab_size=VOCAB, samples=samples, temperatures=(1.0, 2.0), dtype="float32")
    with CacheWriter(path, fingerprint={"test": "student-data"}, settings=s) as w:
        for u in range(num_units):
            w.write_unit(u, [make_record(rng, u * per_unit + j, samples) for j in range(per_unit)])
        w.finalize(num_units, tokenizer={"vocab_size": VOCAB, "eos_token_id": 95, "pad_token_id": PAD})
    return open_cache(path)


@pytest.fixture(scope="module", params=[0, 6], ids=["no-samples", "samples"])
def reader(request, tmp_path_factory):
    return write_tiny_cache(tmp_path_factory.mktemp("cache"), samples=request.param)


def test_collate_matches_records_row_by_row(reader):
    ds = CacheDataset(reader)
    collate = Collator.from_reader(reader)
    assert collate.pad_id == PAD
    idx = [3, 0, 17, 9]
    recs = [ds[i] for i in idx]
    b = collate(recs)
    B, Lmax = b.input_ids.shape
    assert B == 4 and Lmax == max(len(r.input_ids) for r in recs)
    assert b.seq_ids.tolist() == [r.seq_id for r in recs]
    row = 0
    for bi, r in enumerate(recs):
        L = len(r.input_ids)
        assert b.input_ids[bi, :L].tolist() == r.input_ids.tolist()
        assert (b.input_ids[bi, L:] == PAD).all() and not b.attention_mask[bi, L:].any()
        assert b.attention_mask[bi, :L].all()
        assert b.loss_mask[bi, :L].tolist() == r.loss_mask.tolist()
        for j, t in enumerate(np.flatnonzero(r.loss_mask)):
            assert b.pred_pos[row] == bi * Lmax + t - 1
            assert b.labels[row] == r.input_ids[t] == b.input_ids.view(-1)[b.pred_pos[row] + 1]
            assert b.topk_ids[row].tolist() == r.topk_ids[j].tolist()
            np.testing.assert_array_equal(b.topk_logprobs[row].numpy(), r.topk_logprobs[j])
            np.testing.assert_array_equal(b.topk_shift[row].numpy(), r.topk_shift[j])
            np.testing.assert_array_equal(b.tail_mass[row].numpy(), r.tail_mass[j])
            if reader.samples:
                a, z = r.sample_offsets[j], r.sample_offsets[j + 1]
                got = {int(i): float(c) for i, c in zip(b.sample_ids[row], b.sample_counts[row]) if c > 0}
                assert got == {int(i): float(c) for i, c in zip(r.sample_ids[a:z], r.sample_counts[a:z])}
            row += 1
    assert row == b.num_supervised == int(b.loss_mask.sum())
    assert b.topk_ids.dtype == b.labels.dtype == b.pred_pos.dtype == b.input_ids.dtype == torch.int64
    assert b.topk_logprobs.dtype == torch.float32
    assert (b.sample_ids is None) == (reader.samples == 0)


def test_flattened_batch_loss_equals_per_sequence_loop(reader):
    """Alignment end to end: student hidden at t_j - 1 against teacher row j, batch path vs a loop."""
    recs = [reader[i] for i in (5, 1, 12)]
    b = Collator.from_reader(reader)(recs)
    gen = torch.Generator().manual_seed(0)
    d = 8
    hidden = torch.randn(*b.input_ids.shape, d, generator=gen)  # (B, Lmax, d)
    weight = torch.randn(VOCAB, d, generator=gen)
    kind = "sampled" if reader.samples else "topk_tail"
    ti = reader.temperature_index(2.0)
    got = chunked_distill_loss(gather_rows(hidden, b.pred_pos), weight, DistillTargets.from_batch(b, ti),
                               kind=kind, temperature=2.0, chunk_size=5)
    ce = kd = 0.0
    for bi, r in enumerate(recs):
        t = torch.from_numpy(np.flatnonzero(r.loss_mask))
        single = Collator(PAD)([r])
        sums = distill_loss_sums(hidden[bi, t - 1] @ weight.T, DistillTargets(
            labels=torch.from_numpy(r.input_ids.astype(np.int64))[t], topk_ids=single.topk_ids,
            topk_logprobs=single.topk_logprobs, shift=single.topk_shift[:, ti], tail=single.tail_mass[:, ti],
            sample_ids=single.sample_ids, sample_counts=single.sample_counts), kind, 2.0)
        ce += sums.ce.item()
        kd += sums.kd.item()
    assert got.ce.item() == pytest.approx(ce, rel=1e-5)
    assert got.kd.item() == pytest.approx(kd, rel=1e-5)


def lengths_fixture(n=300, seed=3):
    rng = np.random.default_rng(seed)
    return rng.integers(3, 120, n), rng.integers(1, 50, n)


def flat(steps):
    return [i for step in steps for mb in step for i in mb]


def test_plan_covers_every_sequence_once_per_epoch_under_budget():
    lengths, sup = lengths_fixture()
    s = TokenBudgetBatchSampler(lengths, 512, num_supervised=sup, seed=1, micro_batches_per_step=3,
                                sort_window=64)
    orders = []
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        seen = Counter(i for mb in batches for i in mb)
        assert sorted(seen) == list(range(len(lengths))) and set(seen.values()) == {1}
        assert all(len(mb) * max(lengths[mb]) <= 512 for mb in batches)
        assert len(batches) == len(s)
        assert sum(p.num_supervised for p in s.steps()) == sup.sum()
        orders.append([i for mb in batches for i in mb])
    assert orders[0] != orders[1] != orders[2]
    again = TokenBudgetBatchSampler(lengths, 512, num_supervised=sup, seed=1, micro_batches_per_step=3,
                                    sort_window=64)
    again.set_epoch(1)
    assert [i for mb in again for i in mb] == orders[1]
    other_seed = TokenBudgetBatchSampler(lengths, 512, seed=2, micro_batches_per_step=3, sort_window=64)
    other_seed.set_epoch(1)
    assert [i for mb in other_seed for i in mb] != orders[1]


def test_bucketing_packs_similar_lengths():
    lengths, _ = lengths_fixture()
    s = TokenBudgetBatchSampler(lengths, 1024, seed=0, sort_window=len(lengths))
    padded = sum(len(mb) * max(lengths[mb]) for mb in s)
    unsorted, batch = 0, []
    for i in np.random.default_rng(0).permutation(len(lengths)):
        if batch and (len(batch) + 1) * max(lengths[batch + [i]]) > 1024:
            unsorted += len(batch) * max(lengths[batch])
            batch = []
        batch.append(i)
    unsorted += len(batch) * max(lengths[batch])
    assert padded < 1.15 * lengths.sum() < 1.15 * unsorted / 1.3


@pytest.mark.parametrize("world_size,per_step", [(2, 2), (2, 4), (3, 3)])
def test_ranks_split_each_global_step_disjointly(world_size, per_step):
    lengths, sup = lengths_fixture(n=205)
    kw = dict(num_supervised=sup, seed=5, micro_batches_per_step=per_step, sort_window=50)
    one = TokenBudgetBatchSampler(lengths, 300, **kw)
    ranks = [TokenBudgetBatchSampler(lengths, 300, world_size=world_size, rank=r, **kw)
             for r in range(world_size)]
    for s in [one, *ranks]:
        s.set_epoch(2)
    ref = one.steps()
    per_rank = [s.steps() for s in ranks]
    assert len({len(p) for p in per_rank}) == 1
    assert len(per_rank[0]) == len(ref)
    for i, ref_step in enumerate(ref):
        parts = [set(i for mb in p[i].micro_batches for i in mb) for p in per_rank]
        assert len({len(p[i].micro_batches) for p in per_rank}) == 1  # same accumulation count on every rank
        assert sum(len(x) for x in parts) == len(set().union(*parts))  # disjoint
        assert set().union(*parts) == {j for mb in ref_step.micro_batches for j in mb}  # == the 1-rank step
        assert all(p[i].num_supervised == ref_step.num_supervised for p in per_rank)
    covered = Counter(i for s in ranks for mb in s for i in mb)
    assert sorted(covered) == list(range(len(lengths))) and set(covered.values()) == {1}


def test_resume_yields_exactly_the_remaining_batches_without_reading(reader):
    ds = CacheDataset(reader)
    full = TokenBudgetBatchSampler.from_dataset(ds, 64, seed=7, micro_batches_per_step=2)
    full.set_epoch(1)
    uninterrupted = list(full)
    steps = full.steps()
    consumed = 2
    resumed = TokenBudgetBatchSampler.from_dataset(ds, 64, seed=7, micro_batches_per_step=2)
    resumed.set_epoch(1, batches_consumed=consumed)
    done = sum(len(p.micro_batches) for p in steps[:consumed])
    assert list(resumed) == uninterrupted[done:]
    assert [p.index for p in resumed.steps()] == list(range(consumed, len(steps)))

    class Counting(CacheDataset):
        read: list[int] = []

        def __getitem__(self, i):
            self.read.append(int(i))
            return super().__getitem__(i)

    counting = Counting(reader)
    got = list(make_dataloader(counting, resumed, Collator.from_reader(reader)))
    assert sorted(counting.read) == sorted(i for mb in uninterrupted[done:] for i in mb)
    assert [b.seq_ids.tolist() for b in got] == [[int(reader.seq_ids[i]) for i in mb]
                                                 for mb in uninterrupted[done:]]
    with pytest.raises(UserError, match="past the end"):
        resumed.set_epoch(1, batches_consumed=len(steps) + 1)


def test_dataloader_workers_do_not_change_batches(reader):
    ds = CacheDataset(reader)
    collate = Collator.from_reader(reader)

    def batches(workers):
        s = TokenBudgetBatchSampler.from_dataset(ds, 80, seed=3, micro_batches_per_step=2)
        s.set_epoch(4)
        return list(make_dataloader(ds, s, collate, num_workers=workers))

    a, b = batches(0), batches(2)
    assert len(a) == len(b) > 3
    for x, y in zip(a, b):
        assert isinstance(y, Batch)
        for name in Batch.__dataclass_fields__:
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None and v is None) or torch.equal(u, v), name


@pytest.mark.parametrize("n", range(5, 12))
def test_short_last_step_is_split_for_ranks_or_dropped(n):
    lengths = np.full(n, 10)  # 3 sequences per micro-batch under a budget of 30
    one = TokenBudgetBatchSampler(lengths, 30, micro_batches_per_step=2)
    last = one.global_steps(0)[-1]
    two = [TokenBudgetBatchSampler(lengths, 30, world_size=2, rank=r, micro_batches_per_step=2)
           for r in range(2)]
    assert len(two[0]) == len(two[1])
    assert [len(p.micro_batches) for p in two[0].steps()] == [len(p.micro_batches) for p in two[1].steps()]
    covered = Counter(i for s in two for mb in s for i in mb)
    assert set(covered.values()) == {1}
    lone = len(last) == 1 and len(last[0]) == 1  # one sequence cannot be shared by 2 ranks: dropped
    assert len(covered) == n - (1 if lone else 0)
    dropped = TokenBudgetBatchSampler(lengths, 30, micro_batches_per_step=2, drop_last=True)
    assert sum(len(mb) for mb in dropped) == n - (sum(len(mb) for mb in last) if len(last) < 2 else 0)


def test_validation_errors():
    with pytest.raises(UserError, match="token budget"):
        TokenBudgetBatchSampler([5, 50], 40).num_steps()
    with pytest.raises(UserError, match="multiple of"):
        TokenBudgetBatchSampler([5], 40, world_size=2, micro_batches_per_step=3)
    with pytest.raises(UserError):
        TokenBudgetBatchSampler([5], 40, world_size=2, rank=2, micro_batches_per_step=2)
    rec = make_record(np.random.default_rng(0), 0, 0)
    bad = CacheRecord(**{**rec.__dict__, "topk_ids": rec.topk_ids[1:]})
    with pytest.raises(UserError, match="alignment"):
        Collator(PAD)([bad])


def test_batch_to_device_and_pinning(reader):
    b = Collator.from_reader(reader)([reader[0], reader[1]])
    moved = b.to("cpu")
    assert torch.equal(moved.input_ids, b.input_ids)
    if torch.cuda.is_available():
        assert b.pin_memory().topk_ids.is_pinned()


def test_teacher_as_student_has_zero_kd_through_stage_one(tmp_path, tiny_qwen_dir, qwen_tokenizer_dir,
                                                          gsm8k_slice):
    """Stage one (real teacher pass, real tokenizer, GSM8K) -> cache -> batch -> loss. With the teacher itself
    as the student, KD is ~0 and top-1 agreement is total; one position off, it is not."""
    from transformers import AutoModelForCausalLM

    from pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache

    cfg = TeacherCacheConfig(teacher=str(tiny_qwen_dir), tokenizer=str(qwen_tokenizer_dir),
                             dataset=str(gsm8k_slice), out=tmp_path / "cache", limit=2, topk=8, samples=4,
                             temperatures=(1.0, 2.0), max_length=120, overflow="truncate",
                             logprob_dtype="float32", device="cpu", progress=False)
    run_teacher_cache(cfg)
    reader = open_cache(tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32).eval()
    ds = CacheDataset(reader)
    sampler = TokenBudgetBatchSampler.from_dataset(ds, 4096)
    (batch,) = list(make_dataloader(ds, sampler, Collator.from_reader(reader)))
    assert batch.input_ids.shape[0] == 2
    with torch.no_grad():
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()
                             ).last_hidden_state  # (B, Lmax, d)
    head = model.lm_head.weight
    ti = reader.temperature_index(2.0)
    targets = DistillTargets.from_batch(batch, ti)
    for kind in ("topk_tail", "topk_renorm", "reverse_kl"):
        sums = chunked_distill_loss(gather_rows(hidden, batch.pred_pos), head, targets, kind=kind,
                                    temperature=2.0, chunk_size=64)
        assert sums.kd.item() / batch.num_supervised < 1e-4, kind
        assert int(sums.top1_agree) == batch.num_supervised
    shifted = chunked_distill_loss(gather_rows(hidden, batch.pred_pos + 1), head, targets, temperature=2.0)
    assert shifted.kd.item() / batch.num_supervised > 0.05


def test_two_ranks_and_accumulation_give_the_one_big_batch_gradient(reader):
    """(1 rank, 4 micro-batches) == (2 ranks x 2 micro-batches, summed) == the whole step as one batch,
    each normalised by the step's supervised-token count from the plan."""
    ds, collate = CacheDataset(reader), Collator.from_reader(reader)
    kind = "sampled" if reader.samples else "topk_tail"
    emb0 = torch.randn(VOCAB, 8, generator=torch.Generator().manual_seed(0))

    def grad(batches, normalizer):
        emb = emb0.clone().requires_grad_()
        for b in batches:
            hidden = emb[b.input_ids]  # (B, Lmax, d): a stand-in model with the head tied to it
            sums = chunked_distill_loss(gather_rows(hidden, b.pred_pos), emb, DistillTargets.from_batch(b, 1),
                                        kind=kind, temperature=2.0, chunk_size=7)
            (0.3 * sums.ce + 0.7 * 4 * sums.kd).div(normalizer).backward()
        return emb.grad

    kw = dict(seed=11, micro_batches_per_step=4)
    one = TokenBudgetBatchSampler.from_dataset(ds, 60, **kw)
    step = one.steps()[0]
    assert len(step.micro_batches) == 4
    g_one = grad([collate([ds[i] for i in mb]) for mb in step.micro_batches], step.num_supervised)
    g_ranks = 0
    for r in range(2):
        mine = TokenBudgetBatchSampler.from_dataset(ds, 60, world_size=2, rank=r, **kw).steps()[0]
        assert mine.num_supervised == step.num_supervised and len(mine.micro_batches) == 2
        batches = [collate([ds[i] for i in mb]) for mb in mine.micro_batches]
        g_ranks = g_ranks + grad(batches, mine.num_supervised)
    whole = collate([ds[i] for mb in step.micro_batches for i in mb])
    assert whole.num_supervised == step.num_supervised
    g_whole = grad([whole], step.num_supervised)
    torch.testing.assert_close(g_ranks, g_one, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_whole, g_one, rtol=1e-5, atol=1e-7)


def test_decoded_records_equal_the_readers_within_the_budget(tmp_path):
    """DecodedRecords on a compact (bit-packed, quantized) cache: every read equals a fresh decode field by
    field; the first records up to the byte budget are kept (and only those), read-only, and collate
    unchanged; pickling (to a DataLoader worker) drops them."""
    import pickle

    from student.data import DecodedRecords, record_nbytes

    rng = np.random.default_rng(5)
    s = CacheSettings(topk=K, vocab_size=VOCAB, samples=6, temperatures=(1.0, 2.0), dtype="float16",
                      encoding="compact")
    with CacheWriter(tmp_path / "c", fingerprint={"test": "memo"}, settings=s) as w:
        w.write_unit(0, [make_record(rng, j, 6) for j in range(9)])
        w.finalize(1, tokenizer={"vocab_size": VOCAB, "eos_token_id": 95, "pad_token_id": PAD})
    fresh, reader = open_cache(tmp_path / "c"), open_cache(tmp_path / "c")
    sizes = [record_nbytes(fresh[i]) for i in range(len(fresh))]
    budget = sum(sizes[:4]) + sizes[4] // 2  # room for records 0-3, not for 4
    kept = DecodedRecords(reader, budget)
    assert len(kept) == 9 and np.array_equal(kept.lengths, fresh.lengths)  # the reader's attributes
    for _ in range(2):  # the second pass returns the kept records
        for i in range(9):
            a, b = kept[i], fresh[i]
            for name, v in vars(b).items():
                if isinstance(v, np.ndarray):
                    assert np.array_equal(getattr(a, name), v) and getattr(a, name).dtype == v.dtype, name
                else:
                    assert getattr(a, name) == v, name
    assert sorted(kept._kept) == [0, 1, 2, 3] and kept.kept_bytes == sum(sizes[:4]) <= budget
    assert kept[2] is kept[2] and kept[6] is not kept[6]
    with pytest.raises(ValueError):
        kept[0].topk_ids[0, 0] = 1  # kept arrays are read-only
    collate = Collator(pad_id=PAD)
    ref = collate([fresh[i] for i in range(4)])
    got = collate([kept[i] for i in range(4)])  # the collator never writes into a record
    for f in fields(Batch):
        x, y = getattr(ref, f.name), getattr(got, f.name)
        assert (x is None and y is None) or torch.equal(x, y), f.name
    clone = pickle.loads(pickle.dumps(kept))
    assert clone.kept_bytes == 0 and not clone._kept and clone.budget_bytes == budget
    assert np.array_equal(clone[3].topk_ids, fresh[3].topk_ids) and 3 in clone._kept
    none = DecodedRecords(open_cache(tmp_path / "c"), 0)
    assert np.array_equal(none[1].topk_logprobs, fresh[1].topk_logprobs) and not none._kept
