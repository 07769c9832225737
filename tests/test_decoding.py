"""``model.generate()`` on the rolling window state: same tokens as the fast decoder and as a full forward at
every step, and a cost per token that does not grow with the prefix."""

from __future__ import annotations

import pytest
import torch
from tiny_student import EOS, PAD, save_student, tiny_student, tiny_tokenizer  # tests/ is on sys.path


def greedy_by_full_forward(model, ids, mask, new_tokens, eos):
    """The independent reference: recompute the whole (left-padded) sequence for every new token."""
    ids, mask = ids.clone(), mask.clone()
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(new_tokens):
        with torch.no_grad():
            nxt = model(ids, attention_mask=mask).logits[:, -1].argmax(-1)
        nxt = torch.where(done, PAD, nxt)
        done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if done.all():
            break
    return ids


def padded_batch():
    ids = torch.tensor([[PAD, PAD, PAD, 13, 14, 15], [16, 3, 17, 4, 18, 5], [PAD, 20, 21, 22, 23, 7]])
    return ids, (ids != PAD).long()


def test_generate_greedy_equals_fast_decoder_and_full_forward_with_padding_and_eos():
    model = tiny_student(stft_window_size=3)
    ids, mask = padded_batch()
    free = model.generate_fast(ids, mask, max_new_tokens=12)
    eos = int(free[0, 6 + 3])  # the fourth new token of row 0 becomes "eos": rows stop at different steps
    model.generation_config.eos_token_id = eos
    ref = greedy_by_full_forward(model, ids, mask, 12, eos)
    fast = model.generate_fast(ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                        pad_token_id=PAD)
    assert (ref == eos).any(1)[0]  # eos stopping is exercised
    assert torch.equal(fast, ref)
    assert torch.equal(hf, ref)


def test_compacted_student_generate_matches_its_full_model():
    from student.modeling import compact_model

    full = tiny_student()
    ids, mask = padded_batch()
    out = full.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    # The map holds every token the full model emits, so its argmax over the map is the full argmax.
    small = compact_model(full, set(out.flatten().tolist()) | {PAD, EOS} | set(range(30, 36)))
    assert small.config.vocab_size < 39
    hf = small.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(hf, out)
    assert torch.equal(small.generate_fast(ids, mask, max_new_tokens=6), out)


def test_sampling_with_a_seed_is_reproducible_and_matches_the_fast_decoder():
    model = tiny_student()
    ids, mask = padded_batch()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=5,
                                   temperature=0.8, pad_token_id=PAD))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(123)  # the fast decoder draws from the same global generator in the same order
    fast = model.generate_fast(ids, mask, max_new_tokens=10, temperature=0.8, top_k=5)
    assert torch.equal(fast, runs[0])


def test_cost_per_token_does_not_grow_with_the_prefix():
    # Count the positions the model processes per forward call: the prompt once, then one per row and step,
    # however long the sequence gets (a recomputing generate would process 6, 7, 8, ... positions per row).
    model = tiny_student(max_position_embeddings=128)
    ids, mask = padded_batch()
    seen = []
    hook = model.embeddings.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                             pad_token_id=PAD)
    finally:
        hook.remove()
    assert out.shape == (3, 46)
    assert seen[0] == (3, 6) and seen[1:] == [(3, 1)] * 39
    state = model(ids, attention_mask=mask, use_cache=True).cache
    before = state.state_bytes_per_sequence()
    with torch.no_grad():
        for t in range(30):
            model(torch.full((3, 1), 13), cache=state)
    assert state.seen == 36 and state.state_bytes_per_sequence() == before  # constant in length


def test_pipeline_text_generation_gives_the_fast_decoders_text(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    folder = save_student(tiny_student(), tmp_path / "s")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    gen = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    prompt = "the sum of 3 and 4 is"
    text = gen(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = tok(prompt, return_tensors="pt").input_ids
    fast = model.generate_fast(ids, max_new_tokens=8, eos_token_id=EOS)
    assert text == tok.decode(fast[0, ids.shape[1]:], skip_special_tokens=True)
    assert tiny_tokenizer().decode(fast[0]).startswith(prompt)


def test_beam_search_on_the_state_equals_beam_search_recomputing_the_prefix():
    # use_cache=False: transformers feeds the whole sequence each step (no state), an independent route.
    model = tiny_student()
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


def test_a_key_value_cache_is_refused_with_one_line():
    from transformers import DynamicCache

    from student.modeling import ModelInputError

    with pytest.raises(ModelInputError, match="RollingStateCache"):
        tiny_student()(torch.tensor([[13, 14]]), cache=DynamicCache())
