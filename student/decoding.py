"""Incremental decoding of the causal STFT FNet: the rolling window state and a small sampling loop.

A mixing layer at position t reads only the W inputs t-W+1..t, so the whole past a new token needs is, per
layer, the last W-1 mixer inputs: ``RollingStateCache`` holds them in a ring of 2W slots per layer, written
twice (slots ``t % W`` and ``t % W + W``) so that the window ``t-W+1..t`` is always the contiguous slice
``[t % W + 1, t % W + W]``: no concatenation, shift or reallocation per token, and one (B, W*d) @ (W*d, d)
matmul per layer reads it in place. Its size does not depend on the length generated.

The cache is a transformers ``Cache``, so ``model.generate()`` and ``pipeline("text-generation")`` carry it
from step to step; ``generate_tokens`` is the same decoding without the generation framework (fewer Python
steps per token, an explicit ``torch.Generator`` for sampling).

Only torch/transformers are imported here: this file is copied beside the weights of every saved student.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers.cache_utils import Cache


class RollingStateCache(Cache):
    """Per layer the last W-1 mixer inputs of every row, and each row's next position.

    ``seen`` counts the tokens fed so far (prompt columns included, padding too); ``positions`` (B,) is each
    row's next position id (padding excluded). Built by the model's prefill, advanced by each decode step.
    """

    is_compileable = False

    def __init__(self, num_layers: int, batch_size: int, window: int, hidden_size: int,
                 device: torch.device | str, dtype: torch.dtype = torch.float32):
        super().__init__(layers=[])
        self.window = window
        # (B, 2, W, d) per layer: two copies of the ring side by side, viewed as (B, 2W, d) for reading.
        self.rings = [torch.zeros(batch_size, 2, window, hidden_size, device=device, dtype=dtype)
                      for _ in range(num_layers)]
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_position = -1  # positions.max() kept as a Python int: no device sync per step
        self.seen = 0

    # ------------------------------------------------------------------------------ the model's side

    def fill(self, layer: int, inputs: torch.Tensor) -> None:
        """Prefill: ``inputs`` (B, T, d) are the layer's mixer inputs for the ``seen``..``seen+T-1`` tokens
        (zeros at padding). Keeps the last W-1 of them in the ring."""
        ring, W = self.rings[layer], self.window
        T = inputs.shape[1]
        k = min(W - 1, T)
        if k == 0:
            return
        slots = torch.arange(self.seen + T - k, self.seen + T, device=ring.device) % W  # (k,)
        ring[:, :, slots] = inputs[:, None, T - k:].to(ring.dtype)  # both copies

    def push(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Decode: write this token's mixer input x (B, d); return the window t-W+1..t as a (B, W*d) view."""
        ring, W = self.rings[layer], self.window
        p = self.seen % W
        ring[:, :, p] = x[:, None]
        return ring.view(ring.shape[0], 2 * W, -1)[:, p + 1: p + 1 + W].flatten(1)

    def advance(self, tokens: int, positions: torch.Tensor | None = None) -> None:
        """After a forward of ``tokens`` columns: new next positions (prefill) or one more each (decode)."""
        self.seen += tokens
        if positions is not None:
            self.positions = positions
            self.max_position = int(positions.max()) if positions.numel() else 0
        else:
            self.positions = self.positions + tokens
            self.max_position += tokens

    # ------------------------------------------------------------------ what transformers' generate calls

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return int(self.positions.shape[0])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows ``beam_idx`` picks."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.rings = [r.index_select(0, indices.to(r.device)) for r in self.rings]
        self.positions = self.positions.index_select(0, indices.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.rings = [r.repeat_interleave(repeats, dim=0) for r in self.rings]
        self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def reset(self) -> None:
        for r in self.rings:
            r.zero_()
        self.positions.zero_()
        self.max_position, self.seen = -1, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a rolling window state cannot forget tokens (no assisted generation)")

    def state_bytes_per_sequence(self) -> int:
        """Bytes of state one row holds, whatever its length."""
        return sum(r[:1].numel() * r.element_size() for r in self.rings) + self.positions.element_size()

    def __repr__(self) -> str:
        return (f"RollingStateCache(layers={len(self.rings)}, batch={self.batch_size}, window={self.window}, "
                f"seen={self.seen})")


def pick_next(logits: torch.Tensor, temperature: float, top_k: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax at temperature 0, else a sample from the tempered top-k."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                    eos_token_id: int | Iterable[int] | None = None, pad_token_id: int | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy or sampled generation with the rolling state; ``model.generate_fast`` calls this.

    Prompts may be left-padded (give ``attention_mask``). Returns (B, T + new) ids; rows that hit eos are
    padded after it, and the loop stops when every row has.
    """
    was_training = model.training
    model.eval()
    try:
        eos_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=input_ids.device)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
        logits, state = model.prefill(input_ids, attention_mask)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        out = input_ids.new_full((input_ids.shape[0], input_ids.shape[1] + max_new_tokens), pad)
        out[:, : input_ids.shape[1]] = input_ids
        n = input_ids.shape[1]
        for i in range(max_new_tokens):
            nxt = pick_next(logits, temperature, top_k, generator)  # (B,)
            if eos.numel():
                nxt = torch.where(done, pad, nxt)
                done |= torch.isin(nxt, eos)
            out[:, n] = nxt
            n += 1
            if i == max_new_tokens - 1 or (eos.numel() and bool(done.all())):
                break
            logits = model.decode_step(nxt, state)
        return out[:, :n]
    finally:
        model.train(was_training)
