"""Shared primitives: RMSNorm (weighted / unweighted), RoPE tables and rotation (docs/v4-spec.md §3),
Linear (one GEMM or split-K) and a projection placed by a `policy.Gemm`."""
from __future__ import annotations

import math

import torch

from .policy import Gemm
from .quant import round_input


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, acc: torch.dtype) -> torch.Tensor:
    """Weighted RMSNorm, official order (docs/v4-spec.md §3.1): w * (x * rsqrt(mean(x^2) + eps)) in `acc`,
    cast once to the input dtype."""
    xf = x.to(acc)
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (weight.to(acc) * xf).to(x.dtype)


def rms_unit(x: torch.Tensor, eps: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Unweighted RMSNorm, mean of squares in `dtype` (default: x's own; the demo normalises q
    per head in bf16, docs/v4-spec.md §5.2), the scale cast to x's dtype."""
    ms = x.to(dtype or x.dtype).square().mean(-1, keepdim=True)
    return x * torch.rsqrt(ms + eps).to(x.dtype)


def _yarn_correction_dim(rho: float, rope_dim: int, base: float, original_max_pos: int) -> float:
    # corr(rho) = dim * ln(orig / (2*pi*rho)) / (2 ln base)   (docs/v4-spec.md §3.3)
    return rope_dim * math.log(original_max_pos / (rho * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(
    rope_dim: int,
    base: float,
    yarn_factor: float | None = None,
    original_max_pos: int = 65536,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """The `rope_dim/2` angular frequencies of one RoPE table, as fp32 (docs/v4-spec.md §3.3).

    The table is a constant of the trained model and is defined in fp32 by the official
    demo; the reference reproduces those fp32 values exactly. YaRN ("NTK by parts") is applied
    whenever a factor is given; the ramp runs over the *pair* index with bounds in dim units
    (DeepSeek's quirk, kept on purpose).
    """
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if yarn_factor is not None:
        lo = max(math.floor(_yarn_correction_dim(beta_fast, rope_dim, base, original_max_pos)), 0)
        hi = min(math.ceil(_yarn_correction_dim(beta_slow, rope_dim, base, original_max_pos)), rope_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = torch.clamp((torch.arange(rope_dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        smooth = 1 - ramp
        freqs = freqs / yarn_factor * (1 - smooth) + freqs * smooth
    return freqs


def rope_angles(positions: torch.Tensor, freqs: torch.Tensor, iterated: bool = False) -> torch.Tensor:
    """Angles p * omega formed in fp32 exactly as the demo's `torch.outer` (docs/v4-spec.md §10.27).

    `iterated` (an honest float32 variant, `Policy.rope_iterated`): angles formed the way ggml
    forms them (`ggml_rope_cache_init`: `theta *= theta_scale`, then YaRN's
    `freq_scale * theta` mixed by the ramp): the unscaled angle of pair k by k repeated fp32
    products with one fp32 ratio s = omega_1 / omega_0, theta_0 = p, theta_k = theta_(k-1) * s,
    then the table's own YaRN factor omega_k / (omega_0 s^k) applied in fp32 (exact where it is
    1 or 1/factor, a power of two; the ramp's mixed pairs round once more). Pair k carries k
    roundings of one ratio instead of the demo's single product: angle differences up to
    ~1.5e-5 rad at position 300 (docs/engines.md, "llama.cpp")."""
    pos, w = positions.to(torch.float32), freqs.to(torch.float32)
    if not iterated or w.shape[0] < 2:
        return torch.outer(pos, w)
    s = w[1] / w[0]  # fp32, as ggml's theta_scale
    k = torch.arange(w.shape[0], dtype=torch.float64)
    factor = w.double() / (w[0].double() * s.double() ** k)  # the table's YaRN factor per pair
    pow2 = torch.exp2(torch.round(torch.log2(factor)))
    factor = torch.where((factor / pow2 - 1).abs() < 1e-5, pow2, factor).to(torch.float32)
    cols, theta = [], pos * w[0]
    for j in range(w.shape[0]):
        cols.append(theta if factor[j] == 1 else theta * factor[j])
        theta = theta * s
    return torch.stack(cols, -1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor, rope_dim: int, inverse: bool = False,
               acc: torch.dtype = torch.float32, trig: torch.dtype | None = None) -> torch.Tensor:
    """Rotate the trailing `rope_dim` channels of `x` as interleaved pairs (2i, 2i+1).

    `x`: [S, ..., L]; `angles`: [S, rope_dim/2]. The rotation runs in `acc` (fp32 in the demo,
    fp64 for the golden run) and the result is written back in x's dtype (docs/v4-spec.md §3.3).
    """
    ang = angles.to(acc)
    if inverse:
        ang = -ang
    shape = (ang.shape[0],) + (1,) * (x.dim() - 2) + (ang.shape[1],)
    cos, sin = ang.cos().reshape(shape), ang.sin().reshape(shape)
    if trig is not None:  # an implementation that rounds its cos/sin table (e.g. to bf16)
        cos, sin = cos.to(trig).to(acc), sin.to(trig).to(acc)
    head, tail = x[..., :-rope_dim], x[..., -rope_dim:].to(acc)
    re, im = tail[..., 0::2], tail[..., 1::2]
    rotated = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)
    return torch.cat([head, rotated.to(x.dtype)], dim=-1)


def linear(x: torch.Tensor, w: torch.Tensor, split_k: int = 1, round_in: str | None = None) -> torch.Tensor:
    """x W^T in x's dtype (weights are cast to the activation dtype). With split_k > 1 the
    reduction is summed from split_k partial products in fp32 (fp64 for fp64 inputs) and
    rounded once: the same precision, another summation order. `round_in`: the input rounded
    first (quant.round_input), as an engine converts it for a quantized weight's dot product."""
    x = round_input(x, round_in)
    w = w.to(x.dtype)
    k = x.shape[-1]
    if split_k == 1 or k < 2 * split_k:
        return torch.nn.functional.linear(x, w)
    part = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = None
    for idx in torch.arange(k).tensor_split(split_k):
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        y = torch.nn.functional.linear(x[..., lo:hi].to(part), w[:, lo:hi].to(part))
        out = y if out is None else out + y
    return out.to(x.dtype)


def gemm(x: torch.Tensor, w: torch.Tensor, place: Gemm) -> torch.Tensor:
    """x W^T computed where `place` says: inputs in place.dtype, split_k partial products."""
    return linear(x.to(place.dtype), w, place.split_k, place.round_in)
