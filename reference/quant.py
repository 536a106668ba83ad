"""DeepSeek V4's low-precision formats, in one place: e4m3 (FP8) and e2m1 (FP4) values with
power-of-two (ue8m0) block scales.

Two users: the reference's quantise-dequantise simulations of the official demo (`fp8_sim`,
`fp4_sim`, docs/v4-spec.md §3.4, §3.5; optional: the default "high precision" target leaves them off,
`sims=True` turns them on), and the FP8 weight format of V4 checkpoints (`fp8_block_quantize`
/ `fp8_dequantize`: one scale per 128 x 128 tile), which the engines' checkpoint writer
(engines/checkpoint.py) and weights.py use. Both round through the same `ue8m0_scale` and
`to_e4m3`."""
from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_BLOCK = 128  # DeepSeek's weight block: one ue8m0 scale per 128 x 128 tile
_FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def ue8m0_scale(amax: torch.Tensor, fmt_max: float) -> torch.Tensor:
    """The power-of-two scale mapping a block's |max| onto the format's largest value:
    2^ceil(log2(amax / fmt_max)) (ue8m0 keeps only an exponent, +1 if any mantissa bit is set)."""
    return torch.exp2(torch.ceil(torch.log2(amax / fmt_max)))


def to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Scaled values -> e4m3 (float8_e4m3fn), saturating at +-FP8_MAX."""
    return v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., L] -> [..., ceil(L/block), block] in fp32; a ragged last block is zero-padded
    (zeros change no block maximum). Real widths (448 = 7 x 64, 128 = 4 x 32) are exact."""
    pad = -x.shape[-1] % block
    xf = torch.nn.functional.pad(x.float(), (0, pad))
    return xf.reshape(*x.shape[:-1], -1, block)


def _unblock(xb: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return xb.flatten(-2)[..., : like.shape[-1]].to(like.dtype)


def fp8_sim(x: torch.Tensor, block: int) -> torch.Tensor:
    """Round each `block`-wide slab of the last dim through e4m3 with a power-of-two scale."""
    xb = _blocks(x, block)
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    scale = ue8m0_scale(amax, FP8_MAX)
    q = to_e4m3(xb / scale).float()
    return _unblock(q * scale, x)


# midpoints between neighbouring e2m1 magnitudes; at a midpoint the even code wins: rounding
# goes up where the upper neighbour's code is even (0.75 -> 1.0, 1.75 -> 2, 3.5 -> 4)
_FP4_MIDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_TIE_UP = torch.tensor([False, True, False, True, False, True, False])


def _magnitude_codes(mag: torch.Tensor) -> torch.Tensor:
    """|v| (<= FP4_MAX) -> the index of the nearest e2m1 magnitude, ties to the even index."""
    mids = _FP4_MIDS.to(mag.device, mag.dtype)
    code = torch.bucketize(mag, mids)  # the number of midpoints below |v|: a tie lands on the lower side
    at = code.clamp(max=len(mids) - 1)
    return code + (_TIE_UP.to(mag.device)[at] & (mag == mids[at]))


def _round_e2m1(v: torch.Tensor) -> torch.Tensor:
    # round to nearest e2m1 magnitude, ties to even code (docs/v4-spec.md §11: round-half-even assumed)
    grid = _FP4_GRID.to(v.device, torch.float32)
    return grid[_magnitude_codes(v.abs().clamp(max=FP4_MAX))] * torch.sign(v)


def fp4_sim(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Round each `block`-wide slab of the last dim through e2m1 with a power-of-two scale."""
    xb = _blocks(x, block)
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0**-126)
    scale = ue8m0_scale(amax, FP4_MAX)
    q = _round_e2m1((xb / scale).clamp(-FP4_MAX, FP4_MAX))
    return _unblock(q * scale, x)


def hadamard_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """Sylvester (natural order) Walsh-Hadamard matrix, unnormalised."""
    if n & (n - 1):
        raise ValueError("Hadamard size must be a power of two")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x H / sqrt(L) along the last dim (docs/v4-spec.md §3.4), computed in fp32 or wider."""
    n = x.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = hadamard_matrix(n, acc) / n**0.5
    return (x.to(acc) @ h).to(x.dtype)


def fp8_block_quantize(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's FP8 format: e4m3 values, one power-of-two (ue8m0) scale per block x block
    tile, so that w ~= q * scale. Returns (q [float8_e4m3fn], scale [rows/b, cols/b] fp32)."""
    rows, cols = w.shape
    rb, cb = -(-rows // block), -(-cols // block)
    padded = torch.zeros(rb * block, cb * block, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    tiles = padded.view(rb, block, cb, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = ue8m0_scale(amax, FP8_MAX)
    q = to_e4m3(tiles / scale[:, None, :, None])
    return q.view(rb * block, cb * block)[:rows, :cols].contiguous(), scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """q * scale, each scale spread over its block x block tile (fp32; ragged edge tiles are
    partial). Whole tiles broadcast the scales instead of expanding them."""
    rows, cols = q.shape
    qf, scale = q.float(), scale.float()
    if rows % block == 0 and cols % block == 0:
        tiles = qf.view(rows // block, block, cols // block, block)
        return (tiles * scale[:, None, :, None]).view(rows, cols)
    s = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return qf * s


# --- MXFP4 (routed experts of V4 releases): e2m1 values, one E8M0 scale per 32 columns -------

MXFP4_BLOCK = 32


def e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """e2m1 values (exactly on the grid, |q| <= 6) -> 4-bit codes: sign bit 3, magnitude index
    bits 0-2 (index into 0, 0.5, 1, 1.5, 2, 3, 4, 6). -0.0 keeps its sign bit."""
    idx = _magnitude_codes(q.abs().float())
    return idx.to(torch.uint8) | (torch.signbit(q).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes -> their e2m1 values (fp32)."""
    mag = _FP4_GRID.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8).bool(), -mag, mag)


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[O, I] -> (packed int8 [O, I/2]: element 2k in the low nibble of byte k, 2k+1 in the high
    one; E8M0 scales [O, I/32] as float8_e8m0fnu), so that w ~= e2m1 x scale per 32 columns."""
    rows, cols = w.shape
    if cols % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 needs a multiple of {MXFP4_BLOCK} columns, not {cols}")
    xb = w.float().reshape(rows, cols // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0**-126)
    scale = ue8m0_scale(amax, FP4_MAX)
    codes = e2m1_codes(_round_e2m1((xb / scale).clamp(-FP4_MAX, FP4_MAX))).reshape(rows, cols)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), scale.squeeze(-1).to(torch.float8_e8m0fnu)


def _byte_values() -> torch.Tensor:
    """[256, 2]: the two e2m1 values of every byte, low nibble first."""
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return torch.stack([e2m1_values(b & 15), e2m1_values(b >> 4)], -1)


_BYTE_VALUES = _byte_values()


def mxfp4_dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(packed int8/uint8 [O, I/2], scales [O, I/32]) -> fp32 [O, I] = e2m1 x scale (one table
    lookup per byte, the scale broadcast over its 32 columns)."""
    b = packed.view(torch.uint8)
    rows, cols = b.shape[0], 2 * b.shape[1]
    vals = _BYTE_VALUES.to(b.device)[b.to(torch.int32)].reshape(rows, cols // MXFP4_BLOCK, MXFP4_BLOCK)
    return (vals * scale.float()[..., None]).reshape(rows, cols)


def q8_0_sim(x: torch.Tensor, ties_away: bool = False) -> torch.Tensor:
    """ggml's Q8_0 of a row, dequantized: blocks of 32 along the last dim, q = round(x * 127 /
    amax) in fp32, the block scale d = amax / 127 stored as fp16, value = fp16(d) * q.
    Activations (ggml-cpu's x86 `quantize_row_q8_0`) round half to even; `ties_away`: the
    reference quantizer (`quantize_row_q8_0_ref`, gguf-py's `Q8_0`), which writes the weights,
    computes 1 / d and rounds half away from zero."""
    xb = _blocks(x, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    if ties_away:
        inv = torch.where(d == 0, 0.0, 1.0 / torch.where(d == 0, 1.0, d))
        a = (xb * inv).abs()
        q = torch.sign(xb) * (torch.floor(a) + torch.floor(2 * (a - torch.floor(a))))  # exact in fp32
    else:
        q = torch.round(xb * torch.where(amax == 0, 0.0, 127.0 / torch.where(amax == 0, 1.0, amax)))
    return _unblock(q * d.to(torch.float16).float(), x)


def round_input(x: torch.Tensor, how: str | None) -> torch.Tensor:
    """What a matmul's activation input becomes before the dot products (ggml converts it to
    the weight type's `vec_dot_type`): None as is, "bf16" rounded to bfloat16, "q8_0" Q8_0."""
    if how is None:
        return x
    if how == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    if how == "q8_0":
        return q8_0_sim(x).to(x.dtype)
    raise ValueError(f"unknown input rounding {how!r}")
