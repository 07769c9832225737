"""The STFT mixing layer as mathematics: its convolution kernel, and the causal convolution with it.

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

Only torch is imported here: this file is copied beside the weights of every saved student (see
``modeling_causal_fnet.py``), so it must load without this project.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
        if torch.compiler.is_compiling():  # a graph being traced may not store its tensors in a global
            return _build_dft(n, device, dtype)
        _DFT[key] = _build_dft(n, device, dtype)
    return _DFT[key]


def _build_dft(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``_dft_matrices``' pair, built in fp64 (not cached)."""
    f = torch.arange(n // 2 + 1, dtype=torch.float64)
    ang = 2 * math.pi * f[:, None] * torch.arange(n, dtype=torch.float64) / n  # (F, n)
    pair = torch.stack([ang.cos(), -ang.sin()], 1)  # (F, 2, n)
    c = torch.full_like(f, 2.0)
    c[0] = 1.0
    if n % 2 == 0:
        c[-1] = 1.0
    inverse = (pair * (c / n)[:, None, None]).reshape(-1, n).T
    forward = pair.reshape(-1, n)
    return forward.to(device, dtype).contiguous(), inverse.to(device, dtype).contiguous()


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

