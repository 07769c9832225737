"""The compact record encoding (``settings.encoding == "compact"``): one self-describing byte string per
record, decoded on the fly into the same ``CacheRecord`` (shapes and dtypes) as the exact encoding.

What is stored per record (docs/cache-format.md has the layout and the measured sizes):

- ``input_ids`` and every other integer sequence go through one integer coder: fixed-width bit packing at
  the bits of the largest value, or a Rice code (unary high part and fixed-width low part in two separate
  bit streams, so both encode and decode are whole-array numpy operations), whichever is smaller.
- ``loss_mask`` as one bit per token.
- Per teacher row, the kept ids in probability order and their log-probs as integer steps of ``lp_step``
  nats below the row's top log-prob (non-decreasing, so stored as gaps; capped at ``_MAX_NATS``). The top
  entry needs no value: the decoder rebuilds the absolute log-probs from the stored tail mass, so the kept
  entries plus the tail sum to 1 at every cached temperature, and ``topk_shift`` is derived, not stored.
- Per cached temperature the smaller of the tail mass and the kept mass, as a 16-bit code of its
  ``-log2`` plus a flag bit (relative error <= 6.8e-4 on both, even when one is within 1e-3 of 1; a zero
  tail is exact).
- With ``top_p``, a row keeps the fewest ids whose T=1 mass reaches ``top_p`` (at most ``topk``); the mass
  of the dropped ids moves into the tail at every temperature, exactly (computed from the teacher's own
  values before quantisation). Decoded rows keep the ``[n, topk]`` shape: the slots after the kept ids
  repeat the row's top id with log-prob ``PAD_LOGPROB`` (probability 0 at every temperature), so the
  ``topk_tail`` loss sees exactly the kept ids plus the tail.
- Sampled ids per row ascending as gaps, their counts minus one, and the number of unique ids per row.
"""

from __future__ import annotations

import math

import numpy as np

from cache.schema import CacheRecord, CacheSettings

PAD_LOGPROB = -1.0e4  # log-prob of the padding slots of an adaptive row: exp(PAD / T + shift) == 0 in fp32
_MAX_NATS = 40.0  # log-probs further than this below the row's top are stored at this distance
_TAIL_SCALE = 512.0  # tail code = round(-log2(tail) * scale) + 1, 0 for an exact zero
_TAIL_MAX = 65535
_MODE_FIXED, _MODE_RICE, _MODE_DICT = 0, 1, 2  # integer stream modes (first byte of a stream)


# ----------------------------------------------------------------------------------------------------------
# Bit packing and the integer coder


def _bits_for(max_value: int) -> int:
    return max(1, int(max_value).bit_length())


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers (< 2**bits, bits <= 32) at ``bits`` bits each, little-endian bit order."""
    v = np.ascontiguousarray(values, dtype=np.uint32).reshape(-1)
    if not v.size or bits == 0:
        return b""
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buf: bytes | np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``n`` values of ``bits`` bits as int64. Each value is read from the 8 bytes
    that start at its first byte (an unaligned little-endian view: one gather, one shift, one mask)."""
    if n == 0 or bits == 0:
        return np.zeros(n, dtype=np.int64)
    raw = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, bytes) else buf
    m = (n * bits + 7) >> 3  # the bytes the values occupy
    padded = np.zeros(m + 8, dtype=np.uint8)
    padded[:m] = raw[:m]
    words = np.ndarray((m,), dtype="<u8", buffer=padded, strides=(1,))  # words[i]: bytes i .. i + 7
    start = np.arange(0, n * bits, bits, dtype=np.int64)
    values = (words[start >> 3] >> (start & 7).astype(np.uint64)) & np.uint64((1 << bits) - 1)
    return values.astype(np.int64)


def _rice_cost(v: np.ndarray, r: int) -> int:
    return int((v >> r).sum()) + v.size * (1 + r)


def _varint(x: int) -> bytes:
    """LEB128: 7 bits per byte, low bits first, high bit set on every byte but the last."""
    out = bytearray()
    while True:
        b = x & 0x7F
        x >>= 7
        if x:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: np.ndarray, pos: int) -> tuple[int, int]:
    x, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("integer stream header runs past the record")
        b = int(buf[pos])
        pos += 1
        x |= (b & 0x7F) << shift
        if b < 0x80:
            return x, pos
        shift += 7
        if shift > 63:
            raise ValueError("integer stream header is corrupt (varint too long)")


def _encode_plain(v: np.ndarray) -> bytes:
    """Fixed width at the bits of the largest value or Rice, whichever is smaller (``v`` non-empty)."""
    n = v.size
    fixed_bits = _bits_for(int(v.max()))
    best_r, best = -1, n * fixed_bits
    for r in range(0, fixed_bits):
        cost = _rice_cost(v, r)
        if cost < best:
            best_r, best = r, cost
    if best_r < 0:
        return bytes((_MODE_FIXED,)) + _varint(n) + bytes((fixed_bits,)) + pack_bits(v, fixed_bits)
    q = v >> best_r
    unary_len = int(q.sum()) + n
    unary = np.ones(unary_len, dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 0  # each value: q ones, then a zero
    ubytes = np.packbits(unary, bitorder="little").tobytes()
    low = pack_bits(v & ((1 << best_r) - 1), best_r) if best_r else b""
    return bytes((_MODE_RICE,)) + _varint(n) + bytes((best_r,)) + _varint(unary_len) + ubytes + low


def _encode_ints(values: np.ndarray, dictionary: bool = False) -> bytes:
    """Non-negative integers < 2**32 as one self-describing stream: fixed-width bit packing, a Rice code or
    (``dictionary``) a frequency dictionary, whichever is smallest.

    Stream layout: a mode byte, the value count as a varint, then
    fixed: the bit width (1 byte) and the packed values;
    Rice: the parameter r (1 byte), the unary length in bits (varint), the unary bits, the r-bit low parts;
    dictionary: the distinct values ordered by decreasing count (ties: ascending value) as a stream, then
    each value's rank in that order as a stream, so a few ids repeated across a record cost a few bits."""
    v = np.ascontiguousarray(values, dtype=np.int64).reshape(-1)
    n = v.size
    if n == 0:
        return bytes((_MODE_FIXED,)) + _varint(0) + bytes((0,))
    if v.min() < 0 or v.max() >= 1 << 32:
        raise ValueError("integer stream values must be in [0, 2**32)")
    best = _encode_plain(v)
    if dictionary and n > 1:
        uniq, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
        if uniq.size < n:
            order = np.argsort(-counts, kind="stable")  # by count, ties by ascending value
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            cand = bytes((_MODE_DICT,)) + _varint(n) + _encode_plain(uniq[order]) + _encode_plain(rank[inv])
            if len(cand) < len(best):
                best = cand
    return best


def _decode_ints(buf: np.ndarray, pos: int, nested: bool = False) -> tuple[np.ndarray, int]:
    if pos >= len(buf):
        raise ValueError("integer stream starts past the end of the record")
    mode = int(buf[pos])
    n, pos = _read_varint(buf, pos + 1)
    if mode == _MODE_DICT and not nested:  # its two parts are plain streams (never dictionaries)
        table, pos = _decode_ints(buf, pos, nested=True)
        rank, pos = _decode_ints(buf, pos, nested=True)
        if rank.size != n or (n and (rank.max() >= table.size)):
            raise ValueError("dictionary stream is corrupt (rank outside the table)")
        return table[rank], pos
    if pos >= len(buf):
        raise ValueError("integer stream header runs past the record")
    param = int(buf[pos])
    pos += 1
    if param > 32 or (mode == _MODE_FIXED and n and param == 0):
        raise ValueError(f"integer stream is corrupt (width {param})")
    if mode == _MODE_FIXED:
        nbytes = (n * param + 7) // 8
        if pos + nbytes > len(buf):
            raise ValueError("integer stream runs past the record")
        out = unpack_bits(buf[pos:pos + nbytes], param, n) if n else np.zeros(0, np.int64)
        return out, pos + nbytes
    if mode != _MODE_RICE:
        raise ValueError(f"unknown integer stream mode {mode}")
    unary_len, pos = _read_varint(buf, pos)
    ubytes = (unary_len + 7) // 8
    if pos + ubytes > len(buf):
        raise ValueError("integer stream runs past the record")
    unary = np.unpackbits(buf[pos:pos + ubytes], count=unary_len, bitorder="little")
    pos += ubytes
    zeros = np.flatnonzero(unary == 0)
    if zeros.size != n:
        raise ValueError("Rice stream is corrupt (wrong number of terminators)")
    q = np.empty(n, dtype=np.int64)  # ones before each terminator (np.diff costs more than the decode here)
    if n:
        q[0] = zeros[0]
        np.subtract(zeros[1:], zeros[:-1], out=q[1:])
        q[1:] -= 1
    lbytes = (n * param + 7) // 8
    if pos + lbytes > len(buf):
        raise ValueError("integer stream runs past the record")
    low = unpack_bits(buf[pos:pos + lbytes], param, n) if param else 0
    return (q << param) | low, pos + lbytes


# ----------------------------------------------------------------------------------------------------------
# Tail mass code


def encode_tail(t: np.ndarray) -> np.ndarray:
    t = np.asarray(t, dtype=np.float64)
    code = np.zeros(t.shape, dtype=np.int64)
    pos = t > 0
    u = -np.log2(np.minimum(t[pos], 1.0))
    code[pos] = np.minimum(np.rint(u * _TAIL_SCALE), _TAIL_MAX - 1).astype(np.int64) + 1
    return code


def decode_tail(code: np.ndarray) -> np.ndarray:
    code = np.asarray(code, dtype=np.int64)
    return np.where(code == 0, 0.0, np.exp2(-(code - 1) / _TAIL_SCALE))


def encode_masses(tail: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Per row and temperature the smaller of the tail and the kept mass, as ``code << 1 | is_kept``: both
    keep a relative error <= 6.8e-4 even when one of them is within 1e-3 of 1."""
    tail, kept = np.asarray(tail, np.float64), np.asarray(kept, np.float64)
    use_kept = tail > 0.5
    return (encode_tail(np.where(use_kept, kept, tail)) << 1) | use_kept


def decode_masses(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tail, kept mass) from ``encode_masses`` codes."""
    codes = np.asarray(codes, np.int64)
    m = decode_tail(codes >> 1)
    use_kept = (codes & 1).astype(bool)
    return np.where(use_kept, 1.0 - m, m), np.where(use_kept, m, 1.0 - m)


# ----------------------------------------------------------------------------------------------------------
# Adaptive k


def apply_top_p(topk_logprobs: np.ndarray, topk_shift: np.ndarray, tail_mass: np.ndarray,
                temperatures: tuple[float, ...], top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the number of ids kept (the fewest whose T=1 mass reaches ``top_p``) and the tail masses
    at every temperature with the dropped ids' exact mass added. Returns (kept [n] int64, tail [n, nT])."""
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    n, k = lp.shape
    if n == 0:
        return np.zeros(0, np.int64), np.asarray(tail_mass, dtype=np.float64)
    csum = np.cumsum(np.exp(lp), axis=1)
    kept = np.minimum((csum < top_p).sum(axis=1) + 1, k).astype(np.int64)
    dropped = np.arange(k)[None, :] >= kept[:, None]
    tail = np.array(tail_mass, dtype=np.float64, copy=True)
    for i, t in enumerate(temperatures):
        p_t = np.exp(lp / t + np.asarray(topk_shift, dtype=np.float64)[:, i:i + 1])
        tail[:, i] += np.where(dropped, p_t, 0.0).sum(axis=1)
    return kept, np.minimum(tail, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Random-Sampling draws

_SHARE_THRESHOLDS = (0.05, 0.1, 0.2)  # "shared" ids: in at least this share of a record's rows (tried each)


def _row_gaps(pos: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions ascending within each row, as gaps that restart at every row (first: the position)."""
    first = np.ones(pos.size, dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    return np.where(first, pos, np.diff(pos, prepend=0) - 1)


def _row_cumsum(gaps: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Inverse of ``_row_gaps``."""
    if gaps.size == 0:
        return np.zeros(0, np.int64)
    first = np.ones(gaps.size, dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    inc = np.where(first, gaps, gaps + 1)
    cs = np.cumsum(inc)
    start = np.maximum.accumulate(np.where(first, np.arange(gaps.size), 0))
    return cs - (cs[start] - inc[start])


def _implied_counts(ids: np.ndarray, rows: np.ndarray, off: np.ndarray, top1: np.ndarray) -> np.ndarray:
    """Per row the entry whose count is left out: the row's top-1 teacher id when it was drawn, else the
    row's first entry (bool [m]; rows must be non-empty)."""
    is_top = ids == top1[rows]
    has_top = np.bincount(rows[is_top], minlength=off.size - 1) > 0
    drop = is_top.copy()
    drop[off[:-1][~has_top]] = True
    return drop


def _encode_entries(table: np.ndarray, idx: np.ndarray, n_in: np.ndarray, rows: np.ndarray, n_rows: int,
                    share: float | None) -> bytes:
    """A record's sampled ids (ascending per row; ``np.unique(ids)`` as ``table``, ``idx``, ``n_in``): its
    distinct ids split into a shared list (ids drawn in at least ``share`` of the rows) and the rest, both
    ascending as gaps; per row the number of shared entries; then per row the positions of its ids in each
    list, ascending as gaps."""
    shared = n_in >= max(2.0, share * n_rows) if share is not None else np.zeros(table.size, bool)
    pos_s, pos_r = np.cumsum(shared) - 1, np.cumsum(~shared) - 1
    e_s = shared[idx]
    return b"".join([_encode_ints(np.diff(table[shared], prepend=-1) - 1),
                     _encode_ints(np.diff(table[~shared], prepend=-1) - 1),
                     _encode_ints(np.bincount(rows[e_s], minlength=n_rows)),
                     _encode_ints(_row_gaps(pos_s[idx[e_s]], rows[e_s])),
                     _encode_ints(_row_gaps(pos_r[idx[~e_s]], rows[~e_s]))])


def encode_samples(r: CacheRecord, draws: int) -> list[bytes]:
    """Random-Sampling fields: unique ids per row, the ids (``_encode_entries`` with the smallest of a few
    shares), and the counts minus one in id order; when every row's counts sum to ``draws``, one count per
    row (the top-1 teacher id's, usually the largest) is left out and implied (a flag byte says which)."""
    off = np.asarray(r.sample_offsets, np.int64)
    ids = np.asarray(r.sample_ids, np.int64)
    counts = np.asarray(r.sample_counts, np.int64)
    per_row = np.diff(off)
    n_rows = per_row.size
    rows = np.repeat(np.arange(n_rows), per_row)
    uniq = np.unique(ids, return_inverse=True, return_counts=True)
    entries = min((_encode_entries(*uniq, rows, n_rows, sh) for sh in (None, *_SHARE_THRESHOLDS)), key=len)
    sums = np.bincount(rows, weights=counts, minlength=n_rows)
    implied = bool(n_rows) and bool((per_row > 0).all()) and bool((sums == draws).all())
    if implied:
        counts = counts[~_implied_counts(ids, rows, off, np.asarray(r.topk_ids, np.int64)[:, 0])]
    return [_encode_ints(per_row), entries, bytes((int(implied),)), _encode_ints(counts - 1)]


def decode_samples(buf: np.ndarray, pos: int, n_rows: int, m: int, top1: np.ndarray,
                   draws: int) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int]:
    """Inverse of ``encode_samples``: (sample_offsets, sample_ids, sample_counts) and the new position."""
    per_row, pos = _decode_ints(buf, pos)
    if per_row.size != n_rows or int(per_row.sum()) != m:
        raise ValueError("compact record's sampled-id streams do not match its header")
    t_shared, pos = _decode_ints(buf, pos)
    t_rest, pos = _decode_ints(buf, pos)
    n_shared, pos = _decode_ints(buf, pos)
    g_shared, pos = _decode_ints(buf, pos)
    g_rest, pos = _decode_ints(buf, pos)
    if n_shared.size != n_rows or (n_shared > per_row).any() or g_shared.size + g_rest.size != m \
            or g_shared.size != int(n_shared.sum()):
        raise ValueError("compact record's sampled-id streams do not match its header")
    rows_s = np.repeat(np.arange(n_rows), n_shared)
    rows_r = np.repeat(np.arange(n_rows), per_row - n_shared)
    table_s, table_r = np.cumsum(t_shared + 1) - 1, np.cumsum(t_rest + 1) - 1
    p_s, p_r = _row_cumsum(g_shared, rows_s), _row_cumsum(g_rest, rows_r)
    if (p_s.size and (p_s.min() < 0 or p_s.max() >= table_s.size)) \
            or (p_r.size and (p_r.min() < 0 or p_r.max() >= table_r.size)):
        raise ValueError("compact record's sampled ids point outside its id lists")
    ids = np.concatenate([table_s[p_s], table_r[p_r]])
    rows = np.concatenate([rows_s, rows_r])
    order = np.lexsort((ids, rows))  # back to ascending ids within each row
    ids, rows = ids[order], rows[order]
    if pos >= len(buf):
        raise ValueError("compact record ends before its sample counts")
    implied = int(buf[pos])
    pos += 1
    stored, pos = _decode_ints(buf, pos)
    off = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(per_row, out=off[1:])
    if implied:
        drop = _implied_counts(ids, rows, off, np.asarray(top1, np.int64))
        if stored.size != m - n_rows or int(drop.sum()) != n_rows:
            raise ValueError("compact record's sample counts do not match its header")
        counts = np.zeros(m, dtype=np.int64)
        counts[~drop] = stored + 1
        counts[drop] = draws - np.bincount(rows, weights=counts, minlength=n_rows).astype(np.int64)
        if (counts[drop] < 1).any():
            raise ValueError("compact record's sample counts exceed the number of draws")
    else:
        if stored.size != m:
            raise ValueError("compact record's sample counts do not match its header")
        counts = stored + 1
    return (off, ids.astype(np.int32), counts.astype(np.int32)), pos


# ----------------------------------------------------------------------------------------------------------
# Records


def _anchor_index(settings: CacheSettings) -> int | None:
    for i, t in enumerate(settings.temperatures):
        if t == 1.0:
            return i
    return None


def encode_record(r: CacheRecord, settings: CacheSettings) -> bytes:
    """The compact bytes of one normalised record (log-probs as given, ideally float32 from the teacher)."""
    k, step = settings.topk, settings.lp_step
    L, n = int(r.input_ids.shape[0]), int(r.topk_ids.shape[0])
    lp = np.asarray(r.topk_logprobs, dtype=np.float64)
    if settings.top_p is not None:
        kept, tail = apply_top_p(lp, r.topk_shift, r.tail_mass, settings.temperatures, settings.top_p)
    else:
        kept, tail = np.full(n, k, dtype=np.int64), np.asarray(r.tail_mass, dtype=np.float64)
    keep = np.arange(k)[None, :] < kept[:, None]  # [n, k]
    shift = np.asarray(r.topk_shift, dtype=np.float64)
    kept_mass = np.stack([np.where(keep, np.exp(lp / t + shift[:, i:i + 1]), 0.0).sum(1)
                          for i, t in enumerate(settings.temperatures)], 1) if n else tail
    q = np.minimum(np.rint((lp[:, :1] - lp) / step), round(_MAX_NATS / step)).astype(np.int64)
    q = np.maximum.accumulate(np.maximum(q, 0), axis=1)  # non-decreasing even after the cap
    gaps = np.diff(q, axis=1)[keep[:, 1:]] if k > 1 else np.zeros(0, np.int64)
    m_samples = int(r.sample_ids.shape[0]) if r.sample_ids is not None else 0
    parts = [_varint(L) + _varint(n) + _varint(m_samples),
             _encode_ints(r.input_ids, dictionary=True),
             np.packbits(r.loss_mask, bitorder="little").tobytes()]
    if settings.top_p is not None:
        parts.append(_encode_ints(kept - 1))
    parts += [_encode_ints(r.topk_ids[keep], dictionary=True), _encode_ints(gaps),
              _encode_ints(encode_masses(tail, kept_mass).reshape(-1))]
    if _anchor_index(settings) is None:  # no T=1 tail to anchor the absolute log-probs: keep the top one
        parts.append(np.asarray(lp[:, 0], dtype="<f4").tobytes())
    if settings.samples > 0:
        parts += encode_samples(r, settings.samples)
    return b"".join(parts)


def decode_record(seq_id: int, assistant_start: int, blob: bytes | memoryview | np.ndarray,
                  settings: CacheSettings) -> CacheRecord:
    """The ``CacheRecord`` of one compact byte string (same shapes and dtypes as the exact encoding)."""
    buf = np.frombuffer(blob, dtype=np.uint8) if not isinstance(blob, np.ndarray) else blob.view(np.uint8)
    k, temps = settings.topk, settings.temperatures
    L, pos = _read_varint(buf, 0)
    n, pos = _read_varint(buf, pos)
    m_samples, pos = _read_varint(buf, pos)
    # Bound the header's counts by the record's own size before anything is allocated: every stored value
    # takes at least one bit (input_ids and the loss mask: L each; per row its tail codes, one id or more,
    # and the kept count (top_p) or k - 1 gaps and k ids; one gap per sampled id).
    per_row = len(temps) + (2 if settings.top_p is not None else 2 * k - 1)
    if n > L or 2 * L + n * per_row + m_samples > 8 * len(buf):
        raise ValueError(f"compact record header claims {L} tokens, {n} teacher rows and {m_samples} sampled "
                         f"ids, more than its {len(buf)} bytes can hold")
    input_ids, pos = _decode_ints(buf, pos)
    if input_ids.size != L:
        raise ValueError(f"compact record holds {input_ids.size} token ids but its header says {L}")
    mb = (L + 7) // 8
    loss_mask = np.unpackbits(buf[pos:pos + mb], count=L, bitorder="little").astype(bool)
    pos += mb
    if settings.top_p is not None:
        kept, pos = _decode_ints(buf, pos)
        kept += 1
    else:
        kept = np.full(n, k, dtype=np.int64)
    flat_ids, pos = _decode_ints(buf, pos)
    gaps, pos = _decode_ints(buf, pos)
    tcode, pos = _decode_ints(buf, pos)
    tail, kept_mass = (x.reshape(n, len(temps)) for x in decode_masses(tcode))
    log_kept = np.log(np.maximum(kept_mass, 1e-300))
    full = settings.top_p is None  # every row keeps all k ids: no masks needed (the same values)
    keep = None if full else np.arange(k)[None, :] < kept[:, None]
    if flat_ids.size != (n * k if full else int(kept.sum())) or gaps.size != (
            n * (k - 1) if full else int(keep[:, 1:].sum())):
        raise ValueError(f"compact record holds {flat_ids.size} ids and {gaps.size} gaps for {n} rows of "
                         f"top-{k}")
    q = np.zeros((n, k), dtype=np.int64)
    if k > 1:
        if full:
            g = gaps.reshape(n, k - 1)
        else:
            g = np.zeros((n, k - 1), dtype=np.int64)
            g[keep[:, 1:]] = gaps
        np.cumsum(g, axis=1, out=q[:, 1:])
    rel = -q * settings.lp_step  # log p_1 up to a per-row constant
    if not full:
        rel[~keep] = -np.inf
    a = _anchor_index(settings)
    if a is None:
        top = buf[pos:pos + 4 * n].copy().view("<f4").astype(np.float64)
        pos += 4 * n
        lp = rel + top[:, None]
    else:
        lse = _logsumexp(rel)
        lp = rel + (log_kept[:, a] - lse)[:, None]
    shift = np.zeros((n, len(temps)), dtype=np.float64)
    for i, t in enumerate(temps):
        shift[:, i] = log_kept[:, i] - _logsumexp(lp / t)
    if full:
        ids = flat_ids.reshape(n, k).astype(np.int32)
    else:
        ids = np.zeros((n, k), dtype=np.int32)
        ids[keep] = flat_ids
    if n and not full and not keep.all():
        ids = np.where(keep, ids, ids[:, :1])
        lp = np.where(keep, lp, PAD_LOGPROB)
    rec = CacheRecord(
        seq_id=int(seq_id), input_ids=input_ids.astype(np.int32), loss_mask=loss_mask,
        assistant_start=int(assistant_start), topk_ids=ids,
        topk_logprobs=lp.astype(np.dtype(settings.dtype)), topk_shift=shift.astype(np.float32),
        tail_mass=tail.astype(np.float32))
    if settings.samples > 0:
        (rec.sample_offsets, rec.sample_ids, rec.sample_counts), pos = decode_samples(
            buf, pos, n, m_samples, ids[:, 0], settings.samples)
    if pos != len(buf):
        raise ValueError(f"compact record holds {len(buf)} bytes but {pos} were decoded")
    return rec


def _logsumexp(x: np.ndarray) -> np.ndarray:
    if x.shape[0] == 0:
        return np.zeros(0)
    mx = np.max(x, axis=1)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    with np.errstate(divide="ignore"):
        return mx + np.log(np.exp(x - mx[:, None]).sum(axis=1))


def row_kl(exact: CacheRecord, decoded: CacheRecord, temperatures: tuple[float, ...]) -> np.ndarray:
    """Per row and temperature, KL(exact || decoded) in nats over the decoded row's bins (its kept ids plus
    one tail bucket; the exact distribution's mass outside the kept ids goes into its tail). [n, nT]"""
    lp = np.asarray(exact.topk_logprobs, np.float64)
    n = lp.shape[0]
    out = np.zeros((n, len(temperatures)))
    if n == 0:
        return out
    kept = decoded.topk_logprobs.astype(np.float64) > PAD_LOGPROB / 2
    for i, t in enumerate(temperatures):
        p = np.exp(lp / t + np.asarray(exact.topk_shift, np.float64)[:, i:i + 1])
        tail_p = np.asarray(exact.tail_mass, np.float64)[:, i] + np.where(kept, 0.0, p).sum(1)
        q = np.exp(decoded.topk_logprobs.astype(np.float64) / t
                   + decoded.topk_shift.astype(np.float64)[:, i:i + 1])
        tail_q = decoded.tail_mass.astype(np.float64)[:, i]
        with np.errstate(divide="ignore", invalid="ignore"):
            head = np.where(kept & (p > 0), p * (np.log(p) - np.log(q)), 0.0).sum(1)
            tl = np.where(tail_p > 0, tail_p * (np.log(tail_p) - np.log(np.maximum(tail_q, 1e-300))), 0.0)
        # generalised KL (sum p log p/q - sum p + sum q >= 0): neither side's bins sum to 1 exactly after
        # rounding (float16 log-probs, float32 tails), and this keeps the measure non-negative
        mass_p = np.where(kept, p, 0.0).sum(1) + tail_p
        mass_q = np.where(kept, q, 0.0).sum(1) + tail_q
        out[:, i] = head + tl - mass_p + mass_q
    return out


def bits_per_vocab_id(vocab_size: int) -> int:
    """ceil(log2 vocab): the width of a fixed-width packed id."""
    return max(1, math.ceil(math.log2(vocab_size)))
