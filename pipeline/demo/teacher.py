"""A small teacher of the real ``Qwen2ForCausalLM`` class, trained briefly on the CPU on the demo data.

Supervision follows the cache's alignment convention: on chat-formatted rows (default system prompt,
user = question, assistant = answer), the targets are the assistant's tokens and the closing
``<|im_end|>``. The result is saved with ``save_pretrained`` (generation eos = ``<|im_end|>``), so stage one
loads it exactly like ``Qwen/Qwen2-0.5B-Instruct``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cache.util import UserError
from pipeline.data import format_example


@dataclass(frozen=True)
class TeacherConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_length: int = 512
    eval_rows: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise UserError(f"hidden_size={self.hidden_size} must split into {self.num_heads} heads of even "
                            "size; pick hidden_size a multiple of 2 * num_heads")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
                            f"{self.num_kv_heads}")
        for name in ("num_layers", "intermediate_size", "steps", "batch_size", "max_length", "eval_rows"):
            if getattr(self, name) < 1:
                raise UserError(f"teacher {name}={getattr(self, name)} must be at least 1")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup_steps >= 0):
            raise UserError(f"teacher schedule lr={self.lr}, min_lr_ratio={self.min_lr_ratio}, "
                            f"warmup_steps={self.warmup_steps}: need lr > 0, 0 <= ratio <= 1, warmup >= 0")


def encode_chat_rows(tokenizer, rows: Sequence[dict], max_length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Chat-format and tokenize ``{"question", "answer"}`` rows exactly as stage one does.

    Returns ``(input_ids int64 [L], loss_mask bool [L])`` per row; the sequence ends with ``<|im_end|>`` and
    ``loss_mask`` marks the assistant's tokens and that ``<|im_end|>``. Rows longer than ``max_length`` are
    dropped.
    """
    out = []
    for row in rows:
        ids, start = format_example(tokenizer, row["question"], row["answer"])
        if len(ids) > max_length:
            continue
        mask = np.zeros(len(ids), dtype=bool)
        mask[start:] = True
        out.append((np.asarray(ids, dtype=np.int64), mask))
    return out


def _batch(encoded: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)    # (B, L), right-padded
    mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for i, (x, m) in enumerate(encoded):
        ids[i, : len(x)] = torch.from_numpy(x)
        mask[i, : len(m)] = torch.from_numpy(m)
    return ids, mask


def _masked_ce(model, ids, mask) -> tuple:
    """Summed next-token CE over supervised positions, and their count and correct top-1 count."""
    import torch.nn.functional as F

    # Right padding under a causal mask never reaches a real position, so no attention_mask is needed.
    logits = model(input_ids=ids).logits[:, :-1]          # (B, L-1, V): logits at t predict ids[t+1]
    target_mask = mask[:, 1:]
    rows = logits[target_mask].float()                     # (n, V)
    targets = ids[:, 1:][target_mask]                      # (n,)
    loss = F.cross_entropy(rows, targets, reduction="sum")
    return loss, int(target_mask.sum()), int((rows.argmax(-1) == targets).sum())


def evaluate_teacher(model, encoded: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int,
                     batch_size: int = 32) -> dict:
    """Cross-entropy per supervised token (nats), perplexity and top-1 accuracy on ``encoded`` rows."""
    import torch

    total, count, correct = 0.0, 0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            loss, n, c = _masked_ce(model, *_batch(encoded[i: i + batch_size], pad_id))
            total, count, correct = total + float(loss), count + n, correct + c
    model.train(was_training)
    ce = total / max(1, count)
    return {"ce": ce, "ppl": math.exp(ce), "top1": correct / max(1, count), "tokens": count}


def build_teacher_model(vocab_size: int, tokenizer, cfg: TeacherConfig):
    """A randomly initialised ``Qwen2ForCausalLM`` with tied embeddings and the tokenizer's special ids."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(cfg.seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_length,
        tie_word_embeddings=True, bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


def train_teacher(tokenizer, train_rows: Sequence[dict], val_rows: Sequence[dict], out_dir: str | Path,
                  cfg: TeacherConfig, log: Callable[[str], None] | None = None,
                  after_step: Callable[[int, object], None] | None = None) -> dict:
    """Train the teacher on the assistant tokens of ``train_rows``, save it into ``out_dir``, return stats.

    ``after_step(step, model)`` (1-based step) lets a caller look at the model during training. Stats
    include the validation CE (nats per supervised token) before and after training, the uniform baseline
    ``ln(vocab)`` and the training loss curve.
    """
    import torch

    from student.schedule import ScheduleConfig, lr_at, set_lr

    start, cpu_start = time.perf_counter(), time.process_time()
    pad_id = tokenizer.pad_token_id
    train = encode_chat_rows(tokenizer, train_rows, cfg.max_length)
    val = encode_chat_rows(tokenizer, val_rows, cfg.max_length)[: cfg.eval_rows]
    if not train or not val:
        raise UserError(f"no demo rows fit max_length={cfg.max_length}; raise the teacher's max_length")
    model = build_teacher_model(len(tokenizer), tokenizer, cfg).train()
    val_before = evaluate_teacher(model, val, pad_id)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = ScheduleConfig(lr=cfg.lr, min_lr=cfg.lr * cfg.min_lr_ratio,
                           warmup_steps=min(cfg.warmup_steps, cfg.steps), total_steps=cfg.steps)
    rng = np.random.default_rng(cfg.seed)
    curve: list[float] = []
    train_tokens = 0
    for step in range(cfg.steps):
        set_lr(opt, lr_at(step, sched))
        picks = rng.choice(len(train), size=min(cfg.batch_size, len(train)), replace=False)
        loss_sum, n, _ = _masked_ce(model, *_batch([train[i] for i in picks], pad_id))
        loss = loss_sum / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(loss.item())
        train_tokens += n
        if log is not None and (step % 50 == 0 or step == cfg.steps - 1):
            log(f"teacher step {step + 1}/{cfg.steps} loss {curve[-1]:.3f}")
        if after_step is not None:
            after_step(step + 1, model)
    model.eval()
    val_after = evaluate_teacher(model, val, pad_id)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = pad_id
    model.save_pretrained(out_dir)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "config": asdict(cfg),
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "uniform_ce": math.log(len(tokenizer)),
        "val_before": val_before,
        "val": val_after,
        "train_loss_curve": curve,
        "train_supervised_tokens": train_tokens,
        "train_rows": len(train),
        "wall_s": wall,
        "cpu_s": cpu,
    }
