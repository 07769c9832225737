"""A small ``Qwen2ForCausalLM`` with the real Qwen2 tokenizer and vocabulary (151,936), trained a few minutes
on chat-formatted GSM8K train rows: a teacher whose next-token distributions are shaped like a trained model's
(peaked on digits and frequent tokens), unlike a random-weight model's near-uniform ones. Used by
``bench/bench_cache_encodings.py`` to measure the cache encodings on realistic distributions.

To fit a few CPU minutes, training computes an exact softmax over the ids that occur in the training text
(about 6% of the vocabulary) plus one class standing for the N other ids, which all share one output row
``w_other`` (its logit is ``h . w_other + log N``, the log of their summed probability). The saved model
gives every other id that row plus small noise (so their order is not a tie): a full-vocabulary model whose
distribution is the trained one, mass on unseen ids included.

    nice -n 5 python bench/train_gsm8k_teacher.py --out /tmp/gsm8k-teacher --minutes 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data import DataConfig, load_tokenized, load_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="Folder for the trained model (save_pretrained).")
    ap.add_argument("--minutes", type=float, default=4.0, help="Training wall-clock budget.")
    ap.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "qwen2"))
    ap.add_argument("--dataset", default=str(SHARED / "data" / "gsm8k" / "train.jsonl"))
    ap.add_argument("--batch", type=int, default=8, help="Sequences per step.")
    ap.add_argument("--max-length", type=int, default=192, help="Tokens per sequence (longer rows dropped).")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (keep the shared CPU usable).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.tokenizer)
    data = load_tokenized(tok, DataConfig(dataset=args.dataset, limit=4000, max_length=args.max_length))
    seqs = [s.input_ids.astype(np.int64) for s in data.seqs]
    cfg = Qwen2Config(vocab_size=151936, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    seen = torch.from_numpy(np.unique(np.concatenate(seqs)))
    remap = torch.full((cfg.vocab_size,), -100, dtype=torch.long)
    remap[seen] = torch.arange(len(seen))
    n_other = cfg.vocab_size - len(seen)
    w_other = torch.nn.Parameter(torch.zeros(cfg.hidden_size))
    opt = torch.optim.AdamW([*model.parameters(), w_other], lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    t0, step, log = time.time(), 0, []
    while time.time() - t0 < args.minutes * 60:
        idx = rng.choice(len(seqs), args.batch, replace=False)
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((args.batch, width), pad, dtype=torch.long)
        labels = torch.full((args.batch, width), -100, dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, : len(seqs[i])] = torch.from_numpy(seqs[i])
            labels[b, : len(seqs[i])] = torch.from_numpy(seqs[i])
        attn = (labels != -100).long()
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
        logits = torch.cat([hidden @ model.lm_head.weight[seen].T,  # the ids of the training text ...
                            (hidden @ w_other + float(np.log(n_other)))[..., None]], -1)  # ... and the rest
        target = torch.where(labels[:, 1:] >= 0, remap[labels[:, 1:].clamp_min(0)], -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(seen) + 1), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 10 == 0:
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    with torch.no_grad():
        other = torch.ones(cfg.vocab_size, dtype=torch.bool)
        other[seen] = False
        noise = torch.randn(int(other.sum()), cfg.hidden_size) * 0.01
        model.lm_head.weight[other] = w_other.detach() + noise
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    (args.out / "train_log.json").write_text(json.dumps({"steps": step, "log": log, "config": vars(args)},
                                                         default=str, indent=1))
    print(f"saved {args.out} after {step} steps ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
