"""The causal STFT FNet student against the research definition of its mixing layer (windowed 2-D FFT)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from student.modeling import (
    CausalFNetConfig,
    CausalFNetForCausalLM,
    CausalFNetModel,
    ModelInputError,
    causal_stft_mix,
    compact_ids_from_cache,
    compact_model,
    count_parameters,
    stft_kernel,
    student_config,
)


def reference_stft_mix(x: torch.Tensor, projection: nn.Linear, window: int) -> torch.Tensor:
    """The research formulation: zero-pad, strided (B, T, W, d) windows, Re fftn, flatten, linear."""
    B, T, d = x.shape
    xp = F.pad(x, (0, 0, window - 1, 0))  # (B, T + W - 1, d)
    s = xp.stride()
    windows = xp.as_strided((B, T, window, d), (s[0], s[1], s[1], s[2]))  # (B, T, W, d)
    return projection(torch.fft.fftn(windows, dim=(-2, -1)).real.reshape(B, T, window * d))


def use_reference(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose mixing layers run the reference formulation."""
    ref = copy.deepcopy(model)
    for block in ref.encoder:
        mixer = block.causal_stft
        mixer.forward = lambda x, m=mixer: reference_stft_mix(x, m.projection, m.window)
    return ref


def tiny_config(**kw) -> CausalFNetConfig:
    base = dict(vocab_size=97, hidden_size=12, num_hidden_layers=2, intermediate_size=24, stft_window_size=5,
                max_position_embeddings=64, hidden_dropout_prob=0.0, pad_token_id=0)
    return CausalFNetConfig(**{**base, **kw})


def tiny_model(seed: int = 0, **kw) -> CausalFNetForCausalLM:
    torch.manual_seed(seed)
    model = CausalFNetForCausalLM(tiny_config(**kw)).eval()
    with torch.no_grad():  # larger weights than the init so that layers differ visibly from identity
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------ the layer itself


@pytest.mark.parametrize("W,d", [(5, 12), (4, 7), (1, 6), (3, 1)])
def test_kernel_is_re_fft2_of_projection_rows(W, d):
    torch.manual_seed(0)
    weight = torch.randn(9, W * d, dtype=torch.float64)
    expected = torch.fft.fft2(weight.reshape(9, W, d)).real
    torch.testing.assert_close(stft_kernel(weight, W).double(), expected, atol=1e-4, rtol=1e-4)


def test_layer_is_the_convolution_with_that_kernel_written_out():
    # out[t] = b + sum_w K[:, w, :] @ x[t - W + 1 + w], a plain loop, against the windowed-FFT reference.
    torch.manual_seed(1)
    B, T, W, d = 2, 7, 3, 5
    proj = nn.Linear(W * d, d).double()
    x = torch.randn(B, T, d, dtype=torch.float64)
    K = torch.fft.fft2(proj.weight.reshape(d, W, d)).real  # (d_out, W, d)
    xp = F.pad(x, (0, 0, W - 1, 0))
    loop = torch.stack([proj.bias + sum(xp[:, t + w] @ K[:, w].T for w in range(W)) for t in range(T)], 1)
    torch.testing.assert_close(loop, reference_stft_mix(x, proj, W))


def test_the_benchmarks_baseline_is_this_reference(monkeypatch):
    """bench/bench_student.py times its own copy of the research formulation (benchmarks import no test);
    it must be the formula these tests hold as the reference."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_student import reference_stft_mix as bench_reference

    torch.manual_seed(3)
    proj = nn.Linear(4 * 5, 5).double()
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    torch.testing.assert_close(bench_reference(x, proj, 4), reference_stft_mix(x, proj, 4), atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["conv", "fft", "auto"])
@pytest.mark.parametrize("B,T,W", [(1, 9, 4), (3, 8, 8), (2, 6, 11), (2, 1, 3), (2, 13, 1), (2, 23, 5)])
def test_fast_mix_matches_reference_values_and_gradients(impl, B, T, W):
    torch.manual_seed(2)
    d = 6
    proj = nn.Linear(W * d, d)
    x = torch.randn(B, T, d, requires_grad=True)
    ref = reference_stft_mix(x, proj, W)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, proj.weight, proj.bias), g)

    fast = causal_stft_mix(x, stft_kernel(proj.weight, W), proj.bias, impl)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)
    fast_grads = torch.autograd.grad(fast, (x, proj.weight, proj.bias), g)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_fft_conv_gradients_pass_gradcheck():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    from student.modeling import _FFTCausalConv

    # the Function computes in the dtype it is given; fp64 here for gradcheck
    assert torch.autograd.gradcheck(_FFTCausalConv.apply, (x, k))
    x = torch.randn(2, 11, 3, dtype=torch.float64, requires_grad=True)  # 4 blocks of 3, the last one short
    assert torch.autograd.gradcheck(_FFTCausalConv.apply, (x, k))


@pytest.mark.parametrize("W,d,taps", [(6, 5, 2), (6, 4, 6), (7, 8, 3), (5, 6, 1), (4, 3, 9)])
def test_kernel_taps_are_the_last_rows_of_the_full_kernel(W, d, taps):
    torch.manual_seed(4)
    weight = torch.randn(3, W * d, dtype=torch.float64, requires_grad=True)
    part = stft_kernel(weight, W, taps)
    full = torch.fft.fft2(weight.reshape(3, W, d)).real  # (3, W, d)
    torch.testing.assert_close(part.double(), full[:, W - min(W, taps):], atol=1e-4, rtol=1e-4)
    g = torch.randn_like(part)
    got = torch.autograd.grad(part, weight, g)[0]
    want = torch.autograd.grad(full[:, W - min(W, taps):], weight, g.double())[0]
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("W,d,taps", [(6, 5, 2), (6, 4, 6), (7, 8, 3), (5, 6, 1), (4, 2, 4)])
def test_kernel_gradient_map_is_the_adjoint_of_the_kernel(W, d, taps):
    from student.modeling import stft_kernel_grad

    torch.manual_seed(8)
    weight = torch.randn(3, W * d, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, taps, d, dtype=torch.float64)
    want = torch.autograd.grad(torch.fft.fft2(weight.reshape(3, W, d)).real[:, W - taps:], weight, g)[0]
    torch.testing.assert_close(stft_kernel_grad(g, W).double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["conv", "fft"])
def test_shared_kernels_with_max_len_match_reference_gradients(impl):
    model = tiny_model(stft_window_size=16, stft_impl=impl).train()
    ref = use_reference(model).train()
    batches = [torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (3, 4))]
    with model.shared_kernels(max_len=6):
        assert all(b.causal_stft._shared.shape[1] == 6 for b in model.encoder)
        for ids in batches:
            model(ids).logits.square().mean().backward()
        with pytest.raises(ModelInputError, match="max_len"):
            model(torch.randint(0, 97, (1, 7)))
    for ids in batches:
        ref(ids).logits.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-3, msg=name)


def test_auto_takes_the_fft_route_past_the_crossover_and_agrees_with_conv(monkeypatch):
    import student.modeling as modeling

    torch.manual_seed(5)
    calls = []
    original = modeling._FFTCausalConv.apply
    monkeypatch.setattr(modeling._FFTCausalConv, "apply", lambda *a: calls.append(a[1].shape) or original(*a))
    L = modeling.FFT_CROSSOVER["cpu"]
    T = max(modeling.FFT_MIN_TOKENS, modeling.FFT_MIN_TOKENS_PER_TAP * L)
    x = torch.randn(1, T, 4, requires_grad=True)
    k = torch.randn(4, 2 * L, 4, requires_grad=True)
    bias = torch.randn(4)
    g = torch.randn(1, T, 4)
    auto = causal_stft_mix(x, k[:, L:], bias, "auto")
    assert calls == [(4, L, 4)]
    conv = causal_stft_mix(x, k[:, L:], bias, "conv")
    torch.testing.assert_close(auto, conv, atol=1e-4, rtol=1e-4)
    for a, b in zip(torch.autograd.grad(auto, (x, k), g), torch.autograd.grad(conv, (x, k), g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    causal_stft_mix(x[:, : T // 2], k[:, L:], bias, "auto")  # too few tokens: conv1d
    assert len(calls) == 1


def test_fft_conv_takes_non_contiguous_inputs_and_gradients():
    from student.modeling import _FFTCausalConv

    torch.manual_seed(6)
    x = torch.randn(2, 3, 12).transpose(1, 2).requires_grad_()  # (B, T, d), T a whole number of blocks
    k = torch.randn(4, 3, 3, requires_grad=True)
    w = torch.randn(2, 4, 12)
    fft = torch.autograd.grad((_FFTCausalConv.apply(x, k).transpose(1, 2) * w).sum(), (x, k))
    conv = torch.autograd.grad((causal_stft_mix(x, k, None, "conv").transpose(1, 2) * w).sum(), (x, k))
    for a, b in zip(fft, conv):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fast_path_builds_no_window_tensor():
    # No tensor of B*T*W*d elements may be allocated by the fast layer (saved or temporary).
    B, T, W, d = 2, 32, 16, 8
    proj = nn.Linear(W * d, d)
    x = torch.randn(B, T, d, requires_grad=True)
    sizes = []
    for impl in ("conv", "fft"):
        with torch.profiler.profile(profile_memory=True) as prof:
            causal_stft_mix(x, stft_kernel(proj.weight, W), proj.bias, impl).sum().backward()
        sizes += [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert sizes and max(sizes) < B * T * W * d * 4


# ------------------------------------------------------------------------------------- the whole model


@pytest.mark.parametrize("T", [3, 5, 9])  # W=5: W > T, W = T, W < T
def test_model_matches_reference_model_logits_and_gradients(T):
    model = tiny_model()
    ref = use_reference(model)
    ids = torch.randint(0, 97, (3, T))
    out, ref_out = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    out.square().mean().backward()
    ref_out.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-3, msg=name)


def test_shared_kernels_with_accumulation_and_checkpointing_match_reference_gradients(monkeypatch):
    import student.modeling_causal_fnet as modeling
    import student.stft as stft

    model = tiny_model(stft_window_size=6).train()
    ref = use_reference(model).train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert all(b.gradient_checkpointing for b in model.encoder)
    calls = []
    count = lambda *a, **kw: calls.append(1) or stft_kernel(*a, **kw)  # noqa: E731
    monkeypatch.setattr(modeling, "stft_kernel", count)  # the build on entry
    monkeypatch.setattr(stft, "stft_kernel", count)  # inside stft_kernel_grad on exit
    batches = [torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (3, 7))]
    with model.shared_kernels():
        for ids in batches:
            model(ids).logits.square().mean().backward()
    assert len(calls) == 2 * len(model.encoder)  # once per layer on entry, once per layer on exit
    for ids in batches:
        ref(ids).logits.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-3, msg=name)
    assert all(b.causal_stft._shared is None for b in model.encoder)


def test_eval_kernel_cache_follows_weight_updates():
    model = tiny_model()
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
        model.encoder[0].causal_stft.projection.weight.mul_(2.0)
        after = model(ids).logits
    torch.testing.assert_close(after, use_reference(model)(ids).logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(before, after)


def test_causality():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 12))
    base = model(ids).logits
    for t in range(11):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, 97, changed[:, t + 1:].shape)
        torch.testing.assert_close(model(changed).logits[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=1e-5)


def test_padding_left_or_right_does_not_change_real_positions():
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 6))
    alone = model(ids).logits
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1).long()
    torch.testing.assert_close(model(left, attention_mask=mask).logits[:, 3:], alone, atol=1e-5, rtol=1e-5)
    right = torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 2)], 1).long()
    torch.testing.assert_close(model(right, attention_mask=mask).logits[:, :6], alone, atol=1e-5, rtol=1e-5)


def test_hidden_states_and_head_split():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 7))
    hidden = model(ids, return_hidden_only=True).hidden_states[0]  # (B, T, d)
    assert hidden.shape == (2, 7, 12)
    torch.testing.assert_close(model.get_output_embeddings()(hidden), model(ids).logits)
    base = CausalFNetModel(model.config)
    base.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(base.eval()(ids).last_hidden_state, hidden)


def test_positions_past_the_limit_are_an_error():
    model = tiny_model(max_position_embeddings=8)
    with pytest.raises(ModelInputError, match="max_position_embeddings"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ModelInputError, match="max_position_embeddings"):
        model.generate_fast(torch.zeros(1, 5, dtype=torch.long), max_new_tokens=6)
    assert model.generate_fast(torch.zeros(1, 5, dtype=torch.long), max_new_tokens=4).shape == (1, 9)


def test_config_validation():
    with pytest.raises(ModelInputError, match="stft_window_size"):
        tiny_config(stft_window_size=0)
    with pytest.raises(ModelInputError, match="vocab_map"):
        tiny_config(vocab_size=3, vocab_map=[5, 2, 7], full_vocab_size=10)


@pytest.mark.parametrize("impl", ["conv", "fft"])
def test_autocast_bf16_runs_and_stays_close(impl):
    torch.manual_seed(0)  # the default init: the weight scale training starts from
    model = CausalFNetForCausalLM(tiny_config(stft_window_size=64, max_position_embeddings=128,
                                              hidden_size=32, stft_impl=impl)).eval()
    ids = torch.randint(0, 97, (2, 70))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids).logits.float()
    high = model(ids).logits
    assert torch.isfinite(low).all()
    assert (low.log_softmax(-1) - high.log_softmax(-1)).abs().max() < 0.1


def test_default_student_size():
    cfg = student_config()
    shape = (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.stft_window_size)
    assert shape == (256, 4, 1024, 32)
    with torch.device("meta"):
        model = CausalFNetForCausalLM(cfg)
    n = count_parameters(model)
    blocks = 4 * (32 * 256 * 256 + 256 + 2 * 256 * 1024 + 1024 + 256 + 4 * 256)
    assert n == 151_936 * 256 + 1024 * 256 + 2 * 256 + blocks


# ------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("W", [1, 5, 16])
def test_incremental_decode_matches_full_forward_at_every_step(W):
    model = tiny_model(stft_window_size=W)
    ids = torch.randint(0, 97, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded
    full = model(ids, attention_mask=mask).logits
    logits, state = model.prefill(ids[:, :4], mask[:, :4])
    torch.testing.assert_close(logits, full[:, 3], atol=1e-5, rtol=1e-5)
    for t in range(4, 14):
        logits = model.decode_step(ids[:, t], state)
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-5)


def test_hf_generate_greedy_matches_fast_decoder_with_padding():
    model = tiny_model(stft_window_size=4)
    ids = torch.randint(1, 97, (2, 6))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    fast = model.generate_fast(ids, mask, max_new_tokens=10)
    assert torch.equal(hf, fast)


def test_generation_stops_at_eos_and_samples_with_a_seed():
    model = tiny_model(stft_window_size=4)
    ids = torch.randint(1, 97, (1, 5))
    greedy = model.generate_fast(ids, max_new_tokens=8)
    eos = int(greedy[0, 7])  # the third new token
    stopped = model.generate_fast(ids, max_new_tokens=8, eos_token_id=eos)
    first = int((greedy[0, 5:] == eos).nonzero()[0]) + 5
    assert torch.equal(stopped[0], greedy[0, : first + 1])
    hf = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(hf[0, : first + 1], stopped[0])
    a = model.generate_fast(ids, max_new_tokens=6, temperature=1.0, top_k=5,
                            generator=torch.Generator().manual_seed(0))
    b = model.generate_fast(ids, max_new_tokens=6, temperature=1.0, top_k=5,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (1, 11)
    sampled = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=5, pad_token_id=0)
    assert sampled.shape == (1, 11)


# ---------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_through_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "causal_stft_fnet"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, CausalFNetForCausalLM)
    assert loaded.lm_head.weight.data_ptr() == loaded.embeddings.word_embeddings.weight.data_ptr()
    ids = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_research_checkpoint_as_pytorch_model_bin_loads(tmp_path):
    # The research code wrote a plain state dict with these names (lm_head included, tied) + config.json.
    from transformers import AutoModelForCausalLM

    model = tiny_model(tie_word_embeddings=False)
    model.config.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert "encoder.1.causal_stft.projection.weight" in state and "embeddings.pos_embeddings.weight" in state
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


# ----------------------------------------------------------------------------- vocabulary compaction


class _FakeRecord:
    def __init__(self, input_ids, topk_ids, sample_ids=None):
        self.input_ids = np.asarray(input_ids, dtype=np.int32)
        self.topk_ids = np.asarray(topk_ids, dtype=np.int32)
        self.sample_ids = None if sample_ids is None else np.asarray(sample_ids, dtype=np.int32)


def test_compact_ids_from_cache_collects_every_id():
    records = [_FakeRecord([5, 9, 9, 3], [[9, 40], [3, 41]]), _FakeRecord([3, 7], [[7, 60]], [61, 3])]
    ids = compact_ids_from_cache(records, special_ids=[96, 0])
    assert ids.tolist() == [0, 3, 5, 7, 9, 40, 41, 60, 61, 96]


def test_compacted_model_gives_the_same_probabilities_on_its_ids(tmp_path):
    from transformers import AutoModelForCausalLM

    full = tiny_model()
    vm = [0, 2, 3, 5, 8, 13, 21, 34, 55, 89, 90, 96]
    small = compact_model(full, vm).eval()
    assert small.lm_head.weight.shape == (12, 12) and small.config.vocab_size == 12
    ids = torch.tensor([[3, 5, 8, 13, 21, 0, 96], [2, 2, 89, 90, 55, 34, 3]])
    ref = full(ids).logits[..., vm]
    rows = small(ids, compact_logits=True).logits  # (B, T, 12): the model's own rows
    torch.testing.assert_close(rows, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.log_softmax(rows, -1), torch.log_softmax(ref, -1), atol=1e-5, rtol=1e-5)
    wide = small(ids).logits  # (B, T, 97) over tokenizer ids: what scoring tools and generate read
    assert wide.shape[-1] == 97 and torch.isinf(wide[..., 1]).all()
    assert torch.equal(wide[..., vm], rows)
    torch.testing.assert_close(wide.softmax(-1)[..., vm], ref.softmax(-1), atol=1e-6, rtol=1e-5)
    assert wide.softmax(-1)[..., [i for i in range(97) if i not in vm]].max() == 0
    assert small.map_to_compact(torch.tensor([0, 1, 96])).tolist() == [0, -1, 11]

    out = small.generate_fast(ids[:1, :3], max_new_tokens=5)
    assert set(out[0].tolist()) <= set(vm)
    assert torch.equal(out, small.generate(ids[:1, :3], max_new_tokens=5, do_sample=False, pad_token_id=0))

    small.save_pretrained(tmp_path / "c")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    assert loaded.config.vocab_map == vm and loaded.config.full_vocab_size == 97
    torch.testing.assert_close(loaded(ids).logits, small(ids).logits)
    with torch.no_grad():  # an id outside the map is read as a zero word vector, not an error
        assert torch.isfinite(loaded(torch.tensor([[1, 3]]), compact_logits=True).logits).all()


@pytest.mark.slow
def test_torch_compile_matches_eager_values_and_gradients():
    model = tiny_model().train()
    ids = torch.randint(0, 97, (2, 9))
    eager = model(ids).logits
    eager.square().mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)(ids).logits
    compiled.square().mean().backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_of_the_fft_route_from_a_cold_dft_cache(monkeypatch):
    """The first FFT call of a process may happen inside a graph being compiled (``train-student --compile``
    with no evaluation before the first step): the DFT matrices are then built in the graph and not stored
    in the module's cache, and values and gradients match the eager direct convolution."""
    from student import stft

    monkeypatch.setattr(stft, "_DFT", {})
    torch.manual_seed(0)
    x = torch.randn(2, 40, 6, requires_grad=True)
    kernel = torch.randn(5, 16, 6, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    got = torch.compile(lambda a, k, b: causal_stft_mix(a, k, b, impl="fft"))(x, kernel, bias)
    got_grads = torch.autograd.grad(got.square().sum(), (x, kernel, bias))
    assert stft._DFT == {}  # nothing stored from inside the traced graph
    want = causal_stft_mix(x, kernel, bias, impl="conv")
    want_grads = torch.autograd.grad(want.square().sum(), (x, kernel, bias))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-4)
