"""The causal STFT FNet student: config, model, fast mixing, incremental decoding, vocabulary compaction.

Reference semantics of the mixing layer at position t (the research definition, kept exactly): take the
hidden vectors at positions t-W+1..t (zeros before position 0) as a (W, d) window, oldest first; take the
real part of its 2-D FFT; flatten it row-major; apply ``projection`` (Linear W*d -> d).

Fast form used here. With DFT matrices F_W, F_d (symmetric) and C, S their cosine/sine parts,
Re(F_W X F_d) = C_W X C_d - S_W X S_d is linear in the window X, so for output unit o

    projection(vec Re FFT2 X)[o] = b[o] + sum_{w,j} P[o, w, j] (C_W X C_d - S_W X S_d)[w, j]
                                 = b[o] + sum_{w,j} K[o, w, j] X[w, j],   K[o] = Re FFT2(P[o])

with P the projection weight viewed as (d, W, d). The layer is therefore a causal 1-D convolution over the
sequence with a (d, d, W) kernel: ``out[t] = b + sum_w K[:, w, :] @ x[t - W + 1 + w]``. The kernel costs
O(W d^2 log(W d)) per weight update and nothing per token; the convolution runs either directly
(``conv1d``, cost ~ T W d^2) or through an FFT over time (cost ~ T log T d^2), picked by a measured
crossover. Only the last min(W, T) taps can touch a length-T sequence, so a longer window costs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from cache.util import UserError

# "auto" uses the block FFT convolution when the effective window L = min(W, T) is at least
# FFT_CROSSOVER[device] and the call has at least max(FFT_MIN_TOKENS, FFT_MIN_TOKENS_PER_TAP * L) tokens
# (B * T); otherwise direct conv1d. The FFT route does ~4 d^2 multiplies per token instead of L d^2, plus
# a kernel-side transform of ~2 L^2 d^2 per call that only enough tokens amortise. CPU values: from the
# "crossover" table of bench/bench_student.py (2-core CPU): FFT won every measured case with L >= 16 and
# B * T >= 256 (1.0x-3.9x), and lost at B * T = 128. CUDA: not measured yet (bench/gpu_check.py
# suggests a value).
FFT_CROSSOVER: dict[str, int | None] = {"cpu": 16, "cuda": 64}
FFT_MIN_TOKENS = 256
FFT_MIN_TOKENS_PER_TAP = 2


# --------------------------------------------------------------------------------------------- config


class CausalFNetConfig(PretrainedConfig):
    """Hyper-parameters of the causal STFT FNet.

    ``vocab_map`` (optional, sorted tokenizer ids) turns on vocabulary compaction: the model then has
    ``len(vocab_map)`` embedding/head rows, still reads tokenizer ids, and ``full_vocab_size`` is the
    tokenizer's id range. ``stft_impl`` picks the mixing kernel: "auto" (measured crossover), "conv", "fft".
    """

    model_type = "causal_stft_fnet"

    def __init__(
        self,
        vocab_size: int = 151_936,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        intermediate_size: int = 1024,
        hidden_dropout_prob: float = 0.1,
        max_position_embeddings: int = 1024,
        stft_window_size: int = 32,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        vocab_map: list[int] | None = None,
        full_vocab_size: int | None = None,
        stft_impl: str = "auto",
        **kwargs,
    ):
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.intermediate_size = int(intermediate_size)
        self.hidden_dropout_prob = float(hidden_dropout_prob)
        self.max_position_embeddings = int(max_position_embeddings)
        self.stft_window_size = int(stft_window_size)
        self.initializer_range = float(initializer_range)
        self.layer_norm_eps = float(layer_norm_eps)
        self.vocab_map = None if vocab_map is None else [int(i) for i in vocab_map]
        self.full_vocab_size = None if full_vocab_size is None else int(full_vocab_size)
        self.stft_impl = stft_impl
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "max_position_embeddings", "stft_window_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}; pass a positive integer")
        if not 0.0 <= self.hidden_dropout_prob < 1.0:
            raise UserError(f"hidden_dropout_prob must be in [0, 1), got {self.hidden_dropout_prob}")
        if self.stft_impl not in ("auto", "conv", "fft"):
            raise UserError(f"stft_impl must be 'auto', 'conv' or 'fft', got {self.stft_impl!r}")
        if self.vocab_map is not None:
            vm = self.vocab_map
            if len(vm) != self.vocab_size:
                raise UserError(f"vocab_map has {len(vm)} ids but vocab_size is {self.vocab_size}; "
                                "they must match")
            if any(b <= a for a, b in zip(vm, vm[1:])):
                raise UserError("vocab_map must be strictly increasing tokenizer ids (sorted, no duplicates)")
            if self.full_vocab_size is None or vm[0] < 0 or vm[-1] >= self.full_vocab_size:
                raise UserError(f"vocab_map ids must lie in [0, full_vocab_size={self.full_vocab_size}); "
                                "set full_vocab_size to the tokenizer's id range")

    @property
    def output_vocab_size(self) -> int:
        """Width of the logits ``generate`` sees: the tokenizer's id range."""
        return self.full_vocab_size if self.vocab_map is not None else self.vocab_size


# ---------------------------------------------------------------------------- the STFT layer, fast form


def stft_kernel(weight: torch.Tensor, window: int, taps: int | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Convolution kernel of the STFT layer: Re FFT2 of each output row of the projection weight.

    weight (d_out, W*d) -> kernel (d_out, taps, d) in fp32: the last ``taps`` (default W) window positions,
    oldest first; a length-T sequence only reaches the last min(W, T). The same map sends a kernel gradient
    back to a weight gradient (it is its own adjoint): ``stft_kernel_grad``. ``out`` (fp32, d_out * taps * d
    elements) receives the result; it may be ``weight`` itself, which is read in full first.
    """
    d_out = weight.shape[0]
    p = weight.float().reshape(d_out, window, -1)  # (d_out, W, d)
    d = p.shape[-1]
    L = window if taps is None else max(1, min(int(taps), window))
    half = torch.fft.rfft2(p).real  # (d_out, W, d//2+1): columns 0..d//2 of Re FFT2
    if d // 2 + 1 == d and L == window and out is None:
        return half
    out = p.new_empty(d_out, L, d) if out is None else out.view(d_out, L, d)
    out[..., : d // 2 + 1] = half[:, window - L:]
    if d // 2 + 1 < d:
        # Hermitian symmetry of a real input, Re X[w, j] = Re X[-w mod W, d - j], gives the other columns:
        # output row W-L+l reads row L-l (row 0 reads row 0), columns reversed.
        hi, cols = slice(d // 2 + 1, d), slice(1, d - d // 2)
        if L == window:
            out[:, 0, hi] = half[:, 0, cols].flip(-1)
            out[:, 1:, hi] = half[:, 1:, cols].flip(1, 2)
        else:
            out[:, :, hi] = half[:, 1:L + 1, cols].flip(1, 2)
    return out


def stft_kernel_grad(kernel_grad: torch.Tensor, window: int) -> torch.Tensor:
    """Gradient of the projection weight (d_out, W*d), fp32, from the gradient of a kernel with the last
    ``taps`` window positions (d_out, taps, d): zero-pad the missing older taps and apply the same map."""
    d_out, taps, d = kernel_grad.shape
    full = kernel_grad.new_empty(d_out, window, d, dtype=torch.float32)
    full[:, : window - taps].zero_()
    full[:, window - taps:] = kernel_grad
    return stft_kernel(full.view(d_out, -1), window, out=full).view(d_out, -1)


_DFT: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _dft_matrices(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Real forms of the length-n real DFT, F = n//2 + 1 frequencies, rows/columns ordered (f, re|im).

    forward (2F, n): [Re; Im] of rfft as a matrix. inverse (n, 2F): irfft of a spectrum given as (f, re|im)
    pairs (its weights c_f / n, c = 1 at f = 0 and n/2, else 2). Built in fp64, cached per size and dtype.
    """
    key = (n, device, dtype)
    if key not in _DFT:
        f = torch.arange(n // 2 + 1, dtype=torch.float64)
        ang = 2 * np.pi * f[:, None] * torch.arange(n, dtype=torch.float64) / n  # (F, n)
        pair = torch.stack([ang.cos(), -ang.sin()], 1)  # (F, 2, n)
        c = torch.full_like(f, 2.0)
        c[0] = 1.0
        if n % 2 == 0:
            c[-1] = 1.0
        inverse = (pair * (c / n)[:, None, None]).reshape(-1, n).T
        forward = pair.reshape(-1, n)
        _DFT[key] = (forward.to(device, dtype).contiguous(), inverse.to(device, dtype).contiguous())
    return _DFT[key]


def _time_blocks(x: torch.Tensor, N: int) -> torch.Tensor:
    """(B, T, d) -> (N, B, nb, d): time split into nb = ceil(T / N) blocks of N, zero-padded at the end."""
    B, T, d = x.shape
    nb = -(-T // N)
    return F.pad(x, (0, 0, 0, nb * N - T)).view(B, nb, N, d).permute(2, 0, 1, 3)


def _from_time_blocks(blocks: torch.Tensor, T: int) -> torch.Tensor:
    """(N, B, nb, d) -> (B, T, d)."""
    N, B, nb, d = blocks.shape
    return blocks.permute(1, 2, 0, 3).reshape(B, nb * N, d)[:, :T]


class _FFTCausalConv(torch.autograd.Function):
    """out[b, t] = sum_s taps[:, L-1-s, :] @ x[b, t-s] by block (overlap-add) FFT convolution.

    Time is cut into blocks of N = L; each block's length-2N spectrum times the kernel's length-2N spectrum
    is the block's full linear convolution, whose two halves land on this block and the next. The DFTs of
    these short blocks are small real matmuls, and the per-frequency complex products are ONE real bmm,
    (F, 2R, 2d_in) @ (F, 2d_in, d_out) with rows [Xr, -Xi] / [Xi, Xr] against [Hr; Hi], R = B * blocks.
    Saves only x and the taps; the spectra are recomputed in backward.
    """

    @staticmethod
    def _kernel_freq(taps: torch.Tensor, n: int) -> torch.Tensor:
        d_out, L, d_in = taps.shape
        fwd, _ = _dft_matrices(n, taps.device, taps.dtype)
        h = torch.matmul(fwd[:, :L].flip(1), taps)  # (d_out, 2F, d_in): lag s = L-1-w, so flipped columns
        return h.view(d_out, n // 2 + 1, 2 * d_in).permute(1, 2, 0)  # (F, [Hr; Hi], d_out), a strided view

    @staticmethod
    def _input_freq(x: torch.Tensor, N: int) -> torch.Tensor:
        n = 2 * N
        fwd, _ = _dft_matrices(n, x.device, x.dtype)
        xb = _time_blocks(x, N)  # (N, B, nb, d)
        R = xb.shape[1] * xb.shape[2]
        xf = (fwd[:, :N] @ xb.reshape(N, -1)).view(n // 2 + 1, 2, R, -1)  # (F, re|im, R, d)
        big = xf.new_empty(n // 2 + 1, 2, R, 2, xf.shape[-1])  # rows [Xr, -Xi] then [Xi, Xr]
        big[:, 0, :, 0] = big[:, 1, :, 1] = xf[:, 0]
        big[:, 1, :, 0] = xf[:, 1]
        big[:, 0, :, 1] = xf[:, 1]
        big[:, 0, :, 1].neg_()
        return big.view(n // 2 + 1, 2 * R, -1)  # (F, 2R, 2d)

    @staticmethod
    def forward(ctx, x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        # x (B, T, d_in), taps (d_out, L, d_in)
        B, T, _ = x.shape
        d_out, N = taps.shape[0], taps.shape[1]
        n = 2 * N
        _, inv = _dft_matrices(n, x.device, x.dtype)
        xf, hf = _FFTCausalConv._input_freq(x, N), _FFTCausalConv._kernel_freq(taps, n)
        z = torch.bmm(xf, hf)  # (F, 2R, d_out)
        zt = (inv @ z.view(n + 2, -1)).view(n, B, -1, d_out)  # (2N, B, nb, d_out): per-block full convolution
        y = zt[:N].clone()
        y[:, :, 1:] += zt[N:, :, :-1]  # second halves spill into the next block
        ctx.save_for_backward(x, taps)
        return _from_time_blocks(y, T)  # (B, T, d_out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, taps = ctx.saved_tensors
        B, T, d_in = x.shape
        d_out, N = taps.shape[0], taps.shape[1]
        n = 2 * N
        fwd, inv = _dft_matrices(n, x.device, x.dtype)
        gb = _time_blocks(grad.to(x.dtype), N)  # (N, B, nb, d_out)
        R = B * gb.shape[2]
        gz = gb.new_zeros(n, *gb.shape[1:])  # adjoint of the overlap-add: (2N, B, nb, d_out)
        gz[:N] = gb
        gz[N:, :, :-1] = gb[:, :, 1:]
        g = (fwd @ gz.view(n, -1)).view(N + 1, 2 * R, d_out)  # (F, [Gr; Gi], d_out)
        gx = gtaps = None
        if ctx.needs_input_grad[0]:
            gbig = torch.bmm(g, _FFTCausalConv._kernel_freq(taps, n).transpose(1, 2))  # (F, 2R, 2d_in)
            top, bottom = gbig[:, :R], gbig[:, R:]
            gxf = torch.stack([top[..., :d_in] + bottom[..., d_in:], bottom[..., :d_in] - top[..., d_in:]], 1)
            gx = (inv[:N] @ gxf.view(n + 2, -1)).view(N, B, -1, d_in)  # (N, B, nb, d_in)
            gx = _from_time_blocks(gx, T)
        if ctx.needs_input_grad[1]:
            # Kernel spectrum gradient as (F, d_out, [re|im, i]), regrouped to (d_out, (f, re|im), i) with
            # contiguous rows of d_in, so that the inverse DFT writes the taps' own (d_out, L, d_in) layout.
            gh = torch.bmm(g.transpose(1, 2), _FFTCausalConv._input_freq(x, N))  # (F, d_out, 2d_in)
            gh = gh.view(N + 1, d_out, 2, d_in).permute(1, 0, 2, 3).reshape(d_out, n + 2, d_in)
            gtaps = torch.matmul(inv[:N].flip(0), gh)  # (d_out, L, d_in)
        return gx, gtaps


def causal_stft_mix(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None,
                    impl: str = "auto") -> torch.Tensor:
    """The STFT layer as a causal convolution. x (B, T, d), kernel (d_out, W, d) -> (B, T, d_out)."""
    T, W = x.shape[1], kernel.shape[1]
    L = min(W, T)
    taps = kernel[:, W - L:]  # (d_out, L, d): only the last min(W, T) taps reach a length-T sequence
    if impl == "auto":
        crossover = FFT_CROSSOVER.get(x.device.type, FFT_CROSSOVER["cuda"])
        tokens = x.shape[0] * T
        enough = crossover is not None and L >= crossover and tokens >= max(FFT_MIN_TOKENS,
                                                                            FFT_MIN_TOKENS_PER_TAP * L)
        impl = "fft" if enough else "conv"
    if impl == "fft":
        with torch.autocast(x.device.type, enabled=False):
            y = _FFTCausalConv.apply(x.float(), taps)  # (B, T, d_out)
            if bias is not None:
                y = y + bias.float()
        return y.to(x.dtype)
    xt = F.pad(x.transpose(1, 2), (L - 1, 0))  # (B, d, T + L - 1)
    y = F.conv1d(xt, taps.permute(0, 2, 1).to(xt.dtype), bias)  # (B, d_out, T)
    return y.transpose(1, 2)


class CausalSTFT(nn.Module):
    def __init__(self, config: CausalFNetConfig):
        super().__init__()
        self.window = config.stft_window_size
        self.impl = config.stft_impl
        self.projection = nn.Linear(self.window * config.hidden_size, config.hidden_size)
        self._shared: torch.Tensor | None = None
        self._cached: torch.Tensor | None = None
        self._cached_key: tuple | None = None

    def kernel(self, length: int | None = None) -> torch.Tensor:
        """(d_out, taps, d) fp32, the last taps of the window. Shared within ``model.shared_kernels()``;
        cached (all W taps) per weight version when no gradient is needed; otherwise recomputed with
        autograd, only the min(W, length) taps a length-``length`` sequence can reach."""
        if self._shared is not None:
            return self._shared
        w = self.projection.weight
        if (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
            return stft_kernel(w, self.window, None if length is None else min(self.window, length))
        key = (w._version, w.data_ptr(), w.device, w.dtype)
        if self._cached_key != key:
            self._cached = stft_kernel(w.detach(), self.window)
            self._cached_key = key
        return self._cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel(x.shape[1])
        if k.shape[1] < min(self.window, x.shape[1]):
            raise UserError(f"a sequence of {x.shape[1]} positions needs {min(self.window, x.shape[1])} "
                            f"kernel taps but shared_kernels(max_len=...) built {k.shape[1]}; pass the "
                            "longest sequence length of the step as max_len")
        return causal_stft_mix(x, k, self.projection.bias, self.impl)

    def step(self, x: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One new position. x (B, d), history (B, W-1, d) = the previous W-1 inputs, oldest first."""
        window = torch.cat([history, x[:, None].to(history.dtype)], dim=1)  # (B, W, d)
        k = self.kernel()  # (d_out, W, d)
        bias = None if self.projection.bias is None else self.projection.bias.float()
        y = F.linear(window.flatten(1).float(), k.flatten(1), bias)  # (B, d_out): one matmul per layer
        return y.to(x.dtype), window[:, 1:]


# ------------------------------------------------------------------------------------------ the model


class CausalFNetEmbeddings(nn.Module):
    def __init__(self, config: CausalFNetConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, compact_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # compact_ids (B, T) with -1 for tokens outside a compacted vocabulary: embedded as zero vectors.
        words = self.word_embeddings(compact_ids.clamp(min=0))  # (B, T, d)
        if (compact_ids < 0).any():
            words = words * (compact_ids >= 0)[..., None].to(words.dtype)
        return self.dropout(self.norm(words + self.pos_embeddings(position_ids)))


class CausalFNetFFN(nn.Module):
    def __init__(self, config: CausalFNetConfig):
        super().__init__()
        self.dense1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense2(self.act(self.dense1(x))))


class CausalFNetBlock(GradientCheckpointingLayer):
    def __init__(self, config: CausalFNetConfig):
        super().__init__()
        self.causal_stft = CausalSTFT(config)
        self.ffn = CausalFNetFFN(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        # keep (B, T, 1): 0 at padding, so padded positions enter every window as the zeros of t < 0.
        mixed = self.causal_stft(x if keep is None else x * keep)
        x = self.norm1(x + mixed)
        return self.norm2(x + self.ffn(x))

    def step(self, x: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, history = self.causal_stft.step(x, history)
        x = self.norm1(x + mixed)
        return self.norm2(x + self.ffn(x)), history


class CausalFNetPreTrainedModel(PreTrainedModel):
    config_class = CausalFNetConfig
    config: CausalFNetConfig
    base_model_prefix = "fnet"  # no wrapper module: the head model holds the base layers itself
    supports_gradient_checkpointing = True
    _no_split_modules = ["CausalFNetBlock"]
    _can_compile_fullgraph = True

    @contextlib.contextmanager
    def shared_kernels(self, max_len: int | None = None) -> Iterator[None]:
        """Compute each layer's STFT kernel once for everything inside the block (one optimizer step: all
        micro-batches, gradient-checkpointing recomputes, ...). ``max_len`` (the longest sequence of the
        step) limits the kernels to the min(W, max_len) taps such sequences can reach, which is cheaper when
        W is large; a longer sequence inside the block is then an error. On exit the kernel gradients
        accumulated inside are mapped back and added to the projection weights' ``.grad`` (call
        ``optimizer.step()`` after the block). Not for DistributedDataParallel, whose gradient hooks would
        miss that update."""
        mixers = [m for m in self.modules() if isinstance(m, CausalSTFT)]
        for m in mixers:
            w = m.projection.weight
            taps = None if max_len is None else min(m.window, int(max_len))
            with torch.no_grad():
                m._shared = (stft_kernel(w, m.window) if taps is None else stft_kernel(w, m.window, taps)
                             ).requires_grad_(w.requires_grad)
        try:
            yield
        finally:
            for m in mixers:
                k, m._shared = m._shared, None
                if k is not None and k.grad is not None:
                    w = m.projection.weight
                    g = stft_kernel_grad(k.grad, m.window).to(w.dtype)
                    if w.grad is None:
                        w.grad = g
                    else:
                        w.grad += g


class CausalFNetModel(CausalFNetPreTrainedModel):
    """Embeddings and blocks; returns the final hidden states (blocks are post-norm: no extra final norm)."""

    def __init__(self, config: CausalFNetConfig):
        super().__init__(config)
        self.embeddings = CausalFNetEmbeddings(config)
        self.encoder = nn.ModuleList([CausalFNetBlock(config) for _ in range(config.num_hidden_layers)])
        self._lookup: torch.Tensor | None = None
        if type(self) is CausalFNetModel:  # the head model finishes its own init after adding lm_head
            self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def map_to_compact(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids -> row indices of the embedding/head (-1 where a compacted vocabulary lacks the id).
        Identity without compaction."""
        vm = self.config.vocab_map
        if vm is None:
            return ids
        if self._lookup is None or self._lookup.device != ids.device:
            lookup = torch.full((self.config.full_vocab_size,), -1, dtype=torch.long)
            lookup[torch.tensor(vm, dtype=torch.long)] = torch.arange(len(vm))
            self._lookup = lookup.to(ids.device)
        ids = ids.long()
        inside = (ids >= 0) & (ids < self._lookup.numel())
        return torch.where(inside, self._lookup[ids.clamp(0, self._lookup.numel() - 1)], -1)

    def _positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None) -> torch.Tensor:
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if not torch.compiler.is_compiling():
            top = int(position_ids.max()) if position_ids.numel() else 0
            if top >= self.config.max_position_embeddings:
                raise UserError(f"sequence reaches position {top} but the model has max_position_embeddings="
                                f"{self.config.max_position_embeddings}; shorten the input or max_new_tokens")
        return position_ids

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) tokenizer ids, attention_mask (B, T) 0 at padding (left or right) -> (B, T, d)."""
        position_ids = self._positions(input_ids, attention_mask, position_ids)
        x = self.embeddings(self.map_to_compact(input_ids), position_ids)  # (B, T, d)
        keep = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask[..., None].to(x.dtype)  # (B, T, 1)
        for block in self.encoder:
            x = block(x, keep)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, return_dict: bool | None = None,
                **kwargs) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.hidden_states(input_ids, attention_mask, position_ids))


class CausalFNetForCausalLM(CausalFNetModel, GenerationMixin):
    """The student: ``CausalFNetModel`` + ``lm_head``, parameters named as in the research checkpoints
    (``embeddings.*``, ``encoder.{i}.*``, ``lm_head``).

    ``forward(input_ids)`` takes tokenizer ids and returns logits over the model's rows (compact ids when
    the vocabulary is compacted); ``full_vocab_logits=True`` scatters them onto the tokenizer's id range
    with -inf elsewhere (what ``generate`` uses); ``return_hidden_only=True`` returns the hidden states
    (B, T, d) as ``hidden_states[0]`` and no logits, for chunked losses through ``get_output_embeddings()``.
    """

    _tied_weights_keys = {"lm_head.weight": "embeddings.word_embeddings.weight"}

    def __init__(self, config: CausalFNetConfig):
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def to_full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., vocab_size) row logits -> (..., output_vocab_size) tokenizer-id logits, -inf where absent."""
        vm = self.config.vocab_map
        if vm is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.full_vocab_size), float("-inf"))
        full[..., torch.tensor(vm, device=logits.device)] = logits
        return full

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_hidden_only: bool = False, full_vocab_logits: bool = False,
                logits_to_keep: int = 0, return_dict: bool | None = None, **kwargs) -> CausalLMOutput:
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)  # (B, T, d)
        if return_hidden_only:
            return CausalLMOutput(logits=None, hidden_states=(hidden,))
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            targets = self.map_to_compact(labels[:, 1:])
            targets = torch.where(labels[:, 1:] == -100, -100, targets)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        if full_vocab_logits:
            logits = self.to_full_vocab(logits)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor,
                                      attention_mask: torch.Tensor | None = None, **kwargs) -> dict:
        # No attention cache: HF generate recomputes the prefix each step (the fast path is generate_fast).
        return {"input_ids": input_ids, "attention_mask": attention_mask, "full_vocab_logits": True,
                "logits_to_keep": 1}

    def _supports_default_dynamic_cache(self) -> bool:  # no KV cache to make
        return False

    # ----------------------------------------------------------------- incremental decoding (fast path)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, DecodeState]:
        """Run the prompt once. Returns the next-token logits over tokenizer ids (B, V_out) and the state."""
        cfg = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pos = self._positions(input_ids, attention_mask, None)
        x = self.embeddings(self.map_to_compact(input_ids), pos)  # (B, T, d)
        keep = attention_mask[..., None].to(x.dtype)  # (B, T, 1)
        history = []
        for block in self.encoder:
            xin = x * keep
            h = xin[:, -(cfg.stft_window_size - 1):] if cfg.stft_window_size > 1 else xin[:, :0]
            h = F.pad(h, (0, 0, cfg.stft_window_size - 1 - h.shape[1], 0))  # (B, W-1, d)
            history.append(h)
            x = block(x, keep)
        logits = self.to_full_vocab(self.lm_head(x[:, -1]).float())  # (B, V_out)
        positions = attention_mask.long().sum(-1)  # (B,) next position per row
        return logits, DecodeState(history=history, positions=positions)

    @torch.no_grad()
    def decode_step(self, token_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed one token per row (B,); O(W d^2) per layer whatever the length so far. Updates ``state``."""
        top = int(state.positions.max())
        if top >= self.config.max_position_embeddings:
            raise UserError(f"generation reached position {top}, past max_position_embeddings="
                            f"{self.config.max_position_embeddings}; lower max_new_tokens or shorten "
                            "the prompt")
        x = self.embeddings(self.map_to_compact(token_ids[:, None]), state.positions[:, None])[:, 0]  # (B, d)
        for i, block in enumerate(self.encoder):
            x, state.history[i] = block.step(x, state.history[i])
        state.positions = state.positions + 1
        return self.to_full_vocab(self.lm_head(x).float())  # (B, V_out)

    @torch.no_grad()
    def generate_fast(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                      max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                      eos_token_id: int | Iterable[int] | None = None, pad_token_id: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled generation with the rolling state. Prompts may be left-padded
        (give ``attention_mask``). Returns (B, T + new) ids; rows that hit eos are padded after it."""
        was_training = self.training
        self.eval()
        try:
            eos = torch.tensor(sorted({eos_token_id} if isinstance(eos_token_id, int) else
                                      set(eos_token_id or [])), dtype=torch.long, device=input_ids.device)
            pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
            logits, state = self.prefill(input_ids, attention_mask)
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            out = [input_ids]
            for i in range(max_new_tokens):
                nxt = _pick(logits, temperature, top_k, generator)  # (B,)
                nxt = torch.where(done, pad, nxt)
                out.append(nxt[:, None])
                done |= torch.isin(nxt, eos)
                if bool(done.all()) or i == max_new_tokens - 1:
                    break
                logits = self.decode_step(nxt, state)
            return torch.cat(out, dim=1)
        finally:
            self.train(was_training)


@dataclass
class DecodeState:
    """Rolling decoder state: per layer the last W-1 mixer inputs (B, W-1, d); each row's next position."""

    history: list[torch.Tensor]
    positions: torch.Tensor


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ------------------------------------------------------------------------------ vocabulary compaction


def compact_ids_from_cache(reader, special_ids: Iterable[int] = ()) -> np.ndarray:
    """Sorted unique token ids used anywhere in a teacher cache (inputs, top-k ids, sampled ids) plus
    ``special_ids`` (eos, pad, chat-template tokens): the ``vocab_map`` of a compacted student."""
    seen = [np.asarray(list(special_ids), dtype=np.int64)]
    for i in range(len(reader)):
        rec = reader[i]
        seen.append(np.unique(np.asarray(rec.input_ids)))
        seen.append(np.unique(np.asarray(rec.topk_ids)))
        if getattr(rec, "sample_ids", None) is not None:
            seen.append(np.unique(np.asarray(rec.sample_ids)))
    return np.unique(np.concatenate(seen)).astype(np.int64)


def compact_model(model: CausalFNetForCausalLM, vocab_map: Iterable[int]) -> CausalFNetForCausalLM:
    """A copy of a full-vocabulary model restricted to ``vocab_map`` (sorted tokenizer ids): same weights,
    only those embedding/head rows. Its logits equal the full model's logits at those ids."""
    if model.config.vocab_map is not None:
        raise UserError("model is already compacted; compact the full-vocabulary model instead")
    vm = sorted({int(i) for i in vocab_map})
    cfg = CausalFNetConfig(**{**model.config.to_dict(), "vocab_size": len(vm), "vocab_map": vm,
                              "full_vocab_size": model.config.vocab_size})
    small = CausalFNetForCausalLM(cfg).to(model.device, model.dtype)
    state = model.state_dict()
    rows = torch.tensor(vm, device=model.device)
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"][rows]
    state["lm_head.weight"] = state["lm_head.weight"][rows]
    small.load_state_dict(state)
    if cfg.tie_word_embeddings:
        small.tie_weights()
    return small


def student_config(vocab_size: int = 151_936, **overrides) -> CausalFNetConfig:
    """The project's default student: d=256, 4 layers, FFN 1024, W=32, 1024 positions."""
    return CausalFNetConfig(vocab_size=vocab_size, **overrides)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


AutoConfig.register(CausalFNetConfig.model_type, CausalFNetConfig, exist_ok=True)
AutoModelForCausalLM.register(CausalFNetConfig, CausalFNetForCausalLM, exist_ok=True)
